//! x86_64: xhyve's PC. The memory map ([`layout`]), the guest loaders ([`boot`]), the
//! ACPI/MP/SMBIOS tables ([`tables`]), the boot MSRs ([`msrs`]), the register file the
//! hypervisor trait speaks ([`regs`]) and the CPUID the guest sees ([`cpuid`]).
//!
//! [`emulate`] is the one x86 instruction emulator both back ends share.

pub mod boot;
pub mod cpuid;
pub mod emulate;
pub mod layout;
pub mod msrs;
pub mod regs;
pub mod tables;
