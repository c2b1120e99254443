//! xhyve in Rust: a port of xhyve (FreeBSD bhyve on macOS) that runs on Linux KVM and on
//! macOS Hypervisor.framework.
//!
//! The map of the modules and the data flow (cli -> config -> device manager -> vmm -> hv
//! exit -> bus -> device) is `docs/ARCHITECTURE.md` in the repository. In short: `cli`
//! parses xhyve's command line into `config::VmConfig`; `device_manager` builds every device
//! from it; `vmm` runs the machine on `hv`, the hypervisor abstraction; `devices` holds the
//! emulated hardware, `block` and `net` their back ends, `intc` the interrupt controllers
//! the VMM emulates, `memory` guest RAM, and `arch` what is specific to x86_64.

pub mod arch;
pub mod block;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod fs;
pub mod hv;
pub mod intc;
pub mod memory;
pub mod net;
pub mod vmm;
pub mod vsock;
