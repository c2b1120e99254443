//! The macOS Hypervisor.framework back end. Everything portable here compiles and is tested
//! on every target; only the framework calls are macOS-only.

pub mod emulate;
