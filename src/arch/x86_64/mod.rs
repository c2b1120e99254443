//! x86_64: xhyve's PC. The memory map ([`layout`]), the guest loaders ([`boot`]), the
//! ACPI/MP/SMBIOS tables ([`tables`]), the boot MSRs ([`msrs`]), and — re-exported, since
//! the hypervisor back ends share them — the register file and the CPUID policy.
//!
//! [`emulate`] is the one x86 instruction emulator both back ends share.

pub mod boot;
pub mod emulate;
pub mod layout;
pub mod msrs;
pub mod tables;

/// The CPUID table a guest sees.
pub use crate::hv::cpuid;
/// The portable x86 register file the hypervisor trait speaks (kept in `hv`, which both
/// back ends build against).
pub use crate::hv::regs;
