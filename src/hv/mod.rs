//! The hypervisor abstraction and its back ends.

pub mod regs;
