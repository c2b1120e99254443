//! Signals, handled on a thread of their own with `sigwait`, so that every one leaves a clean
//! state: the pidfile removed, the terminal restored, the `autopty=` links removed.
//!
//! - SIGTERM presses the ACPI power button when the guest enabled ACPI (`-A`, and the guest
//!   wrote ACPI_ENABLE to SMI_CMD), as xhyve; otherwise, and on a second SIGTERM, it stops at
//!   once. SIGINT and SIGHUP stop at once. Exit code 1.
//! - SIGUSR1 pauses the machine and SIGUSR2 resumes it, as HyperKit.
//! - Every other signal whose default action ends the process and that another process can
//!   send (SIGQUIT, SIGALRM, SIGVTALRM, SIGPROF, SIGXCPU, SIGXFSZ, and on Linux SIGIO,
//!   SIGPWR, SIGSTKFLT; SIGEMT on macOS) stops at once with exit code 128 + its number.
//! - SIGPIPE is ignored, as HyperKit: a console or socket whose reader left gets EPIPE instead.
//!
//! - The fault signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGABRT, SIGSYS) go to the
//!   faulting thread whatever the mask says, so they get an ordinary handler instead: it does
//!   only async-signal-safe cleanup (restore the terminal, unlink the files registered with
//!   [`remove_at_crash`]), then lets the signal end the process as it would have (core dump
//!   included).
//!
//! Not covered: SIGKILL and SIGSTOP, which no process can catch.
//!
//! The thread starts first thing in [`super::run`], before any setup step that can block
//! (a FIFO given as kernel, a hung network file system): a stop signal during setup cleans up
//! and exits at once. Once the machine runs, [`arm`] hands the thread the machine's controls.

use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use super::control::Lifecycle;
use super::exit::{self, StopReason};
use crate::devices::power_mgmt::PowerButton;

/// Stop the machine, exit code 1.
const STOP: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Stop the machine, exit code 128 + the signal.
#[cfg(target_os = "linux")]
const OTHER_TERMINATING: &[libc::c_int] = &[
    libc::SIGQUIT,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGIO,
    libc::SIGPWR,
    libc::SIGSTKFLT,
];
#[cfg(not(target_os = "linux"))]
const OTHER_TERMINATING: &[libc::c_int] = &[
    libc::SIGQUIT,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
    libc::SIGEMT,
];

/// Every signal the thread waits for.
fn handled() -> impl Iterator<Item = libc::c_int> {
    STOP.into_iter()
        .chain([libc::SIGUSR1, libc::SIGUSR2])
        .chain(OTHER_TERMINATING.iter().copied())
}

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in handled() {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Signals that report a fault of this process (or that another process sent in its name).
const FAULTS: [libc::c_int; 7] = [
    libc::SIGSEGV,
    libc::SIGBUS,
    libc::SIGILL,
    libc::SIGFPE,
    libc::SIGTRAP,
    libc::SIGABRT,
    libc::SIGSYS,
];

/// Files a crash must not leave behind (pidfile, `autopty=` links, the API socket), as C
/// strings prepared in advance: a fault handler may not allocate or lock.
static CRASH_FILES: [OnceLock<CString>; 8] = [const { OnceLock::new() }; 8];

/// Registers `path` to be unlinked if the process dies of a fault signal. Quietly ignores
/// paths past the eighth (the machine makes at most four such files).
pub fn remove_at_crash(path: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    let mut c_path = c_path;
    for slot in &CRASH_FILES {
        match slot.set(c_path) {
            Ok(()) => return,
            Err(back) => c_path = back,
        }
    }
}

extern "C" fn on_fault(sig: libc::c_int) {
    crate::devices::terminal::restore_terminal();
    for slot in &CRASH_FILES {
        if let Some(path) = slot.get() {
            // SAFETY: unlink is async-signal-safe; `path` is a NUL-terminated string that
            // lives for the whole process.
            unsafe { libc::unlink(path.as_ptr()) };
        }
    }
    // SA_RESETHAND restored the default action: raising again ends the process as the
    // fault would have. SAFETY: raise is async-signal-safe.
    unsafe { libc::raise(sig) };
}

fn install_fault_handlers() {
    for sig in FAULTS {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler only calls
        // async-signal-safe functions; SA_RESETHAND makes it run once per signal.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESETHAND | libc::SA_NODEFER;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(sig, &action, std::ptr::null_mut());
        }
    }
}

/// What the thread acts on once the machine runs.
struct Armed {
    machine: Arc<dyn Lifecycle>,
    /// Pause (true) and resume (false) requests, run in order on a thread of their own: a
    /// pause waits until the machine is quiet, and the signal thread must stay free for a
    /// SIGTERM meanwhile (which also ends a pause that cannot complete).
    pauser: Option<crossbeam_channel::Sender<bool>>,
    power_button: Option<Arc<dyn PowerButton>>,
    pressed: bool,
}

static ARMED: Mutex<Option<Armed>> = Mutex::new(None);

/// Blocks the handled signals in the calling thread and every thread it creates later, so
/// that only the signal thread receives them, ignores SIGPIPE, and starts the signal thread.
/// Call before any other thread starts and before any setup step that can block.
pub fn start() -> std::io::Result<()> {
    let set = handled_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    install_fault_handlers();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is initialised and `sig` is a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                handle(sig);
            }
        })
        .map(|_| ())
}

/// Hands the signal thread the running machine. `power_button` is `None` without `-A`.
pub fn arm(machine: Arc<dyn Lifecycle>, power_button: Option<Arc<dyn PowerButton>>) {
    let (pauser, requests) = crossbeam_channel::unbounded::<bool>();
    let worker = machine.clone();
    let started = std::thread::Builder::new()
        .name("pause".into())
        .spawn(move || {
            for pause in requests {
                if pause {
                    worker.pause();
                } else {
                    worker.resume();
                }
            }
        });
    if let Err(e) = &started {
        log::warn!("SIGUSR1/SIGUSR2 will be ignored: cannot start the pause thread: {e}");
    }
    *ARMED.lock().unwrap_or_else(|p| p.into_inner()) = Some(Armed {
        pauser: started.ok().map(|_| pauser),
        machine,
        power_button,
        pressed: false,
    });
}

/// What one signal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    PressPowerButton,
    Stop,
    Pause,
    Resume,
}

/// The action for `sig`, given whether the guest can take the power button and whether it
/// was pressed already.
fn action(sig: libc::c_int, has_button: bool, pressed: bool) -> Action {
    match sig {
        libc::SIGTERM if has_button && !pressed => Action::PressPowerButton,
        libc::SIGUSR1 => Action::Pause,
        libc::SIGUSR2 => Action::Resume,
        _ => Action::Stop,
    }
}

fn handle(sig: libc::c_int) {
    let mut armed = ARMED.lock().unwrap_or_else(|p| p.into_inner());
    let Some(armed) = armed.as_mut() else {
        // Still setting up: nothing to pause; anything else ends the process now, cleanly.
        if sig != libc::SIGUSR1 && sig != libc::SIGUSR2 {
            super::cleanup();
            std::process::exit(exit::signal_exit_code(sig));
        }
        return;
    };
    let todo = action(sig, armed.power_button.is_some(), armed.pressed);
    match todo {
        Action::PressPowerButton => {
            armed.pressed = true;
            let seen = armed.power_button.as_ref().is_some_and(|b| b.press());
            if !seen {
                // The guest has not enabled ACPI: nothing would ever answer the button.
                armed.machine.stop_now(StopReason::Signal(sig));
            }
        }
        Action::Stop => armed.machine.stop_now(StopReason::Signal(sig)),
        Action::Pause | Action::Resume => {
            if let Some(pauser) = &armed.pauser {
                let _ = pauser.send(todo == Action::Pause);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigterm_presses_once_then_stops() {
        assert_eq!(action(libc::SIGTERM, true, false), Action::PressPowerButton);
        assert_eq!(action(libc::SIGTERM, true, true), Action::Stop);
        assert_eq!(action(libc::SIGTERM, false, false), Action::Stop);
        assert_eq!(action(libc::SIGINT, true, false), Action::Stop);
        assert_eq!(action(libc::SIGQUIT, true, false), Action::Stop);
    }

    #[test]
    fn usr1_pauses_and_usr2_resumes() {
        assert_eq!(action(libc::SIGUSR1, false, false), Action::Pause);
        assert_eq!(action(libc::SIGUSR2, true, true), Action::Resume);
    }

    #[test]
    fn every_killing_signal_that_can_be_sent_is_handled() {
        let set: Vec<_> = handled().collect();
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
        ] {
            assert!(set.contains(&sig), "signal {sig} not handled");
        }
        assert!(!set.contains(&libc::SIGPIPE), "SIGPIPE is ignored instead");
    }
}
