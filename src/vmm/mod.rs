//! The machine: memory, vCPU threads, the run loop, exit dispatch and exit codes.

pub mod memory;
