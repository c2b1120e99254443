//! Why the machine stopped, and the process exit code xhyve uses for it.

use crate::cli::Personality;
use crate::devices::power::PowerEvent;

/// The reason `xhyve` stops. The first reason recorded wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest reset, powered off, halted or triple-faulted.
    Guest(PowerEvent),
    /// A signal stopped the machine: SIGTERM, SIGINT or SIGHUP (exit 1), or another signal
    /// whose default action would kill the process (exit 128 + its number).
    Signal(i32),
    /// The control API asked for it (`HardStop`): exit code 1, as a stop signal.
    Requested,
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

/// HyperKit's exit codes for the guest's own ends (its `hyperkit.c`): poweroff and halt 0,
/// reset 2, triple fault 3.
pub const HYPERKIT_EXIT_POWEROFF: i32 = 0;
pub const HYPERKIT_EXIT_HALT: i32 = 0;
pub const HYPERKIT_EXIT_RESET: i32 = 2;
/// Stopped by SIGTERM, SIGINT or SIGHUP (either personality).
pub const EXIT_SIGNAL: i32 = 1;

impl StopReason {
    /// The exit code for this reason under `personality` (xhyve's or HyperKit's table).
    pub fn exit_code(&self, personality: Personality) -> i32 {
        let hyperkit = personality == Personality::HyperKit;
        match self {
            StopReason::Guest(PowerEvent::Reset) if hyperkit => HYPERKIT_EXIT_RESET,
            StopReason::Guest(PowerEvent::PowerOff) if hyperkit => HYPERKIT_EXIT_POWEROFF,
            StopReason::Guest(PowerEvent::Halt) if hyperkit => HYPERKIT_EXIT_HALT,
            StopReason::Guest(PowerEvent::Reset) => EXIT_RESET,
            StopReason::Guest(PowerEvent::PowerOff) => EXIT_POWEROFF,
            StopReason::Guest(PowerEvent::Halt) => EXIT_HALT,
            StopReason::Guest(PowerEvent::TripleFault) => EXIT_TRIPLE_FAULT,
            StopReason::Signal(sig) => signal_exit_code(*sig),
            StopReason::Requested => EXIT_SIGNAL,
            StopReason::Fatal(_) => EXIT_EMULATION_ERROR,
        }
    }
}

/// 1 for the usual ways to stop a VM (TERM, INT, HUP), as xhyve's scripts expect; 128 plus
/// the signal number for any other terminating signal, the shell's convention, so the caller
/// can tell what hit it.
pub fn signal_exit_code(sig: i32) -> i32 {
    match sig {
        libc::SIGTERM | libc::SIGINT | libc::SIGHUP => EXIT_SIGNAL,
        other => 128 + other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_xhyve() {
        let code = |r: StopReason| r.exit_code(Personality::Xhyve);
        assert_eq!(code(StopReason::Guest(PowerEvent::Reset)), 0);
        assert_eq!(code(StopReason::Guest(PowerEvent::PowerOff)), 1);
        assert_eq!(code(StopReason::Guest(PowerEvent::Halt)), 2);
        assert_eq!(code(StopReason::Guest(PowerEvent::TripleFault)), 3);
        assert_eq!(code(StopReason::Signal(libc::SIGINT)), 1);
        assert_eq!(code(StopReason::Signal(libc::SIGQUIT)), 128 + 3);
        assert_eq!(code(StopReason::Fatal("x".into())), 4);
    }

    #[test]
    fn codes_match_hyperkit() {
        let code = |r: StopReason| r.exit_code(Personality::HyperKit);
        assert_eq!(code(StopReason::Guest(PowerEvent::Reset)), 2);
        assert_eq!(code(StopReason::Guest(PowerEvent::PowerOff)), 0);
        assert_eq!(code(StopReason::Guest(PowerEvent::Halt)), 0);
        assert_eq!(code(StopReason::Guest(PowerEvent::TripleFault)), 3);
        assert_eq!(code(StopReason::Signal(libc::SIGTERM)), 1);
        assert_eq!(code(StopReason::Fatal("x".into())), 4);
    }
}
