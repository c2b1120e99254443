//! The device manager: builds every device the typed configuration asks for, and owns what
//! the devices live on — the port and MMIO buses, the PCI bus, the legacy PC devices, the
//! interrupt controllers the VMM emulates, and each device's handle (its threads).
//!
//! PCI functions come from one registry, [`pci_devices::build`]: a `DeviceKind` in, a
//! function and its handle out. The PCI layer itself knows no device type. The machine
//! pauses and resumes its devices through [`DeviceManager`], adds one with
//! [`DeviceManager::add`], and resets them all with [`DeviceManager::reset`].
//!
//! That reset has one caller: the control API's `Reset` (`MachineHandle::reset`), a reset
//! button. A reset the guest asks for (0xCF9, the i8042, ACPI's reset register, a triple
//! fault) still ends `xhyve` with xhyve's exit code 0, and whoever started it starts it
//! again. A guest's reset of one device goes through that device's registers to the
//! device, which the manager does not own.

mod pci_devices;

use std::sync::{Arc, Mutex};

use crate::arch::x86_64::layout;
use crate::config::{DeviceConfig, DoorbellPath, VmConfig};
use crate::devices::bus::{lock, Bus, BusDevice, BusError};
use crate::devices::doorbell::Doorbells;
use crate::devices::irq::InterruptLine;
use crate::devices::pci::{
    BarWindows, PciBus, PciConfigIo, PciEcam, PciError, PCI_CONFIG_ADDRESS_PORT,
    PCI_CONFIG_DATA_PORT,
};
use crate::devices::power::PowerControl;
use crate::devices::power_mgmt::PowerButton;
use crate::devices::power_mgmt::{
    AcpiPm, PostCode, ResetControl, ACPI_PM_BASE, ACPI_PM_PORT_COUNT, I8042, I8042_COMMAND_PORT,
    I8042_DATA_PORT, POST_CODE_PORT, RESET_CONTROL_PORT, SCI_GSI, SMI_CMD_PORT,
};
use crate::devices::rtc::{Rtc, RTC_GSI, RTC_PORT, RTC_PORT_COUNT};
use crate::devices::serial::{com_resources, SerialError, SerialPort, UART_PORT_COUNT};
use crate::devices::{DeviceHandle, PowerOnReset};
use crate::hv::{IrqChipMode, Vm};
use crate::intc::clock::{Clock, MonotonicClock};
use crate::intc::hpet::{Hpet, HPET_BASE, HPET_LEN};
use crate::intc::ioapic::{IOAPIC_BASE, IOAPIC_SIZE};
use crate::intc::pic::{ELCR_PORT, MASTER_PORT, SLAVE_PORT};
use crate::intc::pit::{Pit, PIT_PORT, SPEAKER_PORT};
use crate::memory::GuestMemory;
use crate::vmm::control::Control;
#[cfg(target_os = "linux")]
use crate::vmm::doorbells::DoorbellServer;
use crate::vmm::interrupts::InterruptBackend;
use crate::vmm::timers::TimerService;
use crate::vmm::user_irqchip::{IoApicMmio, LapicTimers, PicPorts, PitDevice, UserIrqChip};
pub use pci_devices::{DeviceContext, DeviceError};

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("PCI device {address}: {source}")]
    Device {
        address: crate::devices::pci::PciAddress,
        #[source]
        source: DeviceError,
    },
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("{what}: {source}")]
    Bus {
        what: &'static str,
        #[source]
        source: BusError,
    },
    #[error("-l com{0} needs an LPC bridge: add -s 31,lpc")]
    SerialNeedsLpc(u8),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error("cannot start the timer thread: {0}")]
    Timers(std::io::Error),
    #[error("cannot start the doorbell service: {0}")]
    Doorbells(std::io::Error),
}

/// Every device of the machine, and what they are attached to.
pub struct DeviceManager {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    pci: Arc<PciBus>,
    /// Presses the ACPI power button (SIGTERM), when the guest has ACPI.
    power_button: Option<Arc<dyn PowerButton>>,
    /// Dropping a port stops its input thread.
    serial_ports: Vec<SerialPort>,
    /// The VMM's interrupt controllers, in `IrqChipMode::User`.
    user_irqchip: Option<Arc<UserIrqChip>>,
    /// What the registry needs to build one more PCI function.
    context: DeviceContext,
    /// One per PCI function that has threads or state to pause, in build order. Dropping
    /// one stops its threads.
    handles: Vec<Box<dyn DeviceHandle>>,
    paused: bool,
    /// The devices off PCI that a machine reset puts back at power-on.
    legacy: Vec<Arc<Mutex<dyn PowerOnReset>>>,
    /// For the hypervisor's own interrupt controllers at a machine reset.
    vm: Arc<dyn Vm>,
}

impl DeviceManager {
    /// Builds the legacy devices, the interrupt controllers (in user mode), and every PCI
    /// function of `config.devices`, with BARs placed as firmware would.
    pub fn new(
        config: &VmConfig,
        vm: &Arc<dyn Vm>,
        mem: &GuestMemory,
        control: &Arc<Control>,
    ) -> Result<Self, DeviceManagerError> {
        let irqchip = config.host.irqchip;
        // Shared from the start: PCI BARs are (re)mapped on them while the guest runs.
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        let mut timers = TimerService::new(clock.clone());
        let mut legacy: Vec<Arc<Mutex<dyn PowerOnReset>>> = Vec::new();
        let user_irqchip = match irqchip {
            IrqChipMode::Kernel => None,
            IrqChipMode::User => Some(build_user_irqchip(
                config,
                control,
                &clock,
                &mut timers,
                &io_bus,
                &mmio_bus,
                &mut legacy,
            )?),
        };
        let interrupts = match &user_irqchip {
            Some(chip) => InterruptBackend::User(chip.clone()),
            None => InterruptBackend::Hypervisor(vm.clone(), config.host.irqfd),
        };
        let line = |gsi| interrupts.line(gsi);

        // User mode keeps doorbells on the exit path, where the user irqchip sees every write.
        let doorbells = doorbell_server(irqchip, config.host.doorbells, vm)
            .map_err(DeviceManagerError::Doorbells)?;
        let intx = interrupts.clone();
        let context = DeviceContext {
            memory: mem.clone(),
            msi: interrupts.msi_sender(),
            intx: Arc::new(move |gsi| intx.line(gsi)),
            virtio_single_msi: config.virtio_single_msi,
            uuid: config.uuid,
            doorbells,
        };
        let pci = PciBus::with_buses(io_bus.clone(), mmio_bus.clone());
        let mut handles = Vec::new();
        for device in &config.devices {
            if let Some(handle) = add_pci_function(&pci, &context, device)? {
                handles.push(handle);
            }
        }
        pci.allocate_bars(&BarWindows::for_memory(config.memory_bytes))?;
        let pci = Arc::new(pci);
        // One device at both ports, so that 0xCF9 (the reset register) stays free between them.
        let config_io = shared(PciConfigIo::new(pci.clone()));
        insert_shared(
            &io_bus,
            &config_io,
            u64::from(PCI_CONFIG_ADDRESS_PORT),
            1,
            "PCI config ports",
        )?;
        insert_shared(
            &io_bus,
            &config_io,
            u64::from(PCI_CONFIG_DATA_PORT),
            4,
            "PCI config ports",
        )?;
        insert(
            &mmio_bus,
            PciEcam::new(pci.clone()),
            layout::PCI_ECAM_BASE,
            layout::PCI_ECAM_SIZE,
            "PCI ECAM",
        )?;

        // Neither irqchip mode has an RTC in the kernel: ours raises IRQ 8 from the timer thread.
        let rtc = Rtc::with_host_clock(
            config.rtc_utc,
            layout::lowmem_size(config.memory_bytes),
            layout::highmem_size(config.memory_bytes),
        )
        .with_interrupts(clock.clone(), line(RTC_GSI));
        let rtc = shared(timers.add(rtc));
        insert_shared(&io_bus, &rtc, u64::from(RTC_PORT), RTC_PORT_COUNT, "RTC")?;
        legacy.push(rtc);

        let power: Arc<dyn PowerControl> = control.clone();
        let acpi_pm = shared(AcpiPm::new(line(SCI_GSI), power.clone()));
        insert_shared(
            &io_bus,
            &acpi_pm,
            u64::from(ACPI_PM_BASE),
            ACPI_PM_PORT_COUNT,
            "ACPI PM",
        )?;
        insert_shared(
            &io_bus,
            &acpi_pm,
            u64::from(SMI_CMD_PORT),
            1,
            "ACPI SMI_CMD",
        )?;
        insert(
            &io_bus,
            ResetControl::new(power.clone()),
            u64::from(RESET_CONTROL_PORT),
            1,
            "reset control",
        )?;
        let i8042 = shared(I8042::new(power));
        insert_shared(&io_bus, &i8042, u64::from(I8042_DATA_PORT), 1, "i8042")?;
        insert_shared(&io_bus, &i8042, u64::from(I8042_COMMAND_PORT), 1, "i8042")?;
        legacy.push(acpi_pm.clone());
        legacy.push(i8042);
        insert(
            &io_bus,
            PostCode::default(),
            u64::from(POST_CODE_PORT),
            1,
            "POST code",
        )?;
        // SIGTERM presses the power button only where the guest can see it: with ACPI tables.
        let power_button: Option<Arc<dyn PowerButton>> = if config.acpi {
            Some(acpi_pm.clone())
        } else {
            None
        };

        // KVM's irqchip has no HPET: the VMM provides it, ticked by its own timer thread.
        let hpet = shared(timers.add(Hpet::new(clock, interrupts.pin_sink())));
        insert_shared(&mmio_bus, &hpet, HPET_BASE, HPET_LEN, "HPET")?;
        legacy.push(hpet);
        timers.start().map_err(DeviceManagerError::Timers)?;

        let serial_ports = build_serial_ports(config, &io_bus, &line)?;
        for port in &serial_ports {
            legacy.push(port.device());
        }
        let tails: Vec<_> = serial_ports.iter().map(|p| p.device()).collect();
        control.set_serial_tail(Box::new(move || {
            tails
                .first()
                .map(|d| lock(d).last_output())
                .unwrap_or_default()
        }));

        Ok(DeviceManager {
            io_bus,
            mmio_bus,
            pci,
            power_button,
            serial_ports,
            user_irqchip,
            context,
            handles,
            paused: false,
            legacy,
            vm: vm.clone(),
        })
    }

    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    pub fn pci(&self) -> &Arc<PciBus> {
        &self.pci
    }

    pub fn user_irqchip(&self) -> Option<&Arc<UserIrqChip>> {
        self.user_irqchip.as_ref()
    }

    /// The ACPI power button (SIGTERM presses it), when the guest has ACPI. Taken once.
    pub fn take_power_button(&mut self) -> Option<Arc<dyn PowerButton>> {
        self.power_button.take()
    }

    /// The COM ports, for diagnostics.
    pub fn serial_ports(&self) -> &[SerialPort] {
        &self.serial_ports
    }

    /// The context the registry builds PCI functions with (for hot-plug and tests).
    pub fn context(&self) -> &DeviceContext {
        &self.context
    }

    /// Builds the function `device` names and puts it on the PCI bus, its BARs placed after
    /// the others' and mapped at once. A paused machine's new device starts paused. The
    /// guest is not told: it finds the device when it rescans PCI, and the tables written at
    /// boot give its INTx pins no route (MSI and MSI-X work); see docs/ARCHITECTURE.md,
    /// "Adding a device to a running machine".
    pub fn add(&mut self, device: &DeviceConfig) -> Result<(), DeviceManagerError> {
        if let Some(mut handle) = add_pci_function(&self.pci, &self.context, device)? {
            if self.paused {
                handle.pause();
            }
            self.handles.push(handle);
        }
        Ok(())
    }

    /// Stops every device from touching guest memory or raising interrupts; requests in
    /// flight finish first, queued ones wait. Returns when all devices are quiet.
    pub fn pause(&mut self) {
        if self.paused {
            return;
        }
        for handle in &mut self.handles {
            handle.pause();
        }
        self.paused = true;
    }

    /// Lets paused devices run again; what the guest queued meanwhile is served.
    pub fn resume(&mut self) {
        if !self.paused {
            return;
        }
        for handle in &mut self.handles {
            handle.resume();
        }
        self.paused = false;
    }

    /// A machine reset, on a paused machine (the vCPUs parked, the devices paused): every
    /// device back at its power-on state. First each device's threads go quiet (a request
    /// in flight finishes; `DeviceHandle::reset`), then every PCI function is reset, its
    /// configuration space and BARs as start-up placed them (`PciBus::reset`: virtio
    /// transports at status 0 with their queues, doorbells and MSI-X table released, AHCI
    /// after its command in flight), then the UARTs, RTC (it keeps its time), ACPI PM,
    /// i8042, HPET, and the interrupt controllers and PIT: the VMM's in user-irqchip mode,
    /// the hypervisor's otherwise. A paused machine's devices stay paused.
    pub fn reset(&mut self) -> Result<(), crate::hv::HvError> {
        for handle in &mut self.handles {
            handle.reset();
        }
        self.pci.reset();
        for device in &self.legacy {
            lock(device).power_on_reset();
        }
        match &self.user_irqchip {
            Some(chip) => {
                chip.reset();
                Ok(())
            }
            None => self.vm.reset_irqchip(),
        }
    }

    /// Stops what devices run besides their functions (e.g. the built-in network's stack),
    /// once the vCPUs have stopped.
    pub fn shutdown(&mut self) {
        for handle in &mut self.handles {
            handle.shutdown();
        }
    }
}

/// Builds the function `device` names and puts it on `pci`; returns its handle.
fn add_pci_function(
    pci: &PciBus,
    context: &DeviceContext,
    device: &DeviceConfig,
) -> Result<Option<Box<dyn DeviceHandle>>, DeviceManagerError> {
    let address = device.address;
    let built = pci_devices::build(&device.kind, address, context)
        .map_err(|source| DeviceManagerError::Device { address, source })?;
    if let Some(doorbells) = &context.doorbells {
        lock(&built.function).attach_doorbells(doorbells.clone());
    }
    pci.add(address, built.function)?;
    Ok(built.handle)
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
    legacy: &mut Vec<Arc<Mutex<dyn PowerOnReset>>>,
) -> Result<Arc<UserIrqChip>, DeviceManagerError> {
    let chip = UserIrqChip::new(
        config.vcpus,
        config.x2apic,
        clock.clone(),
        timers.waker(),
        control.clone(),
    );
    timers.add_timed(Arc::new(Mutex::new(LapicTimers(chip.clone()))));
    insert(
        mmio_bus,
        IoApicMmio(chip.clone()),
        IOAPIC_BASE,
        IOAPIC_SIZE,
        "IOAPIC",
    )?;
    let pic = shared(PicPorts(chip.clone()));
    for port in [MASTER_PORT, SLAVE_PORT, ELCR_PORT] {
        insert_shared(io_bus, &pic, u64::from(port), 2, "PIC")?;
    }
    let pit = shared(timers.add(PitDevice::new(Pit::new(clock.clone()), chip.clone())));
    insert_shared(io_bus, &pit, u64::from(PIT_PORT), 4, "PIT")?;
    insert_shared(io_bus, &pit, u64::from(SPEAKER_PORT), 1, "PIT speaker port")?;
    legacy.push(pit);
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
    what: &'static str,
) -> Result<(), DeviceManagerError> {
    bus.insert(device.clone(), base, len)
        .map_err(|source| DeviceManagerError::Bus { what, source })
}

fn insert<D: BusDevice + 'static>(
    bus: &Bus,
    device: D,
    base: u64,
    len: u64,
    what: &'static str,
) -> Result<(), DeviceManagerError> {
    insert_shared(bus, &shared(device), base, len, what)
}

/// COM1 and COM2 live in the LPC bridge, as in xhyve: with `-s lpc` both exist (a port without
/// `-l` discards its output); `-l comN` without an LPC bridge is an error.
fn build_serial_ports(
    config: &VmConfig,
    io_bus: &Bus,
    line: &dyn Fn(u32) -> Arc<dyn InterruptLine>,
) -> Result<Vec<SerialPort>, DeviceManagerError> {
    let has_lpc = config.lpc_slot().is_some();
    let backends = [(1u8, &config.com1), (2u8, &config.com2)];
    if !has_lpc {
        if let Some((com, _)) = backends.iter().find(|(_, b)| b.is_some()) {
            return Err(DeviceManagerError::SerialNeedsLpc(*com));
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
        }?;
        io_bus
            .insert(serial.device(), u64::from(port), UART_PORT_COUNT)
            .map_err(|source| DeviceManagerError::Bus {
                what: "COM port",
                source,
            })?;
        ports.push(serial);
    }
    Ok(ports)
}

/// The ioeventfd doorbell server (Linux KVM, in-kernel irqchip), or none: doorbells then stay
/// VM exits.
#[cfg(target_os = "linux")]
fn doorbell_server(
    irqchip: IrqChipMode,
    path: DoorbellPath,
    vm: &Arc<dyn Vm>,
) -> std::io::Result<Option<Arc<dyn Doorbells>>> {
    match irqchip {
        IrqChipMode::Kernel if path == DoorbellPath::EventFd => {
            Ok(Some(DoorbellServer::new(vm.clone())))
        }
        _ => Ok(None),
    }
}

/// Other hosts have no ioeventfd: every doorbell is an exit.
#[cfg(not(target_os = "linux"))]
fn doorbell_server(
    _irqchip: IrqChipMode,
    _path: DoorbellPath,
    _vm: &Arc<dyn Vm>,
) -> std::io::Result<Option<Arc<dyn Doorbells>>> {
    Ok(None)
}

#[cfg(test)]
mod tests {
    use crate::arch::x86_64::tables;
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
                assert!((16..24).contains(&crate::devices::pci::intx_gsi(slot, pin)));
            }
        }
        assert_ne!(
            crate::devices::pci::intx_gsi(2, 0),
            crate::devices::pci::intx_gsi(3, 0)
        );
    }
}

/// The whole manager on a real (KVM) VM: built from a typed config, a device added while
/// it runs, pause and resume. Skips without /dev/kvm, as the other KVM unit tests.
#[cfg(all(test, target_os = "linux"))]
mod kvm_tests {
    use super::*;
    use crate::block::test_util::TempImage;
    use crate::config::{BlockOptions, DeviceKind, Firmware};
    use crate::devices::pci::PciAddress;
    use crate::hv::kvm::tests_support::real_mode_vm;

    fn at(slot: u8) -> PciAddress {
        PciAddress::new(0, slot, 0).unwrap()
    }

    fn vendor_device(dm: &DeviceManager, slot: u8) -> u32 {
        let mut d = [0u8; 4];
        dm.pci().read_config(at(slot), 0, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn builds_the_config_adds_a_device_and_pauses() {
        let Some((_kvm, vm, mem)) = real_mode_vm() else {
            return;
        };
        let image = TempImage::new("devmgr-blk", 1 << 20);
        let mut config = VmConfig::with_firmware(Firmware::Kexec {
            kernel: "unused".into(),
            initrd: None,
            cmdline: String::new(),
        });
        let blk = BlockOptions::parse(&image.path.to_string_lossy()).unwrap();
        for (slot, kind) in [
            (0, DeviceKind::Hostbridge),
            (4, DeviceKind::VirtioBlk(blk)),
            (31, DeviceKind::Lpc),
        ] {
            config.devices.push(DeviceConfig {
                address: at(slot),
                kind,
            });
        }
        let (control, _woken) = Control::new(1);
        let mut dm = DeviceManager::new(&config, &vm, &mem, &control).unwrap();
        assert_eq!(vendor_device(&dm, 0), 0x1275_1275);
        assert_eq!(vendor_device(&dm, 4), 0x1001_1AF4);
        assert_eq!(vendor_device(&dm, 5), 0xFFFF_FFFF);
        assert_eq!(dm.pci().mapped_bars(at(4)).len(), 3);

        dm.pause();
        // Added while paused: it starts paused, with its BARs placed and mapped.
        dm.add(&DeviceConfig {
            address: at(5),
            kind: DeviceKind::VirtioRnd,
        })
        .unwrap();
        assert_eq!(vendor_device(&dm, 5), 0x1005_1AF4);
        assert_eq!(dm.pci().mapped_bars(at(5)).len(), 3);
        dm.resume();
        let err = dm
            .add(&DeviceConfig {
                address: at(5),
                kind: DeviceKind::VirtioRnd,
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "PCI slot 0:5:0 is already in use");

        // A machine reset: the guest had moved the hot-added function's BAR 2; it goes back
        // where `add` placed it, and the in-kernel irqchip takes its power-on state.
        let placed = dm.pci().mapped_bars(at(5));
        dm.pci()
            .write_config(at(5), 0x18, &0xD000_0000u32.to_le_bytes());
        assert_ne!(dm.pci().mapped_bars(at(5)), placed);
        dm.pause();
        dm.reset().unwrap();
        dm.resume();
        assert_eq!(dm.pci().mapped_bars(at(5)), placed);
        assert_eq!(vendor_device(&dm, 4), 0x1001_1AF4);
    }
}
