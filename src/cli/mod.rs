//! xhyve-compatible command-line parsing into a typed [`VmConfig`] (defined in
//! `crate::config`). No I/O happens here, and nothing else parses an option string.

mod error;
mod firmware;
mod lpc;
mod memsize;
mod parse;
mod pci;
mod rest_uri;
mod usage;

pub use crate::config::*;
pub use error::CliError;
pub use parse::{command, parse};
pub use usage::{usage, version_text, MAN_EXTRA_SECTIONS};

/// What the command line asks `xhyve` to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Boot a virtual machine.
    Run(Box<VmConfig>),
    /// `-h`: print usage to stderr and exit 0.
    Help,
    /// `-v`: print the version to stderr and exit 0.
    Version,
    /// `--completions SHELL` (hidden): print a completion script for bash, zsh or fish.
    Completions(String),
    /// `--manpage` (hidden): print the xhyve.1 man page (roff).
    Manpage,
}
