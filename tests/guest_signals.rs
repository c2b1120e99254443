//! Signals: SIGTERM presses the ACPI power button of a guest that enabled ACPI (`-A`);
//! otherwise, on a second SIGTERM, and on SIGINT or SIGHUP `xhyve` stops at once, cleanly
//! (pidfile removed), with exit code 1. Every other terminating signal stops cleanly with
//! 128 + its number; SIGUSR1 pauses and SIGUSR2 resumes; signals work during setup and while
//! the console's reader has stopped reading.

#[macro_use]
mod common;

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use common::{IrqChip, Vm};

fn pidfile_for(test: &str, mode: IrqChip) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "xhyve-signal-{test}-{}-{}",
        std::process::id(),
        mode.env_value()
    ));
    std::fs::create_dir_all(&dir).expect("create pidfile dir");
    let pidfile = dir.join("xhyve.pid");
    let _ = std::fs::remove_file(&pidfile);
    pidfile
}

guest_test!(sigterm_presses_the_acpi_power_button, |mode| {
    let mut vm = Vm::multiboot("powerbutton")
        .irqchip(mode)
        .args(["-A"])
        .spawn();
    vm.wait_for_line("ready");
    vm.signal(libc::SIGTERM);
    vm.finish()
        .assert_exit(1)
        .assert_line("power button pressed");
});

/// Runs the waiting guest, sends `signals` (with a pause between them), and checks that
/// `xhyve` exits 1 and removes its pidfile.
fn stops_cleanly(mode: IrqChip, test: &str, acpi: bool, signals: &[i32]) {
    stops_cleanly_with(mode, test, "wait-input", acpi, signals, 1)
}

fn stops_cleanly_with(
    mode: IrqChip,
    test: &str,
    guest: &str,
    acpi: bool,
    signals: &[i32],
    code: i32,
) {
    let pidfile = pidfile_for(test, mode);
    let mut args = vec!["-F".into(), pidfile.clone().into_os_string()];
    if acpi {
        args.push("-A".into());
    }
    let mut vm = Vm::multiboot(guest)
        .irqchip(mode)
        .args(args)
        .stdin_piped()
        .spawn();
    vm.wait_for_line("ready");
    assert!(
        pidfile.exists(),
        "pidfile {} while running",
        pidfile.display()
    );
    for (i, &signal) in signals.iter().enumerate() {
        if i > 0 {
            // The guest ignores the power button: xhyve must still be running here.
            thread::sleep(Duration::from_millis(300));
            assert!(!vm.has_exited(), "xhyve stopped before the last signal");
        }
        vm.signal(signal);
    }
    let outcome = vm.finish();
    outcome.assert_exit(code);
    assert!(!outcome.lines().any(|l| l.starts_with("got")), "{outcome}");
    assert!(
        !pidfile.exists(),
        "pidfile {} left behind",
        pidfile.display()
    );
    assert!(!outcome.stderr.contains("panicked"), "{outcome}");
}

guest_test!(sigterm_without_acpi_stops_at_once, |mode| stops_cleanly(
    mode,
    "term",
    false,
    &[libc::SIGTERM]
));

guest_test!(
    second_sigterm_stops_a_guest_that_ignores_the_button,
    |mode| stops_cleanly_with(
        mode,
        "term2",
        "acpi-wait",
        true,
        &[libc::SIGTERM, libc::SIGTERM],
        1
    )
);

// With -A but a guest that never enabled ACPI, nobody would see the button: stop at once.
guest_test!(
    sigterm_before_the_guest_enables_acpi_stops_at_once,
    |mode| stops_cleanly(mode, "term-noacpi", true, &[libc::SIGTERM])
);

// SIGQUIT, SIGALRM and the like used to kill xhyve with the pidfile left behind and the
// terminal raw; now each stops cleanly with 128 + the signal number.
guest_test!(other_terminating_signals_stop_cleanly, |mode| {
    for (name, sig) in [
        ("quit", libc::SIGQUIT),
        ("alrm", libc::SIGALRM),
        ("xcpu", libc::SIGXCPU),
    ] {
        stops_cleanly_with(mode, name, "wait-input", false, &[sig], 128 + sig);
    }
});

guest_test!(sigusr1_pauses_and_sigusr2_resumes, |mode| {
    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .stdin_piped()
        .spawn();
    vm.wait_for_line("ready");
    vm.signal(libc::SIGUSR1);
    thread::sleep(Duration::from_millis(300));
    vm.send(b"P");
    // Paused: the guest cannot read the byte.
    thread::sleep(Duration::from_millis(700));
    assert!(!vm.has_exited(), "SIGUSR1 ended xhyve");
    assert!(
        !vm.stdout_so_far().contains("got P"),
        "the guest ran while paused: {}",
        vm.stdout_so_far()
    );
    vm.signal(libc::SIGUSR2);
    vm.finish().assert_exit(1).assert_line("got P");
});

// A kernel that is a FIFO nobody writes blocks xhyve's setup in open(2); SIGTERM used to be
// blocked with no thread to take it (only SIGKILL worked).
guest_test!(sigterm_during_setup_stops, |mode| {
    let pidfile = pidfile_for("setup", mode);
    let fifo = pidfile.with_file_name("kernel.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let mut firmware = std::ffi::OsString::from("multiboot,");
    firmware.push(&fifo);
    let mut vm = Vm::with_firmware(firmware)
        .irqchip(mode)
        .args(["-F".into(), pidfile.clone().into_os_string()])
        .timeout(Duration::from_secs(20))
        .spawn();
    thread::sleep(Duration::from_millis(1500));
    assert!(!vm.has_exited(), "xhyve did not block on the FIFO");
    vm.signal(libc::SIGTERM);
    let outcome = vm.finish();
    outcome.assert_exit(1);
    assert!(!pidfile.exists(), "pidfile left behind");
    let _ = std::fs::remove_file(&fifo);
});

// With `-l com1,stdio` and a stdout pipe nobody reads, the vCPU used to block in write(2)
// holding the UART lock, retrying on EINTR for ever: SIGTERM could not stop xhyve.
guest_test!(sigterm_stops_a_guest_whose_console_nobody_reads, |mode| {
    let vm = Vm::multiboot("flood").irqchip(mode);
    let mut child = std::process::Command::new(common::xhyve_binary())
        .args(vm.command_line())
        .env("XHYVE_IRQCHIP", mode.env_value())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Long enough for the guest to fill the 64 KiB pipe.
    thread::sleep(Duration::from_secs(8));
    assert!(child.try_wait().unwrap().is_none(), "xhyve ended early");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("SIGTERM did not stop xhyve with its console blocked");
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1));
});

guest_test!(sigint_stops_at_once, |mode| stops_cleanly(
    mode,
    "int",
    true,
    &[libc::SIGINT]
));

guest_test!(sighup_stops_at_once, |mode| stops_cleanly(
    mode,
    "hup",
    false,
    &[libc::SIGHUP]
));

// A fault signal (here sent by another process, as a crash would raise it) used to leave the
// pidfile behind; now a handler removes it, then the signal ends xhyve as before.
guest_test!(a_fault_signal_still_removes_the_pidfile, |mode| {
    let pidfile = pidfile_for("segv", mode);
    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .args(["-F".into(), pidfile.clone().into_os_string()])
        .stdin_piped()
        .spawn();
    vm.wait_for_line("ready");
    assert!(pidfile.exists());
    vm.signal(libc::SIGSEGV);
    let outcome = vm.finish();
    assert_eq!(outcome.code, None, "ended by the signal: {outcome}");
    assert!(
        !pidfile.exists(),
        "pidfile {} left behind",
        pidfile.display()
    );
});

guest_test!(sigterm_stops_a_paused_machine, |mode| {
    let pidfile = pidfile_for("paused", mode);
    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .args(["-F".into(), pidfile.clone().into_os_string()])
        .stdin_piped()
        .spawn();
    vm.wait_for_line("ready");
    vm.signal(libc::SIGUSR1);
    thread::sleep(Duration::from_millis(300));
    assert!(!vm.has_exited(), "SIGUSR1 ended xhyve");
    vm.signal(libc::SIGTERM);
    vm.finish().assert_exit(1);
    assert!(!pidfile.exists(), "pidfile left behind");
});

/// How the run of [`terminal_is_raw_while_running_and_restored`] ends.
#[derive(Clone, Copy, Debug)]
enum TerminalExit {
    /// The guest reads the byte and powers off (exit 1).
    GuestPoweroff,
    /// A signal `xhyve` handles, with its exit code.
    Signal(i32, i32),
    /// A fault signal: the handler restores the terminal, then the signal ends the process.
    Fault(i32),
}

/// With a terminal on stdin (`-l com1,stdio`), `xhyve` puts it in cfmakeraw mode while it
/// runs, so bytes reach the guest unchanged (a CR stays a CR), and gives the user's settings
/// back however it ends.
fn terminal_is_raw_while_running_and_restored(mode: IrqChip, exit: TerminalExit) {
    use nix::sys::termios::{tcgetattr, LocalFlags, OutputFlags};
    use std::io::{Read, Write};
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    use std::sync::{Arc, Mutex};

    let pty = nix::pty::openpty(None, None).expect("openpty");
    let settings = |fd: &std::os::fd::OwnedFd| {
        let t = libc::termios::from(tcgetattr(fd).expect("tcgetattr"));
        (t.c_iflag, t.c_oflag, t.c_cflag, t.c_lflag, t.c_cc)
    };
    let original = settings(&pty.slave);
    let cooked = tcgetattr(&pty.slave).unwrap();
    assert!(cooked
        .local_flags
        .contains(LocalFlags::ICANON | LocalFlags::ECHO));
    assert!(cooked.output_flags.contains(OutputFlags::OPOST));

    let mut child = Command::new(common::xhyve_binary())
        .args(Vm::multiboot("wait-input").command_line())
        .env("XHYVE_IRQCHIP", mode.env_value())
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xhyve");
    let stdout = Arc::new(Mutex::new(String::new()));
    let mut pipe = child.stdout.take().unwrap();
    let sink = stdout.clone();
    let reader = thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n @ 1..) = pipe.read(&mut buf) {
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let deadline = std::time::Instant::now() + common::GUEST_TIMEOUT;
    while !stdout.lock().unwrap().contains("ready") {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().unwrap().is_none(),
            "no \"ready\" from the guest: {}",
            stdout.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let raw = tcgetattr(&pty.slave).unwrap();
    assert!(
        !raw.local_flags
            .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG),
        "stdin not raw while xhyve runs: {raw:?}"
    );
    assert!(!raw.output_flags.contains(OutputFlags::OPOST), "{raw:?}");

    let mut master = std::fs::File::from(pty.master);
    match exit {
        // A cooked terminal (ICRNL) would hand the guest LF, and hold it until a newline.
        TerminalExit::GuestPoweroff => master.write_all(b"\r").unwrap(),
        TerminalExit::Signal(sig, _) | TerminalExit::Fault(sig) => {
            // SAFETY: kill(2) on our own child, not yet reaped.
            assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        }
    }
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            panic!("xhyve did not exit ({exit:?})");
        }
        thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    let out = stdout.lock().unwrap().clone();
    match exit {
        TerminalExit::GuestPoweroff => {
            assert_eq!(status.code(), Some(1), "{out}{stderr}");
            assert!(out.contains("got \r\n"), "the guest got: {out:?}");
        }
        TerminalExit::Signal(_, code) => assert_eq!(status.code(), Some(code), "{stderr}"),
        TerminalExit::Fault(sig) => assert_eq!(status.signal(), Some(sig), "{stderr}"),
    }
    assert_eq!(
        settings(&pty.slave),
        original,
        "terminal settings not restored after {exit:?}"
    );
}

guest_test!(terminal_restored_after_guest_poweroff, |mode| {
    terminal_is_raw_while_running_and_restored(mode, TerminalExit::GuestPoweroff)
});

guest_test!(terminal_restored_after_signals, |mode| {
    for (sig, code) in [(libc::SIGTERM, 1), (libc::SIGQUIT, 128 + libc::SIGQUIT)] {
        terminal_is_raw_while_running_and_restored(mode, TerminalExit::Signal(sig, code));
    }
});

guest_test!(terminal_restored_after_a_fault, |mode| {
    // No core file from the fault we cause: the limit is inherited by xhyve.
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `none` is a valid rlimit; lowering the soft core limit affects only core dumps.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    terminal_is_raw_while_running_and_restored(mode, TerminalExit::Fault(libc::SIGSEGV));
});
