//! Builds the machine from a `VmConfig` and runs it to the end.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::control::Control;
use super::exit::StopReason;
use super::memory::{self, GuestMemory};
use super::vcpu::VcpuContext;
use super::{host, pidfile, signals};
use crate::cli::VmConfig;
use crate::hv::cpuid::CpuidPolicy;
use crate::hv::{self, HvError, IrqChipMode, Vcpu, Vm, VmOptions};

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
    #[error("{0}")]
    Setup(String),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// Builds and runs the machine; returns the process exit code.
pub fn run(config: &VmConfig) -> Result<i32, VmmError> {
    signals::block_termination_signals();
    let hypervisor = hv::default_hypervisor()?;
    let pins = check_pins(config)?;
    let guest_memory = memory::create_guest_memory(config.memory_bytes)?;
    for region in guest_memory.iter() {
        host::prefer_huge_pages(region.as_ptr(), region.len() as usize);
        if !config.dump_guest_memory {
            host::exclude_from_core_dumps(region.as_ptr(), region.len() as usize);
        }
    }

    let irqchip = irqchip_mode()?;
    let options = VmOptions {
        vcpus: config.vcpus,
        irqchip,
        user_msr_exits: config.ignore_unknown_msrs,
        pause_exits: config.pause_exit,
    };
    let vm = hypervisor.create_vm(&options)?;
    map_guest_memory(vm.as_ref(), &guest_memory)?;

    if let Some(path) = &config.pidfile {
        pidfile::create(path)?;
    }
    let (control, woken) = Control::new(config.vcpus);
    let platform = super::platform::build(config, &vm, &guest_memory, &control, irqchip)?;

    let supported = hypervisor.supported_cpuid()?;
    let policy = CpuidPolicy::new(config.vcpus, config.x2apic);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let mut vcpu = vm.create_vcpu(id)?;
        vcpu.set_cpuid(&policy.apply(&supported, id))?;
        if id == 0 {
            vcpu.set_sregs(&platform.boot.sregs)?;
            vcpu.set_regs(&platform.boot.regs)?;
        }
        // After the segment registers, whose APIC base the MSRs then refine (x2APIC, -x).
        vcpu.set_msrs(&boot_msrs(id, config.x2apic))?;
        vcpus.push(vcpu);
    }

    let _serial_ports = platform.serial_ports;
    signals::spawn(control.clone(), platform.power_button).map_err(VmmError::Thread)?;
    let ctx = Arc::new(VcpuContext {
        io_bus: platform.io_bus,
        mmio_bus: platform.mmio_bus,
        control: control.clone(),
        memory: guest_memory.clone(),
        strict_io: config.strict_io,
        ignore_unknown_msrs: config.ignore_unknown_msrs,
        pins,
        user_irqchip: platform.user_irqchip,
    });
    let threads = start_vcpus(vcpus, &ctx)?;

    loop {
        match woken.recv_timeout(HALT_POLL_INTERVAL) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
            Err(RecvTimeoutError::Timeout) => {
                // In user mode the vCPU threads see HLT themselves (UserIrqChip::halt).
                if irqchip == IrqChipMode::Kernel && control.poll_all_halted(HALT_POLL_ANSWER) {
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
    drop(vm);
    Ok(reason.exit_code())
}

/// `XHYVE_IRQCHIP`: who emulates the interrupt controllers; the in-kernel irqchip unless
/// told otherwise. Hypervisor.framework has none, so macOS always uses the VMM's own.
fn irqchip_mode() -> Result<IrqChipMode, VmmError> {
    let value = std::env::var("XHYVE_IRQCHIP").unwrap_or_default();
    parse_irqchip_mode(&value, cfg!(target_os = "macos"))
}

fn parse_irqchip_mode(value: &str, user_only: bool) -> Result<IrqChipMode, VmmError> {
    match value {
        "" if user_only => Ok(IrqChipMode::User),
        "kernel" if user_only => Err(VmmError::Setup(
            "invalid XHYVE_IRQCHIP \"kernel\": Hypervisor.framework has no in-kernel irqchip; \
             expected user"
                .into(),
        )),
        "" | "kernel" => Ok(IrqChipMode::Kernel),
        "user" => Ok(IrqChipMode::User),
        other => Err(VmmError::Setup(format!(
            "invalid XHYVE_IRQCHIP \"{other}\": expected kernel or user"
        ))),
    }
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

const MSR_IA32_APIC_BASE: u32 = 0x1b;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSRs as firmware leaves them at boot: fast strings on, MTRRs on with write-back default,
/// syscall MSRs clear, and the APIC base (in x2APIC mode with `-x`).
fn boot_msrs(id: u8, x2apic: bool) -> Vec<(u32, u64)> {
    let mut apic_base = memory::LAPIC_BASE | (1 << 11);
    if id == 0 {
        apic_base |= 1 << 8;
    }
    if x2apic {
        apic_base |= 1 << 10;
    }
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
        (MSR_IA32_APIC_BASE, apic_base),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irqchip_mode_names() {
        assert_eq!(
            parse_irqchip_mode("kernel", false).unwrap(),
            IrqChipMode::Kernel
        );
        assert_eq!(parse_irqchip_mode("", false).unwrap(), IrqChipMode::Kernel);
        assert_eq!(
            parse_irqchip_mode("user", false).unwrap(),
            IrqChipMode::User
        );
        let err = parse_irqchip_mode("usr", false).unwrap_err().to_string();
        assert!(err.contains("\"usr\""), "{err}");
    }

    #[test]
    fn irqchip_is_always_the_vmms_on_macos() {
        assert_eq!(parse_irqchip_mode("", true).unwrap(), IrqChipMode::User);
        assert_eq!(parse_irqchip_mode("user", true).unwrap(), IrqChipMode::User);
        let err = parse_irqchip_mode("kernel", true).unwrap_err().to_string();
        assert!(err.contains("no in-kernel irqchip"), "{err}");
        assert!(parse_irqchip_mode("usr", true).is_err());
    }

    #[test]
    fn apic_base_marks_the_bsp_and_x2apic() {
        let base = |id, x2| {
            boot_msrs(id, x2)
                .into_iter()
                .find(|&(i, _)| i == MSR_IA32_APIC_BASE)
                .unwrap()
                .1
        };
        assert_eq!(base(0, false), 0xfee0_0900);
        assert_eq!(base(1, false), 0xfee0_0800);
        assert_eq!(base(0, true), 0xfee0_0d00);
    }
}
