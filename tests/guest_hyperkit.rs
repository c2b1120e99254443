//! HyperKit compatibility through the real binary: its console chains (`autopty=PATH`,
//! `log=PATH`, `null`, `asl`), and its personality when the binary is named `hyperkit`
//! (the `-v` line minikube parses, its exit codes).

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{IrqChip, Vm};

fn state_dir(test: &str, mode: IrqChip) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "xhyve-hk-{test}-{}-{}",
        std::process::id(),
        mode.env_value()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create state dir");
    dir
}

/// The binary under test, reachable as `hyperkit` (a symlink in a private directory).
fn as_hyperkit(dir: &Path) -> PathBuf {
    let link = dir.join("hyperkit");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(common::xhyve_binary(), &link).expect("symlink hyperkit");
    link
}

/// Reads what the guest wrote into HyperKit's console ring: the bytes up to the first NUL
/// (the ring has not wrapped in these short runs).
fn ring_text(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read console ring");
    assert_eq!(bytes.len(), 64 * 1024, "HyperKit's ring size");
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

// The Go wrapper's (and minikube's) console: a pty announced as a link in the state
// directory, output copied into the console ring. The link goes when xhyve does.
guest_test!(autopty_link_and_console_ring, |mode| {
    let dir = state_dir("autopty", mode);
    let (tty, ring) = (dir.join("tty"), dir.join("console-ring"));
    let spec = format!("com1,autopty={},log={}", tty.display(), ring.display());
    let mut vm = Vm::multiboot("hello").irqchip(mode).console(spec).spawn();
    // The pty's name is announced on stdout, as for plain autopty.
    vm.wait_for_line_starting("COM1 connected to /dev/pts/");
    let outcome = vm.finish();
    outcome.assert_exit(1);
    let announced = outcome
        .lines()
        .find_map(|l| l.strip_prefix("COM1 connected to "))
        .unwrap()
        .to_string();
    assert!(
        ring_text(&ring).contains("hello from guest"),
        "ring: {:?}",
        ring_text(&ring)
    );
    assert!(
        tty.symlink_metadata().is_err(),
        "the link {} must be removed at exit",
        tty.display()
    );
    assert!(announced.starts_with("/dev/pts/"), "{announced}");
    let _ = std::fs::remove_dir_all(&dir);
});

// While the VM runs, the link points at the pty, and a client reading it sees the guest.
guest_test!(autopty_link_reaches_the_guest, |mode| {
    let dir = state_dir("link", mode);
    let tty = dir.join("tty1");
    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .console(format!("com1,autopty={}", tty.display()))
        .spawn();
    vm.wait_for_line_starting("COM1 connected to /dev/pts/");
    let target = std::fs::read_link(&tty).expect("autopty= makes a symlink");
    assert!(target.starts_with("/dev/pts/"), "{}", target.display());
    // Open through the link, as the Go wrapper's openTTY does, and talk to the guest.
    let mut client = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tty)
        .expect("open the pty through the link");
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("ready") {
        assert!(Instant::now() < deadline, "no ready: {seen:?}");
        let mut buf = [0u8; 256];
        let n = client.read(&mut buf).unwrap();
        seen.extend_from_slice(&buf[..n]);
    }
    client.write_all(b"K").unwrap();
    while !String::from_utf8_lossy(&seen).contains("got K") {
        assert!(Instant::now() < deadline, "no echo: {seen:?}");
        let mut buf = [0u8; 256];
        match client.read(&mut buf) {
            Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    assert!(String::from_utf8_lossy(&seen).contains("got K"), "{seen:?}");
    vm.finish().assert_exit(1);
    assert!(tty.symlink_metadata().is_err(), "link removed");
    let _ = std::fs::remove_dir_all(&dir);
});

// `null` drops output and has no input; with `log=` the ring still has it.
guest_test!(null_console_with_ring, |mode| {
    let dir = state_dir("null", mode);
    let ring = dir.join("console-ring");
    let outcome = Vm::multiboot("hello")
        .irqchip(mode)
        .console(format!("com1,null,log={}", ring.display()))
        .run();
    outcome.assert_exit(1);
    assert!(!outcome.stdout.contains("hello from guest"), "{outcome}");
    assert!(ring_text(&ring).contains("hello from guest"));
    let _ = std::fs::remove_dir_all(&dir);
});

#[cfg(not(target_os = "macos"))]
#[test]
fn asl_is_a_clear_error_off_macos() {
    if !common::kvm_usable() {
        return;
    }
    let outcome = Vm::multiboot("hello").console("com1,stdio,asl").run();
    outcome.assert_exit(1);
    assert!(
        outcome
            .stderr
            .contains("-l com1: asl (the Apple System Log) exists only on macOS"),
        "{outcome}"
    );
}

#[test]
fn bad_console_chains_are_usage_errors() {
    let outcome = common::run_xhyve([
        "-l",
        "com1,stdio,autopty",
        "-f",
        "multiboot,guest.elf,,hello",
    ]);
    outcome.assert_exit(64);
    assert!(
        outcome.stderr.contains(
            "invalid lpc device configuration 'com1,stdio,autopty': more than one terminal"
        ),
        "{outcome}"
    );
}

/// minikube runs `hyperkit -v` and reads the date from its first line.
#[test]
fn hyperkit_version_line() {
    let dir = state_dir("version", IrqChip::Kernel);
    let out = Command::new(as_hyperkit(&dir)).arg("-v").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stderr);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.starts_with("hyperkit: v0.2"), "{text}");
    // As xhyve, the xhyve text.
    let out = Command::new(common::xhyve_binary())
        .arg("-v")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("xhyve: "));
    let _ = std::fs::remove_dir_all(&dir);
}

fn hyperkit_exit(mode: IrqChip, guest: &str) -> Option<i32> {
    let dir = state_dir(guest, mode);
    let vm = Vm::multiboot(guest).irqchip(mode);
    let mut child = Command::new(as_hyperkit(&dir))
        .args(vm.command_line())
        .env("XHYVE_IRQCHIP", mode.env_value())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::GUEST_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("hyperkit {guest} did not end");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::remove_dir_all(&dir);
    status.code()
}

// HyperKit's table: poweroff and halt 0, reset 2, triple fault 3.
guest_test!(hyperkit_exit_codes, |mode| {
    for (guest, code) in [
        ("poweroff", 0),
        ("halt", 0),
        ("reset", 2),
        ("triplefault", 3),
    ] {
        assert_eq!(hyperkit_exit(mode, guest), Some(code), "{guest}");
    }
});
