//! virtio-fs without an external daemon: the FUSE protocol as the Linux virtio-fs driver
//! speaks it ([`abi`]), served in process on the sandbox ([`server`]).
//!
//! Why not `fuse-backend-rs` (0.14, Apache-2.0 AND BSD-3-Clause, cloud-hypervisor org): its
//! passthrough file system is `cfg(target_os = "linux")` only (macOS gets just a FUSE client
//! for fuse-t), it pins `vm-memory = 0.17.1` and `virtio-queue 0.17` where we use 0.18 (two
//! copies, incompatible types at the device), and its lookups use `openat(O_NOFOLLOW)` with
//! the `openat2` path commented out ("TODO"). Our server is a small protocol layer over the
//! same confinement code as 9P, so both transports get one set of escape tests.

pub mod abi;
pub mod server;

pub use server::{Options, Server};

#[cfg(test)]
mod tests;
