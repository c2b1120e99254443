//! The machine's platform: devices on the buses, firmware tables and the loaded guest.

use std::sync::{Arc, Mutex};

use super::control::Control;
#[cfg(target_os = "linux")]
use super::doorbells::DoorbellServer;
use super::interrupts::InterruptBackend;
use super::machine::VmmError;
use super::memory::{self, GuestMemory};
use super::timers::TimerService;
use super::user_irqchip::{IoApicMmio, LapicTimers, PicPorts, PitDevice, UserIrqChip};
use crate::boot::{self, BootSetup};
use crate::cli::{PciDeviceKind, VmConfig};
use crate::devices::bus::{lock, Bus, BusDevice};
use crate::devices::doorbell::Doorbells;
use crate::devices::irq::InterruptLine;
use crate::devices::pci::{
    build_pci_bus, BarWindows, PciConfigIo, PciEcam, PciResources, PCI_CONFIG_ADDRESS_PORT,
    PCI_CONFIG_DATA_PORT,
};
use crate::devices::power::PowerControl;
use crate::devices::power_mgmt::{
    AcpiPm, PostCode, PowerButton, ResetControl, ACPI_PM_BASE, ACPI_PM_PORT_COUNT, I8042,
    I8042_COMMAND_PORT, I8042_DATA_PORT, POST_CODE_PORT, RESET_CONTROL_PORT, SCI_GSI, SMI_CMD_PORT,
};
use crate::devices::rtc::{Rtc, RTC_GSI, RTC_PORT, RTC_PORT_COUNT};
use crate::devices::serial::{com_resources, SerialPort, UART_PORT_COUNT};
use crate::hv::{IrqChipMode, Vm};
use crate::intc::clock::{Clock, MonotonicClock};
use crate::intc::hpet::{Hpet, HPET_BASE, HPET_LEN};
use crate::intc::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use crate::intc::pic::{ELCR_PORT, MASTER_PORT, SLAVE_PORT};
use crate::intc::pit::{Pit, PIT_PORT, SPEAKER_PORT};
use crate::tables::{self, MachineDescription, PciIntxRoute};

/// What the run loop needs from the built platform.
pub struct Platform {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub boot: BootSetup,
    /// Presses the ACPI power button (SIGTERM), when the guest has ACPI.
    pub power_button: Option<Arc<dyn PowerButton>>,
    /// Kept alive for the VM's life: dropping a port stops its input thread.
    pub serial_ports: Vec<SerialPort>,
    /// The VMM's interrupt controllers, in `IrqChipMode::User`.
    pub user_irqchip: Option<Arc<UserIrqChip>>,
}

/// The IOAPIC pin of a PCI slot's INTx pin: the usual swizzle over GSIs 16-23, the pins the
/// MP table and the DSDT's `_PRT` describe.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    crate::devices::pci::intx_gsi(slot, pin)
}

pub fn build(
    config: &VmConfig,
    vm: &Arc<dyn Vm>,
    mem: &GuestMemory,
    control: &Arc<Control>,
    irqchip: IrqChipMode,
) -> Result<Platform, VmmError> {
    // Shared from the start: PCI BARs are (re)mapped on them while the guest runs.
    let io_bus = Arc::new(Bus::new());
    let mmio_bus = Arc::new(Bus::new());
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let mut timers = TimerService::new(clock.clone());
    let user_irqchip = match irqchip {
        IrqChipMode::Kernel => None,
        IrqChipMode::User => Some(build_user_irqchip(
            config,
            control,
            &clock,
            &mut timers,
            &io_bus,
            &mmio_bus,
        )?),
    };
    let interrupts = match &user_irqchip {
        Some(chip) => InterruptBackend::User(chip.clone()),
        None => InterruptBackend::Hypervisor(vm.clone()),
    };
    let line = |gsi| interrupts.line(gsi);
    let setup = |e: &dyn std::fmt::Display| VmmError::Setup(e.to_string());

    let intx = interrupts.clone();
    // User mode keeps doorbells on the exit path, where the user irqchip sees every write.
    // XHYVE_DOORBELLS=exit keeps them there in kernel mode too, to measure the difference.
    let doorbells_by_exit = std::env::var("XHYVE_DOORBELLS").as_deref() == Ok("exit");
    let doorbells = doorbell_server(irqchip, doorbells_by_exit, vm).map_err(|e| setup(&e))?;
    let pci_resources = PciResources {
        memory: mem.clone(),
        msi: interrupts.msi_sender(),
        intx: Box::new(move |gsi| intx.line(gsi)),
        virtio_single_msi: config.virtio_single_msi,
        uuid: config.uuid,
        doorbells,
    };
    let pci = build_pci_bus(
        &config.pci_devices,
        io_bus.clone(),
        mmio_bus.clone(),
        &pci_resources,
    )
    .map_err(|e| setup(&e))?;
    pci.allocate_bars(&BarWindows::for_memory(config.memory_bytes))
        .map_err(|e| setup(&e))?;
    let pci = Arc::new(pci);
    // One device at both ports, so that 0xCF9 (the reset register) stays free between them.
    let config_io = shared(PciConfigIo::new(pci.clone()));
    insert_shared(&io_bus, &config_io, u64::from(PCI_CONFIG_ADDRESS_PORT), 1)?;
    insert_shared(&io_bus, &config_io, u64::from(PCI_CONFIG_DATA_PORT), 4)?;
    insert(
        &mmio_bus,
        PciEcam::new(pci),
        memory::PCI_ECAM_BASE,
        memory::PCI_ECAM_SIZE,
    )?;

    // Neither irqchip mode has an RTC in the kernel: ours raises IRQ 8 from the timer thread.
    let rtc = Rtc::with_host_clock(
        config.rtc_utc,
        memory::lowmem_size(config.memory_bytes),
        memory::highmem_size(config.memory_bytes),
    )
    .with_interrupts(clock.clone(), line(RTC_GSI));
    insert(
        &io_bus,
        timers.add(rtc),
        u64::from(RTC_PORT),
        RTC_PORT_COUNT,
    )?;

    let power: Arc<dyn PowerControl> = control.clone();
    let acpi_pm = shared(AcpiPm::new(line(SCI_GSI), power.clone()));
    insert_shared(
        &io_bus,
        &acpi_pm,
        u64::from(ACPI_PM_BASE),
        ACPI_PM_PORT_COUNT,
    )?;
    insert_shared(&io_bus, &acpi_pm, u64::from(SMI_CMD_PORT), 1)?;
    insert(
        &io_bus,
        ResetControl::new(power.clone()),
        u64::from(RESET_CONTROL_PORT),
        1,
    )?;
    let i8042 = shared(I8042::new(power));
    insert_shared(&io_bus, &i8042, u64::from(I8042_DATA_PORT), 1)?;
    insert_shared(&io_bus, &i8042, u64::from(I8042_COMMAND_PORT), 1)?;
    insert(&io_bus, PostCode::default(), u64::from(POST_CODE_PORT), 1)?;
    // SIGTERM presses the power button only where the guest can see it: with ACPI tables.
    let power_button: Option<Arc<dyn PowerButton>> = if config.acpi {
        Some(acpi_pm.clone())
    } else {
        None
    };

    // KVM's irqchip has no HPET: the VMM provides it, ticked by its own timer thread.
    let hpet = timers.add(Hpet::new(clock, interrupts.pin_sink()));
    insert(&mmio_bus, hpet, HPET_BASE, HPET_LEN)?;
    timers.start().map_err(VmmError::Thread)?;

    let serial_ports = build_serial_ports(config, &io_bus, &line)?;
    let tails: Vec<_> = serial_ports.iter().map(|p| p.device()).collect();
    control.set_serial_tail(Box::new(move || {
        tails
            .first()
            .map(|d| lock(d).last_output())
            .unwrap_or_default()
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
        hpet: true,
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
        io_bus,
        mmio_bus,
        boot,
        power_button,
        serial_ports,
        user_irqchip,
    })
}

/// The VMM's own LAPICs, IOAPIC, 8259 pair and 8254 (`IrqChipMode::User`). The LAPICs are
/// not on the MMIO bus: each vCPU reaches its own, so the vCPU loop dispatches them. The
/// PM timer stays the one in `AcpiPm`.
fn build_user_irqchip(
    config: &VmConfig,
    control: &Arc<Control>,
    clock: &Arc<dyn Clock>,
    timers: &mut TimerService,
    io_bus: &Bus,
    mmio_bus: &Bus,
) -> Result<Arc<UserIrqChip>, VmmError> {
    let chip = UserIrqChip::new(
        config.vcpus,
        config.x2apic,
        clock.clone(),
        timers.waker(),
        control.clone(),
    );
    timers.add_timed(Arc::new(Mutex::new(LapicTimers(chip.clone()))));
    insert(mmio_bus, IoApicMmio(chip.clone()), IOAPIC_BASE, IOAPIC_SIZE)?;
    let pic = shared(PicPorts(chip.clone()));
    for port in [MASTER_PORT, SLAVE_PORT, ELCR_PORT] {
        insert_shared(io_bus, &pic, u64::from(port), 2)?;
    }
    let pit = shared(timers.add(PitDevice::new(Pit::new(clock.clone()), chip.clone())));
    insert_shared(io_bus, &pit, u64::from(PIT_PORT), 4)?;
    insert_shared(io_bus, &pit, u64::from(SPEAKER_PORT), 1)?;
    Ok(chip)
}

fn shared<D: BusDevice + 'static>(device: D) -> Arc<Mutex<D>> {
    Arc::new(Mutex::new(device))
}

fn insert_shared<D: BusDevice + 'static>(
    bus: &Bus,
    device: &Arc<Mutex<D>>,
    base: u64,
    len: u64,
) -> Result<(), VmmError> {
    bus.insert(device.clone(), base, len)
        .map_err(|e| VmmError::Setup(e.to_string()))
}

fn insert<D: BusDevice + 'static>(
    bus: &Bus,
    device: D,
    base: u64,
    len: u64,
) -> Result<(), VmmError> {
    insert_shared(bus, &shared(device), base, len)
}

/// COM1 and COM2 live in the LPC bridge, as in xhyve: with `-s lpc` both exist (a port without
/// `-l` discards its output); `-l comN` without an LPC bridge is an error.
fn build_serial_ports(
    config: &VmConfig,
    io_bus: &Bus,
    line: &dyn Fn(u32) -> Arc<dyn InterruptLine>,
) -> Result<Vec<SerialPort>, VmmError> {
    let has_lpc = config
        .pci_devices
        .iter()
        .any(|d| d.kind == PciDeviceKind::Lpc);
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
        let Some((port, irq)) = com_resources(com) else {
            continue;
        };
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

/// The ioeventfd doorbell server (Linux KVM, in-kernel irqchip), or none: doorbells then stay
/// VM exits.
#[cfg(target_os = "linux")]
fn doorbell_server(
    irqchip: IrqChipMode,
    by_exit: bool,
    vm: &Arc<dyn Vm>,
) -> std::io::Result<Option<Arc<dyn Doorbells>>> {
    match irqchip {
        IrqChipMode::Kernel if !by_exit => Ok(Some(DoorbellServer::start(vm.clone())?)),
        _ => Ok(None),
    }
}

/// Other hosts have no ioeventfd: every doorbell is an exit.
#[cfg(not(target_os = "linux"))]
fn doorbell_server(
    _irqchip: IrqChipMode,
    _by_exit: bool,
    _vm: &Arc<dyn Vm>,
) -> std::io::Result<Option<Arc<dyn Doorbells>>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::power_mgmt as pm;

    /// The FADT must publish the ports the devices really decode.
    #[test]
    fn acpi_tables_describe_the_power_management_devices() {
        assert_eq!(
            u64::from(tables::PM1A_EVT_BLK),
            u64::from(pm::PM1A_EVT_PORT)
        );
        assert_eq!(
            u64::from(tables::PM1A_CNT_BLK),
            u64::from(pm::PM1A_CNT_PORT)
        );
        assert_eq!(u64::from(tables::PM_TMR_BLK), u64::from(pm::PM_TIMER_PORT));
        assert_eq!(u64::from(tables::SMI_CMD), u64::from(pm::SMI_CMD_PORT));
        assert_eq!(u64::from(tables::ACPI_ENABLE), u64::from(pm::ACPI_ENABLE));
        assert_eq!(u64::from(tables::ACPI_DISABLE), u64::from(pm::ACPI_DISABLE));
        assert_eq!(
            u64::from(tables::RESET_PORT),
            u64::from(pm::RESET_CONTROL_PORT)
        );
        assert_eq!(u32::from(tables::SCI_IRQ), pm::SCI_GSI);
    }

    #[test]
    fn intx_routes_stay_on_the_pci_pins() {
        for slot in 0..32 {
            for pin in 0..4 {
                assert!((16..24).contains(&pci_intx_gsi(slot, pin)));
            }
        }
        assert_ne!(pci_intx_gsi(2, 0), pci_intx_gsi(3, 0));
    }
}
