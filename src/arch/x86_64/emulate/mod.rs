//! One x86 instruction emulator for every back end (iced-x86 decodes).
//!
//! `mmio` carries out the instruction behind an MMIO access (Hypervisor.framework's EPT
//! violations); `paging` walks the guest's page tables and fetches instruction bytes;
//! `complete` finishes, in the VMM, an instruction the hypervisor itself failed to emulate
//! (this host's KVM: `int3`, `xsave`, `popcnt`, ...).

pub mod complete;
pub mod mmio;
pub mod paging;

pub use mmio::{emulate, CpuMode, EmulateError, Emulated, EmulatorContext, InstructionBytes};
pub use paging::{fetch, GuestRam, Paging};
