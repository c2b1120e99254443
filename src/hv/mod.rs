//! The hypervisor abstraction and its back ends.
//!
//! Modelled on Cloud Hypervisor's `hypervisor` crate: a [`Hypervisor`] creates a [`Vm`], a `Vm`
//! creates [`Vcpu`]s, and [`Vcpu::run`] returns a [`VmExit`] that carries everything the VMM
//! needs to emulate the access (port, address, size, data). Back ends: `kvm` on Linux, `hvf`
//! (Hypervisor.framework) on macOS.

pub mod hvf;

/// The register file and CPUID entries the trait is written in belong to the architecture:
/// x86_64's today; an aarch64 build would re-export its own here. (The instruction emulator
/// and the fuzz targets still name them through `hv`.)
pub use crate::arch::x86_64::{cpuid, regs};

#[cfg(target_os = "linux")]
pub mod kvm;

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::arch::x86_64::emulate::complete::{CompleteError, Kind};
use crate::arch::x86_64::emulate::GuestRam;
use regs::{SpecialRegisters, StandardRegisters};

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the hypervisor lacks a required capability: {0}")]
    MissingCapability(&'static str),
    #[error("no hypervisor back end for this platform")]
    Unavailable,
}

/// How the machine's interrupt controllers and timers are provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqChipMode {
    /// The hypervisor emulates LAPIC, IOAPIC, PIC and PIT (KVM's in-kernel irqchip).
    Kernel,
    /// The VMM emulates them (`intc`), as on Hypervisor.framework.
    User,
}

/// Options fixed when the VM is created.
#[derive(Debug, Clone)]
pub struct VmOptions {
    pub vcpus: u8,
    pub irqchip: IrqChipMode,
    /// Route accesses to MSRs the hypervisor does not know to the VMM (`VmExit::MsrRead/Write`).
    pub user_msr_exits: bool,
    /// `-P`: a guest PAUSE leaves the guest (Hypervisor.framework; KVM decides itself).
    pub pause_exits: bool,
}

/// A hypervisor back end.
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    fn create_vm(&self, options: &VmOptions) -> Result<Arc<dyn Vm>, HvError>;
    /// The CPUID leaves the hypervisor can present to a guest, before any policy.
    fn supported_cpuid(&self) -> Result<Vec<cpuid::CpuidEntry>, HvError>;
}

/// One virtual machine.
pub trait Vm: Send + Sync {
    /// Maps host memory into the guest-physical address space.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped and writable for the life of the VM.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), HvError>;

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>, HvError>;

    /// A machine reset: the hypervisor's own interrupt controllers and timers (KVM's
    /// IOAPIC, 8259 pair and PIT with its in-kernel irqchip) back at their state at VM
    /// creation. Back ends with none (Hypervisor.framework, KVM in user-irqchip mode) have
    /// nothing to do: the VMM's `intc` models are reset by their owner.
    fn reset_irqchip(&self) -> Result<(), HvError> {
        Ok(())
    }

    /// Drives interrupt line `gsi` (IOAPIC pin, and PIC line for gsi < 16).
    fn set_irq_line(&self, gsi: u32, level: bool) -> Result<(), HvError>;

    /// Delivers a message-signalled interrupt.
    fn signal_msi(&self, address: u64, data: u32) -> Result<(), HvError>;

    /// Makes guest writes to `doorbell` signal the eventfd-like `fd` (one 8-byte counter
    /// increment per write) instead of exiting to the VMM. Back ends without this say
    /// `MissingCapability`, and the write keeps reaching the VMM as an exit.
    fn register_doorbell(&self, fd: RawFd, doorbell: Doorbell) -> Result<(), HvError> {
        let _ = (fd, doorbell);
        Err(HvError::MissingCapability("doorbell file descriptors"))
    }

    /// Undoes [`Vm::register_doorbell`] with the same arguments.
    fn unregister_doorbell(&self, fd: RawFd, doorbell: Doorbell) -> Result<(), HvError> {
        let _ = (fd, doorbell);
        Err(HvError::MissingCapability("doorbell file descriptors"))
    }

    /// Makes each 8-byte counter write to the eventfd-like `fd` raise `source` inside the
    /// hypervisor (KVM irqfd), so a device thread signals with one write(2) and no lock.
    /// Returns the route's number, which [`Vm::retarget_irqfd`] takes. Back ends without
    /// this say `MissingCapability`; the VMM keeps `set_irq_line` and `signal_msi` then.
    fn register_irqfd(&self, fd: RawFd, source: IrqfdSource) -> Result<u32, HvError> {
        let _ = (fd, source);
        Err(HvError::MissingCapability("interrupt file descriptors"))
    }

    /// Points the MSI route `route` (from [`Vm::register_irqfd`]) at another message.
    fn retarget_irqfd(&self, route: u32, address: u64, data: u32) -> Result<(), HvError> {
        let _ = (route, address, data);
        Err(HvError::MissingCapability("interrupt file descriptors"))
    }
}

/// What an interrupt file descriptor raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqfdSource {
    /// An edge on a GSI (IOAPIC pin, and PIC line below 16): raise, then lower.
    Edge { gsi: u32 },
    /// A message-signalled interrupt.
    Msi { address: u64, data: u32 },
}

/// A guest write the hypervisor turns into an event without a VM exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Doorbell {
    /// A 16-bit `out` to `port` whose value is `value` (the legacy virtio QUEUE_NOTIFY).
    Port16 { port: u16, value: u16 },
    /// A write of any size and value to `addr`.
    Mmio { addr: u64 },
}

/// Why `Vcpu::run` returned.
#[derive(Debug)]
pub enum VmExit<'a> {
    /// `in`: fill `data`. For string I/O, `data` holds `data.len() / size` elements.
    IoIn {
        port: u16,
        size: usize,
        data: &'a mut [u8],
    },
    /// `out` of `data` (`data.len() / size` elements for string I/O).
    IoOut {
        port: u16,
        size: usize,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// RDMSR of an MSR the hypervisor does not handle: set `value`, or `fault` for #GP.
    MsrRead {
        index: u32,
        value: &'a mut u64,
        fault: &'a mut u8,
    },
    /// WRMSR of an MSR the hypervisor does not handle: set `fault` for #GP.
    MsrWrite {
        index: u32,
        value: u64,
        fault: &'a mut u8,
    },
    Hlt,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// A kick (signal) interrupted the vCPU.
    Interrupted,
    IrqWindowOpen,
    /// The hypervisor could not run or emulate guest code ([`INTERNAL_ERROR_EMULATION`]: an
    /// instruction it cannot emulate, which [`Vcpu::complete_instruction`] may finish).
    InternalError {
        suberror: u32,
    },
    FailEntry {
        reason: u64,
    },
    /// A reset or shutdown reported by the hypervisor itself.
    SystemEvent(SystemEvent),
    Other {
        reason: u32,
    },
}

/// KVM_INTERNAL_ERROR_EMULATION: the suberror of an instruction the hypervisor cannot emulate.
pub const INTERNAL_ERROR_EMULATION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemEvent {
    Reset,
    Shutdown,
    Other(u32),
}

/// A signal-safe handle that makes a vCPU's `run()` return soon with `VmExit::Interrupted`.
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
}

/// One virtual CPU. Lives on its own thread.
pub trait Vcpu: Send {
    fn id(&self) -> u8;
    fn run(&mut self) -> Result<VmExit<'_>, HvError>;

    fn regs(&self) -> Result<StandardRegisters, HvError>;
    fn set_regs(&mut self, regs: &StandardRegisters) -> Result<(), HvError>;
    fn sregs(&self) -> Result<SpecialRegisters, HvError>;
    fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<(), HvError>;

    fn set_cpuid(&mut self, entries: &[cpuid::CpuidEntry]) -> Result<(), HvError>;

    /// A machine reset: the vCPU's power-on state (`regs::power_on_registers`: real mode at
    /// F000:FFF0), x87/SSE/AVX state initialised, no event pending or being injected, debug
    /// registers at their defaults, the hypervisor's LAPIC (if it runs one) as at creation.
    /// Where the hypervisor runs INIT/SIPI, vCPU 0 is runnable and the others wait for
    /// INIT/SIPI; otherwise the VMM's irqchip decides. The caller then writes the boot
    /// registers and MSRs, as at start. Call on the vCPU's own thread.
    fn reset(&mut self) -> Result<(), HvError>;

    /// Writes MSRs as (index, value) pairs.
    fn set_msrs(&mut self, msrs: &[(u32, u64)]) -> Result<(), HvError>;

    /// The guest's TSC: (rate in Hz, value now), for a VMM that turns TSC-deadline writes
    /// into clock time. `MissingCapability` where the back end cannot say.
    fn guest_tsc(&self) -> Result<(u64, u64), HvError> {
        Err(HvError::MissingCapability("guest TSC rate"))
    }

    /// Whether the vCPU is halted waiting for an interrupt, and whether it has started at all
    /// (an application processor waits for INIT/SIPI until then).
    fn run_state(&self) -> Result<RunState, HvError>;

    /// Guest-virtual to guest-physical translation in the current mode, for diagnostics.
    fn translate(&self, gva: u64) -> Result<Option<u64>, HvError>;

    /// Must be called on the thread that calls `run()`; the kicker interrupts that thread.
    fn kicker(&mut self) -> Result<Arc<dyn VcpuKicker>, HvError>;

    /// Clears a pending kick once the VMM has seen it.
    fn clear_kick(&mut self);

    // Interrupt injection for a VMM that emulates the interrupt controllers itself
    // (`IrqChipMode::User`; Hypervisor.framework always works this way).

    /// Whether the guest can take an external interrupt on the next entry (IF set, no
    /// interrupt shadow, nothing already queued), as of the last exit.
    fn ready_for_interrupt(&mut self) -> bool;
    /// Queues external interrupt `vector` for the next entry. Call only when
    /// `ready_for_interrupt` says so.
    fn inject_interrupt(&mut self, vector: u8) -> Result<(), HvError>;
    /// Queues an NMI for the next entry.
    fn inject_nmi(&mut self) -> Result<(), HvError>;
    /// Asks for a `VmExit::IrqWindowOpen` as soon as the guest can take an interrupt.
    fn request_interrupt_window(&mut self, on: bool);
    /// Whether the guest had interrupts enabled (RFLAGS.IF) at the last exit.
    fn interrupts_enabled(&mut self) -> bool;

    /// How many instructions the hypervisor has emulated for this vCPU (KVM's
    /// `insn_emulation` statistic), where it says.
    fn emulated_instructions(&self) -> Option<u64> {
        None
    }

    /// Completes, with the VMM's own emulator, the instruction at RIP that the hypervisor
    /// failed to emulate (KVM's emulation-failure exit); the vCPU then runs on. `ram` is the
    /// guest's RAM. On `Err` the vCPU is unchanged.
    fn complete_instruction(&mut self, ram: &dyn GuestRam) -> Result<Kind, CompleteError> {
        let _ = ram;
        Err(CompleteError::State(
            "this back end does not complete instructions",
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Waiting for INIT/SIPI: never started.
    WaitingForSipi,
    Running,
    Halted,
}

/// The name `XHYVE_HV` may give (checked once, in `config::HostSettings`): each platform has exactly one back end.
pub const BACKEND_NAME: &str = if cfg!(target_os = "macos") {
    "hvf"
} else {
    "kvm"
};

/// The hypervisor back end of this platform.
#[cfg(target_os = "linux")]
pub fn platform_hypervisor() -> Result<Box<dyn Hypervisor>, HvError> {
    Ok(Box::new(kvm::Kvm::new()?))
}

#[cfg(target_os = "macos")]
pub fn platform_hypervisor() -> Result<Box<dyn Hypervisor>, HvError> {
    Ok(Box::new(hvf::Hvf::new()?))
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn platform_hypervisor() -> Result<Box<dyn Hypervisor>, HvError> {
    Err(HvError::Unavailable)
}
