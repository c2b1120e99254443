//! xhyve-compatible command-line parsing into a typed [`VmConfig`]. No I/O happens here.

mod config;
mod error;
mod firmware;
mod lpc;
mod memsize;
mod net;
mod parse;
mod pci;
mod usage;

pub use config::*;
pub use error::CliError;
pub use net::{
    first_nic, first_nic_mac, net_mac, parse_tap_options, parse_vmnet_options, tap_mac, TapOptions,
    VmnetOptions,
};
pub use parse::parse;
pub use usage::{usage, version_text};
