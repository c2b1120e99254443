//! Kicking a vCPU out of KVM_RUN from another thread.
//!
//! The kicker sends a real-time signal to the vCPU's thread. The handler sets
//! `kvm_run.immediate_exit`, so a kick that lands just before KVM_RUN is not lost: KVM returns
//! EINTR at once instead of entering the guest.

use std::cell::Cell;
use std::ptr;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::hv::{HvError, VcpuKicker};

thread_local! {
    static THIS_THREAD_RUN: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    THIS_THREAD_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer was registered by this thread's vCPU and is cleared before the
            // vCPU (and its kvm_run mapping) is dropped; a volatile byte store is signal-safe.
            unsafe { ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

pub fn install_handler() -> Result<(), HvError> {
    register_signal_handler(kick_signal(), on_kick).map_err(|e| HvError::Ioctl {
        what: "sigaction(vCPU kick signal)",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })
}

pub struct ThreadKicker {
    thread: libc::pthread_t,
}

impl ThreadKicker {
    /// Registers `fd`'s kvm_run for kicks aimed at the calling thread.
    pub fn register(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        THIS_THREAD_RUN.with(|cell| cell.set(run));
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        ThreadKicker { thread }
    }
}

pub fn unregister(fd: &mut VcpuFd) {
    let run: *mut kvm_run = fd.get_kvm_run();
    THIS_THREAD_RUN.with(|cell| {
        if cell.get() == run {
            cell.set(ptr::null_mut());
        }
    });
}

impl VcpuKicker for ThreadKicker {
    fn kick(&self) {
        // SAFETY: the VMM joins vCPU threads only after its last kick, so the thread id is
        // still valid (a finished but unjoined thread can still be signalled harmlessly).
        unsafe { libc::pthread_kill(self.thread, kick_signal()) };
    }
}
