//! The machine: memory, vCPU threads, the run loop, exit dispatch and exit codes.

pub mod control;
pub mod diagnostics;
#[cfg(target_os = "linux")]
pub mod doorbells;
pub mod exit;
mod host;
pub mod interrupts;
mod machine;
pub mod pidfile;
pub mod rest;
pub mod signals;
pub mod timers;
pub mod user_irqchip;
pub mod vcpu;

pub use machine::{run, run_with, MachineHandle, VmmError};

/// Undoes what the process changed outside itself: the pidfile and the terminal mode.
/// Called on every exit path, including fatal ones.
pub fn cleanup() {
    crate::devices::terminal::restore_terminal();
    crate::devices::terminal::remove_links();
    rest::remove_socket();
    pidfile::remove();
}

/// Turns a Rust panic anywhere into a clear one-line error and exit code 4, after cleanup,
/// instead of Rust's panic message and an unwinding thread.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        cleanup();
        eprintln!("xhyve: internal error: {what}{place}");
        std::process::exit(exit::EXIT_EMULATION_ERROR);
    }));
}
