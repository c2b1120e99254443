//! The machine's platform: devices on the buses, firmware tables and the loaded guest.

use std::sync::{Arc, Mutex};

use super::control::Control;
use super::interrupts::HvInterruptLine;
use super::machine::VmmError;
use super::memory::{self, GuestMemory};
use crate::boot::{self, BootSetup};
use crate::cli::{PciDeviceKind, VmConfig};
use crate::devices::bus::{lock, Bus, BusDevice};
use crate::devices::pci::{build_pci_bus, PciConfigIo, PciEcam};
use crate::devices::rtc::{Rtc, RTC_PORT, RTC_PORT_COUNT};
use crate::devices::serial::{com_resources, SerialPort, UART_PORT_COUNT};
use crate::hv::Vm;
use crate::tables::{self, MachineDescription, PciIntxRoute};

/// What the run loop needs from the built platform.
pub struct Platform {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub boot: BootSetup,
    /// Presses the ACPI power button (SIGTERM), when the guest has ACPI.
    pub power_button: Option<Box<dyn Fn() + Send>>,
    /// Kept alive for the VM's life: dropping a port stops its input thread.
    pub serial_ports: Vec<SerialPort>,
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
    let setup = |e: &dyn std::fmt::Display| VmmError::Setup(e.to_string());

    let pci = Arc::new(build_pci_bus(&config.pci_devices).map_err(|e| setup(&e))?);
    insert(&mut io_bus, PciConfigIo::new(pci.clone()), 0xcf8, 8)?;
    insert(&mut mmio_bus, PciEcam::new(pci), memory::PCI_ECAM_BASE, memory::PCI_ECAM_SIZE)?;

    let rtc = Rtc::with_host_clock(
        config.rtc_utc,
        memory::lowmem_size(config.memory_bytes),
        memory::highmem_size(config.memory_bytes),
    );
    insert(&mut io_bus, rtc, u64::from(RTC_PORT), RTC_PORT_COUNT)?;

    let serial_ports = build_serial_ports(config, &mut io_bus, &line)?;
    let tails: Vec<_> = serial_ports.iter().map(|p| p.device()).collect();
    control.set_serial_tail(Box::new(move || {
        tails.first().map(|d| lock(d).last_output()).unwrap_or_default()
    }));

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
            .find(|d| d.kind == PciDeviceKind::Lpc)
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
        serial_ports,
    })
}

fn insert<D: BusDevice + 'static>(bus: &mut Bus, device: D, base: u64, len: u64) -> Result<(), VmmError> {
    bus.insert(Arc::new(Mutex::new(device)), base, len)
        .map_err(|e| VmmError::Setup(e.to_string()))
}

/// COM1 and COM2 live in the LPC bridge, as in xhyve: with `-s lpc` both exist (a port without
/// `-l` discards its output); `-l comN` without an LPC bridge is an error.
fn build_serial_ports(
    config: &VmConfig,
    io_bus: &mut Bus,
    line: &dyn Fn(u32) -> Arc<HvInterruptLine>,
) -> Result<Vec<SerialPort>, VmmError> {
    let has_lpc = config.pci_devices.iter().any(|d| d.kind == PciDeviceKind::Lpc);
    let backends = [(1u8, &config.com1), (2u8, &config.com2)];
    if !has_lpc {
        if let Some((com, _)) = backends.iter().find(|(_, b)| b.is_some()) {
            return Err(VmmError::Setup(format!(
                "-l com{com} needs an LPC bridge: add -s 31,lpc"
            )));
        }
        return Ok(Vec::new());
    }
    let mut ports = Vec::new();
    for (com, backend) in backends {
        let Some((port, irq)) = com_resources(com) else { continue };
        let irq_line = line(irq);
        let serial = match backend {
            Some(b) => SerialPort::open(b, com, irq_line),
            None => SerialPort::with_io(com, Box::new(std::io::sink()), None, irq_line),
        }
        .map_err(|e| VmmError::Setup(e.to_string()))?;
        io_bus
            .insert(serial.device(), u64::from(port), UART_PORT_COUNT)
            .map_err(|e| VmmError::Setup(e.to_string()))?;
        ports.push(serial);
    }
    Ok(ports)
}
