//! Builds the machine from a `VmConfig` and runs it to the end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::control::{Control, ResetError};
use super::exit::StopReason;
use super::vcpu::VcpuContext;
use super::{host, pidfile, signals};
use crate::arch::x86_64::cpuid::CpuidPolicy;
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::devices::bus::lock;
use crate::hv::{self, HvError, IrqChipMode, Vcpu, Vm, VmOptions};
use crate::memory::{self, GuestMemory};

/// How often the main thread asks whether every vCPU is halted.
const HALT_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long one halt poll waits for the vCPUs to answer.
const HALT_POLL_ANSWER: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    PidFile(#[from] pidfile::PidFileError),
    #[error("invalid -p {vcpu}:{host_cpu}: host CPU {host_cpu} is not available to xhyve")]
    BadPin { vcpu: u8, host_cpu: u32 },
    #[error(transparent)]
    Devices(#[from] crate::device_manager::DeviceManagerError),
    #[error(transparent)]
    Tables(#[from] crate::arch::x86_64::tables::TablesError),
    #[error(transparent)]
    Boot(#[from] crate::arch::x86_64::boot::BootError),
    /// Guest RAM could not be reserved or handed to the hypervisor: name `-m`, the one knob
    /// the user can turn, rather than only the hypervisor's ioctl.
    #[error("-m {size}: cannot set up that much guest memory: {reason}")]
    GuestMemory { size: String, reason: String },
    #[error(transparent)]
    Rest(#[from] super::rest::RestError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// The running machine, as a control API or a signal handler drives it. Cheap to clone;
/// every method may be called from any thread.
#[derive(Clone)]
pub struct MachineHandle {
    control: Arc<Control>,
    devices: Arc<Mutex<DeviceManager>>,
    vcpus: u8,
    /// What a machine reset loads again, and where the BSP's new entry registers go.
    reload: Arc<Reload>,
    /// One pause, resume or reset at a time, whoever asks (API, signals).
    lifecycle: Arc<Mutex<()>>,
}

/// What start-up loaded, to load it again at a machine reset.
struct Reload {
    config: VmConfig,
    memory: GuestMemory,
    /// Shared with the vCPU threads, which read it when they reset.
    boot: Arc<Mutex<crate::arch::x86_64::boot::BootSetup>>,
}

impl MachineHandle {
    /// Pauses the whole machine and returns once it is quiet: first the vCPUs (each leaves
    /// the guest at its next exit, so no new doorbell rings), then every device (each
    /// finishes the request it is running; the rest wait in their queues). Timers keep
    /// time, so the guest sees the pause as lost time. Idempotent.
    pub fn pause(&self) {
        let _one = lock(&self.lifecycle);
        self.control.pause_vcpus(self.vcpus);
        lock(&self.devices).pause();
    }

    /// Resumes a paused machine: devices first (they serve what was queued), then the
    /// vCPUs. Idempotent.
    pub fn resume(&self) {
        let _one = lock(&self.lifecycle);
        lock(&self.devices).resume();
        self.control.resume_vcpus();
    }

    /// Resets the machine in place, as a reset button (QEMU's `system_reset`): the same
    /// process, devices and backing files; the guest starts again from its boot entry.
    ///
    /// The machine is paused (vCPUs parked, devices quiet), every device is reset
    /// (`DeviceManager::reset`), the firmware tables are written and the guest loaded again
    /// exactly as at start (the guest may have overwritten both; RAM is otherwise left as
    /// it is, as on a PC), then each vCPU thread resets its own vCPU in its park: the BSP
    /// gets the boot registers, the APs wait for INIT/SIPI. Then the machine resumes; a
    /// paused one stays paused. Timers keep running. A failure after the devices were
    /// touched stops the machine (exit 4): it cannot run on half reset.
    pub fn reset(&self) -> Result<(), ResetError> {
        let _one = lock(&self.lifecycle);
        if self.control.is_stopping() {
            return Err(ResetError::Stopping);
        }
        let was_paused = self.control.pause_requested();
        self.control.pause_vcpus(self.vcpus);
        if self.control.is_stopping() {
            return Err(ResetError::Stopping);
        }
        let mut devices = lock(&self.devices);
        devices.pause();
        self.control.begin_reset();
        if let Err(e) = devices.reset() {
            return Err(self.fail(ResetError::IrqChip(e)));
        }
        match describe_and_load(&self.reload.config, &self.reload.memory) {
            Ok(boot) => *lock(&self.reload.boot) = boot,
            Err(e) => return Err(self.fail(ResetError::Reload(Box::new(e)))),
        }
        if !self.control.reset_vcpus(self.vcpus) {
            return Err(ResetError::Stopping);
        }
        if !was_paused {
            devices.resume();
            drop(devices);
            self.control.resume_vcpus();
        }
        log::debug!("machine reset by the control API");
        Ok(())
    }

    /// Stops the machine for a reset that could not finish.
    fn fail(&self, error: ResetError) -> ResetError {
        self.stop(StopReason::Fatal(format!("machine reset: {error}")));
        error
    }

    pub fn is_paused(&self) -> bool {
        self.control.pause_requested()
    }

    /// Stops the machine as a signal would (`xhyve` then exits with that signal's code).
    pub fn stop(&self, reason: StopReason) {
        self.control.stop(reason);
        self.control.kick_all();
    }
}

impl super::control::Lifecycle for MachineHandle {
    fn pause(&self) {
        MachineHandle::pause(self)
    }
    fn resume(&self) {
        MachineHandle::resume(self)
    }
    fn is_paused(&self) -> bool {
        MachineHandle::is_paused(self)
    }
    fn is_stopping(&self) -> bool {
        self.control.is_stopping()
    }
    fn reset(&self) -> Result<(), ResetError> {
        MachineHandle::reset(self)
    }
    fn stop_now(&self, reason: StopReason) {
        self.stop(reason)
    }
}

/// Builds and runs the machine; returns the process exit code.
pub fn run(config: &VmConfig) -> Result<i32, VmmError> {
    run_with(config, |_| {})
}

/// As [`run`], calling `started` with the machine's handle once its vCPUs run (a control
/// API keeps it to pause, resume and stop the machine).
pub fn run_with(config: &VmConfig, started: impl FnOnce(MachineHandle)) -> Result<i32, VmmError> {
    // First: a stop signal during a setup step that blocks must still end the process.
    signals::start().map_err(VmmError::Thread)?;
    let hypervisor = hv::platform_hypervisor()?;
    let pins = check_pins(config)?;
    let memory_error = |reason: String| VmmError::GuestMemory {
        size: size_text(config.memory_bytes),
        reason,
    };
    let guest_memory = memory::create_guest_memory(config.memory_bytes)
        .map_err(|e| memory_error(e.to_string()))?;
    for region in guest_memory.iter() {
        host::prefer_huge_pages(region.as_ptr(), region.len() as usize);
        if !config.dump_guest_memory {
            host::exclude_from_core_dumps(region.as_ptr(), region.len() as usize);
        }
    }

    let irqchip = config.host.irqchip;
    let options = VmOptions {
        vcpus: config.vcpus,
        irqchip,
        user_msr_exits: config.ignore_unknown_msrs,
        pause_exits: config.pause_exit,
    };
    let vm = hypervisor.create_vm(&options)?;
    map_guest_memory(vm.as_ref(), &guest_memory).map_err(|e| memory_error(e.to_string()))?;

    if let Some(path) = &config.pidfile {
        pidfile::create(path)?;
    }
    let (control, woken) = Control::new(config.vcpus);
    let mut devices = DeviceManager::new(config, &vm, &guest_memory, &control)?;
    let boot = describe_and_load(config, &guest_memory)?;

    let supported = hypervisor.supported_cpuid()?;
    let mut policy = CpuidPolicy::new(config.vcpus, config.x2apic);
    policy.hypervisor_lapic = irqchip == IrqChipMode::Kernel;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&policy.apply(&supported, id))?;
        if id == 0 {
            vcpu.set_sregs(&boot.sregs)?;
            vcpu.set_regs(&boot.regs)?;
        }
        // After the segment registers, whose APIC base the MSRs then refine (x2APIC, -x).
        vcpu.set_msrs(&crate::arch::x86_64::msrs::boot_msrs(id, config.x2apic))?;
        vcpus.push(vcpu);
    }

    let power_button = devices.take_power_button();
    let boot = Arc::new(Mutex::new(boot));
    let ctx = Arc::new(VcpuContext {
        io_bus: devices.io_bus().clone(),
        mmio_bus: devices.mmio_bus().clone(),
        control: control.clone(),
        memory: guest_memory.clone(),
        strict_io: config.strict_io,
        ignore_unknown_msrs: config.ignore_unknown_msrs,
        pins,
        user_irqchip: devices.user_irqchip().cloned(),
        boot: boot.clone(),
        x2apic: config.x2apic,
    });
    let devices = Arc::new(Mutex::new(devices));
    let handle = MachineHandle {
        control: control.clone(),
        devices: devices.clone(),
        vcpus: config.vcpus,
        reload: Arc::new(Reload {
            config: config.clone(),
            memory: guest_memory.clone(),
            boot,
        }),
        lifecycle: Arc::default(),
    };
    // Before the vCPUs run: from here on signals and the API act on the machine.
    signals::arm(Arc::new(handle.clone()), power_button.clone());
    if let Some(endpoint) = &config.restful_uri {
        let api = super::rest::Api {
            machine: Arc::new(handle.clone()),
            power_button,
            inspect: super::rest::inspect(config),
        };
        super::rest::start(endpoint, api)?;
    }
    let threads = start_vcpus(vcpus, &ctx)?;
    started(handle);

    loop {
        match woken.recv_timeout(HALT_POLL_INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                // In user mode the vCPU threads see HLT themselves (UserIrqChip::halt).
                // A paused vCPU answers no poll.
                if irqchip == IrqChipMode::Kernel
                    && !control.pause_requested()
                    && control.poll_all_halted(HALT_POLL_ANSWER)
                {
                    control.stop(StopReason::Guest(crate::devices::power::PowerEvent::Halt));
                }
            }
        }
        if control.is_stopping() {
            break;
        }
    }
    stop_vcpus(&control, threads);
    log::debug!(
        "instructions xhyve completed for the hypervisor: {}",
        crate::arch::x86_64::emulate::complete::COMPLETIONS.summary()
    );
    let reason = control
        .stop_reason()
        .unwrap_or(StopReason::Fatal("stopped for no recorded reason".into()));
    if let StopReason::Fatal(message) = &reason {
        eprintln!("xhyve: {message}");
    }
    // The devices' threads stop before the VM goes: none outlives the machine. The device
    // manager itself stays reachable from the signal and API threads, so dropping it is not
    // enough: each device is told.
    lock(&devices).shutdown();
    drop(ctx);
    drop(devices);
    drop(vm);
    Ok(reason.exit_code(config.personality))
}

/// A byte count as `-m` would take it: the largest binary unit that divides it (`60T`, `512M`).
fn size_text(bytes: u64) -> String {
    for (shift, unit) in [(50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Writes the firmware tables that describe the machine, then loads the guest.
fn describe_and_load(
    config: &VmConfig,
    mem: &GuestMemory,
) -> Result<crate::arch::x86_64::boot::BootSetup, VmmError> {
    use crate::arch::x86_64::{boot, tables};
    let description = tables::MachineDescription {
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes,
        uuid: config.uuid,
        pci_intx: config
            .devices
            .iter()
            .flat_map(|d| {
                (0..4).map(move |pin| tables::PciIntxRoute {
                    bus: d.address.bus,
                    slot: d.address.slot,
                    pin,
                    gsi: crate::devices::pci::intx_gsi(d.address.slot, pin),
                })
            })
            .collect(),
        lpc_slot: config.lpc_slot(),
        com1: config.com1.is_some(),
        com2: config.com2.is_some(),
        hpet: true,
    };
    if config.mptable {
        tables::write_mptable(mem, &description)?;
    }
    tables::write_smbios(mem, &description)?;
    let rsdp = if config.acpi {
        Some(tables::write_acpi(mem, &description)?)
    } else {
        None
    };
    Ok(boot::load(
        mem,
        &config.firmware,
        config.memory_bytes,
        rsdp,
    )?)
}

/// Kicks every vCPU until its thread has left the run loop, then joins it.
fn stop_vcpus(control: &Control, threads: Vec<std::thread::JoinHandle<()>>) {
    while threads.iter().any(|t| !t.is_finished()) {
        control.kick_all();
        std::thread::sleep(Duration::from_millis(5));
    }
    for t in threads {
        if t.join().is_err() {
            control.stop(StopReason::Fatal("a vCPU thread panicked".into()));
        }
    }
}

fn start_vcpus(
    vcpus: Vec<Box<dyn Vcpu>>,
    ctx: &Arc<VcpuContext>,
) -> Result<Vec<std::thread::JoinHandle<()>>, VmmError> {
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let ctx = ctx.clone();
        let name = format!("vcpu{}", vcpu.id());
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || super::vcpu::run(vcpu, ctx))
            .map_err(VmmError::Thread)?;
        threads.push(handle);
    }
    Ok(threads)
}

fn map_guest_memory(vm: &dyn Vm, mem: &GuestMemory) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: the regions are owned by `mem`, which the caller keeps alive (cloned into
        // every vCPU context) until after the VM is dropped.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                region.as_ptr(),
            )?;
        }
    }
    Ok(())
}

/// Checks `-p` against the host CPUs this process may run on; returns the pin per vCPU id.
fn check_pins(config: &VmConfig) -> Result<Vec<Option<u32>>, VmmError> {
    let mut pins = vec![None; usize::from(config.vcpus)];
    for pin in &config.cpu_pins {
        if !host::cpu_available(pin.host_cpu) {
            return Err(VmmError::BadPin {
                vcpu: pin.vcpu,
                host_cpu: pin.host_cpu,
            });
        }
        if let Some(slot) = pins.get_mut(usize::from(pin.vcpu)) {
            *slot = Some(pin.host_cpu);
        }
    }
    Ok(pins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_m_takes_them() {
        assert_eq!(size_text(60 << 40), "60T");
        assert_eq!(size_text(1536 << 20), "1536M");
        assert_eq!(size_text(1 << 30), "1G");
        assert_eq!(size_text(4097), "4097");
    }
}
