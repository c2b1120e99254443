//! xhyve in Rust: a port of xhyve (FreeBSD bhyve on macOS) that runs on Linux KVM and on
//! macOS Hypervisor.framework.
//!
//! Layers, each a module (see DESIGN.md): `cli` parses xhyve's command line into a typed
//! config; `vmm` builds and runs the machine; `hv` abstracts the hypervisor; `devices` holds
//! the emulated hardware; `boot` loads guests; `tables` describes the machine to them.

pub mod arch;
pub mod block;
pub mod boot;
pub mod cli;
pub mod devices;
pub mod hv;
pub mod intc;
pub mod net;
pub mod tables;
pub mod vmm;
