//! The macOS back end: Hypervisor.framework's Intel VMX interface.
//!
//! Everything here but the framework calls is portable and unit-tested on Linux: `ffi` holds
//! our declarations of the framework, `vmcs` the [`vmcs::Vmcs`] access trait and its model,
//! `controls` the VM-execution controls derived from the capability MSRs, `vmx` the exit
//! handler (xhyve's `vmm/intel/vmx.c`) that the back end's run loop drives, `ram` the
//! guest-RAM table that loop reads through and `host_cpuid` the CPUID leaves guests start
//! from. The instruction emulator and page walk are shared: `crate::arch::x86_64::emulate`. `backend` (macOS only) is the `Hypervisor`/`Vm`/`Vcpu`
//! implementation over the framework.

pub mod controls;
pub mod ffi;
pub mod host_cpuid;
pub mod ram;
pub mod vmcs;
pub mod vmx;

/// The framework calls themselves: only a Mac can link them.
#[cfg(target_os = "macos")]
mod backend;
#[cfg(target_os = "macos")]
pub use backend::{Hvf, HvfVcpu, HvfVm};
