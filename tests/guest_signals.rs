//! Termination signals: SIGTERM presses the ACPI power button of a guest with ACPI (`-A`);
//! without ACPI, on a second SIGTERM, and on SIGINT or SIGHUP `xhyve` stops at once, cleanly
//! (pidfile removed), with exit code 1.

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
    let pidfile = pidfile_for(test, mode);
    let mut args = vec!["-F".into(), pidfile.clone().into_os_string()];
    if acpi {
        args.push("-A".into());
    }
    let mut vm = Vm::multiboot("wait-input")
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
    outcome.assert_exit(1);
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
    |mode| stops_cleanly(mode, "term2", true, &[libc::SIGTERM, libc::SIGTERM])
);

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
