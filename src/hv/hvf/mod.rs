//! The macOS back end: Hypervisor.framework's Intel VMX interface.
//!
//! Everything here but the framework calls is portable and unit-tested on Linux: `ffi` holds
//! our declarations of the framework, `vmcs` the [`vmcs::Vmcs`] access trait and its model,
//! `controls` the VM-execution controls derived from the capability MSRs, `emulate` the MMIO
//! instruction emulator, and `vmx` the exit handler (xhyve's `vmm/intel/vmx.c`) that the back
//! end's run loop drives.

pub mod controls;
pub mod emulate;
pub mod ffi;
pub mod vmcs;
pub mod vmx;
