//! Termination signals, handled on a thread of their own with `sigwait`.
//!
//! SIGTERM presses the ACPI power button when the guest has ACPI (`-A`), so a guest can shut
//! down cleanly; a second SIGTERM, SIGTERM without ACPI, SIGINT and SIGHUP stop at once.

use std::sync::Arc;

use super::control::Control;
use super::exit::StopReason;

const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in HANDLED {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks the termination signals in the calling thread and every thread it creates later, so
/// that only the signal thread receives them. Call before any other thread starts. Also
/// ignores SIGPIPE: a closed console must not kill the VM (writes then fail with EPIPE).
pub fn block_termination_signals() {
    let set = handled_set();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// Starts the signal thread. `power_button` presses the guest's ACPI power button, when it
/// has one.
pub fn spawn(
    control: Arc<Control>,
    power_button: Option<Box<dyn Fn() + Send>>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = handled_set();
            let mut pressed = false;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match (&power_button, sig, pressed) {
                    (Some(press), libc::SIGTERM, false) => {
                        pressed = true;
                        press();
                    }
                    _ => {
                        control.stop(StopReason::Signal(sig));
                        control.kick_all();
                    }
                }
            }
        })
        .map(|_| ())
}
