//! The machine's platform: devices on the buses, firmware tables and the loaded guest.

use std::sync::{Arc, Mutex};

use super::control::Control;
use super::interrupts::HvInterruptLine;
use super::machine::VmmError;
use super::memory::GuestMemory;
use crate::boot::{self, BootSetup};
use crate::cli::VmConfig;
use crate::devices::bus::Bus;
use crate::hv::Vm;
use crate::tables::{self, MachineDescription, PciIntxRoute};

/// What the run loop needs from the built platform.
pub struct Platform {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub boot: BootSetup,
    /// Presses the ACPI power button (SIGTERM), when the guest has ACPI.
    pub power_button: Option<Box<dyn Fn() + Send>>,
}

/// The IOAPIC pin of a PCI slot's INTx pin: the usual swizzle over GSIs 16-23, the pins the
/// MP table and the DSDT's `_PRT` describe.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    16 + (u32::from(slot) + u32::from(pin)) % 8
}

pub fn build(
    config: &VmConfig,
    vm: &Arc<dyn Vm>,
    mem: &GuestMemory,
    control: &Arc<Control>,
) -> Result<Platform, VmmError> {
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    let line = |gsi| HvInterruptLine::new(vm.clone(), gsi);
    let _ = (&mut io_bus, &mut mmio_bus, &line, control, Mutex::new(()));

    let description = MachineDescription {
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes,
        uuid: config.uuid,
        pci_intx: config
            .pci_devices
            .iter()
            .flat_map(|d| {
                (0..4).map(move |pin| PciIntxRoute {
                    bus: d.bus,
                    slot: d.slot,
                    pin,
                    gsi: pci_intx_gsi(d.slot, pin),
                })
            })
            .collect(),
        lpc_slot: config
            .pci_devices
            .iter()
            .find(|d| d.kind == crate::cli::PciDeviceKind::Lpc)
            .map(|d| d.slot),
        com1: config.com1.is_some(),
        com2: config.com2.is_some(),
        hpet: false,
    };
    let table_err = |e: tables::TablesError| VmmError::Setup(e.to_string());
    if config.mptable {
        tables::write_mptable(mem, &description).map_err(table_err)?;
    }
    tables::write_smbios(mem, &description).map_err(table_err)?;
    let rsdp = if config.acpi {
        Some(tables::write_acpi(mem, &description).map_err(table_err)?)
    } else {
        None
    };
    let boot = boot::load(mem, &config.firmware, config.memory_bytes, rsdp)
        .map_err(|e| VmmError::Setup(e.to_string()))?;
    Ok(Platform {
        io_bus: Arc::new(io_bus),
        mmio_bus: Arc::new(mmio_bus),
        boot,
        power_button: None,
    })
}
