//! Why the machine stopped, and the process exit code xhyve uses for it.

use crate::devices::power::PowerEvent;

/// The reason `xhyve` stops. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset, powered off, halted or triple-faulted.
    Guest(PowerEvent),
    /// SIGINT, a second SIGTERM, or SIGTERM without ACPI.
    Signal(i32),
    /// The VMM could not emulate what the guest did; the message says what and where.
    Fatal(String),
}

/// xhyve's exit codes (DESIGN.md): reset 0, poweroff 1, halt 2, triple fault 3, stopped by a
/// signal 1, emulation failure 4.
pub const EXIT_RESET: i32 = 0;
pub const EXIT_POWEROFF: i32 = 1;
pub const EXIT_HALT: i32 = 2;
pub const EXIT_TRIPLE_FAULT: i32 = 3;
pub const EXIT_EMULATION_ERROR: i32 = 4;
pub const EXIT_SETUP_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 64;

impl StopReason {
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::Guest(PowerEvent::Reset) => EXIT_RESET,
            StopReason::Guest(PowerEvent::PowerOff) => EXIT_POWEROFF,
            StopReason::Guest(PowerEvent::Halt) => EXIT_HALT,
            StopReason::Guest(PowerEvent::TripleFault) => EXIT_TRIPLE_FAULT,
            StopReason::Signal(_) => EXIT_POWEROFF,
            StopReason::Fatal(_) => EXIT_EMULATION_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_xhyve() {
        assert_eq!(StopReason::Guest(PowerEvent::Reset).exit_code(), 0);
        assert_eq!(StopReason::Guest(PowerEvent::PowerOff).exit_code(), 1);
        assert_eq!(StopReason::Guest(PowerEvent::Halt).exit_code(), 2);
        assert_eq!(StopReason::Guest(PowerEvent::TripleFault).exit_code(), 3);
        assert_eq!(StopReason::Signal(libc::SIGINT).exit_code(), 1);
        assert_eq!(StopReason::Fatal("x".into()).exit_code(), 4);
    }
}
