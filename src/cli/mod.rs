//! xhyve-compatible command-line parsing into a typed [`VmConfig`]. No I/O happens here.

mod config;

pub use config::*;
