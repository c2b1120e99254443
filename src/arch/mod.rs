//! What depends on the guest's instruction set: the memory map, boot protocols, firmware
//! tables, the register file, CPUID and MSRs, and the interrupt-controller choice.
//!
//! Only x86_64 exists today. An aarch64 back end (Apple silicon) gets `arch/aarch64/` beside
//! it, with its GIC, FDT and PL011 choices; the layers above reach the architecture only
//! through this module.

pub mod x86_64;
