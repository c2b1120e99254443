//! The control API (`--restful-uri`, vfkit's REST shape) through the real binary, driven by
//! curl as podman machine and crc drive vfkit.

#[macro_use]
mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

use common::{IrqChip, Vm};

fn socket_for(test: &str, mode: IrqChip) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "xhyve-rest-{test}-{}-{}",
        std::process::id(),
        mode.env_value()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create socket dir");
    dir.join("rest.sock")
}

/// `curl` against the socket (or a TCP base URL): the status code and the body.
fn curl(target: &Target, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-m", "10", "-X", method, "-w", "\n%{http_code}"]);
    let url = match target {
        Target::Unix(socket) => {
            cmd.arg("--unix-socket").arg(socket);
            format!("http://localhost{path}")
        }
        Target::Tcp(base) => format!("{base}{path}"),
    };
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/json", "-d", body]);
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("curl is needed (Debian: curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

enum Target {
    Unix(PathBuf),
    Tcp(String),
}

fn wait_for_socket(path: &Path) {
    let deadline = std::time::Instant::now() + common::GUEST_TIMEOUT;
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no socket at {}",
            path.display()
        );
        thread::sleep(std::time::Duration::from_millis(20));
    }
}

guest_test!(
    state_pause_resume_inspect_and_stop_over_a_unix_socket,
    |mode| {
        let socket = socket_for("unix", mode);
        let mut vm = Vm::multiboot("powerbutton")
            .irqchip(mode)
            .args([
                "-A".into(),
                "--restful-uri".into(),
                format!("unix://{}", socket.display()),
            ])
            .spawn();
        vm.wait_for_line("ready");
        wait_for_socket(&socket);
        let meta = std::fs::metadata(&socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
        let target = Target::Unix(socket.clone());

        let (code, body) = curl(&target, "GET", "/vm/state", None);
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("\"state\":\"VirtualMachineStateRunning\""),
            "{body}"
        );
        assert!(body.contains("\"canStop\":true"), "{body}");

        // Concurrent clients all get answers.
        let socket_path = socket.clone();
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let s = socket_path.clone();
                thread::spawn(move || curl(&Target::Unix(s), "GET", "/vm/inspect", None))
            })
            .collect();
        for client in clients {
            let (code, body) = client.join().unwrap();
            assert_eq!(code, 200, "{body}");
            assert!(body.contains("\"memoryBytes\":268435456"), "{body}");
            assert!(body.contains("\"kind\":\"lpc\""), "{body}");
        }

        assert_eq!(
            curl(&target, "POST", "/vm/state", Some(r#"{"state":"Pause"}"#)).0,
            202
        );
        let (_, body) = curl(&target, "GET", "/vm/state", None);
        assert!(body.contains("VirtualMachineStatePaused"), "{body}");
        assert_eq!(
            curl(&target, "POST", "/vm/state", Some(r#"{"state":"Resume"}"#)).0,
            202
        );

        let (code, body) = curl(&target, "POST", "/vm/state", Some(r#"{"state":"Reboot"}"#));
        assert_eq!(code, 400, "{body}");
        assert!(
            body.contains("invalid new VMState: \\\"Reboot\\\""),
            "{body}"
        );
        let (code, body) = curl(&target, "POST", "/vm/state", Some("not json"));
        assert_eq!(code, 400, "{body}");
        assert_eq!(curl(&target, "GET", "/nothing", None).0, 404);

        // Stop: the guest sees its power button and powers off.
        let (code, body) = curl(&target, "POST", "/vm/state", Some(r#"{"state":"Stop"}"#));
        assert_eq!(code, 202, "Stop answered {body:?}");
        vm.finish()
            .assert_exit(1)
            .assert_line("power button pressed");
        assert!(!socket.exists(), "socket removed at exit");
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }
);

guest_test!(hardstop_over_tcp, |mode| {
    // A free loopback port: bind, note it, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .stdin_piped()
        .args([
            "--restful-uri".to_string(),
            format!("tcp://127.0.0.1:{port}"),
        ])
        .spawn();
    vm.wait_for_line("ready");
    let target = Target::Tcp(format!("http://127.0.0.1:{port}"));
    // Without -A there is no button to press: a conflict, and the VM runs on.
    let (code, body) = curl(&target, "POST", "/vm/state", Some(r#"{"state":"Stop"}"#));
    assert_eq!(code, 409, "{body}");
    assert!(!vm.has_exited());
    assert_eq!(
        curl(
            &target,
            "POST",
            "/vm/state",
            Some(r#"{"state":"HardStop"}"#)
        )
        .0,
        202
    );
    let outcome = vm.finish();
    outcome.assert_exit(1);
    assert!(!outcome.lines().any(|l| l.starts_with("got")), "{outcome}");
});

/// A sparse disk image for the `reset-api` guest, removed on drop.
struct ResetDisk(PathBuf);

impl ResetDisk {
    fn new(mode: IrqChip, vcpus: u32) -> ResetDisk {
        let path = std::env::temp_dir().join(format!(
            "xhyve-reset-{}-{}-{vcpus}.img",
            std::process::id(),
            mode.env_value()
        ));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 20).unwrap();
        ResetDisk(path)
    }
}

impl Drop for ResetDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The lines of one boot of `reset-api`: from its `reset-api boot N` to the next boot's.
fn boot_lines(outcome: &common::Outcome, boot: u32) -> Vec<String> {
    let start = format!("reset-api boot {boot}");
    let next = format!("reset-api boot {}", boot + 1);
    outcome
        .lines()
        .skip_while(|l| *l != start)
        .take_while(|l| *l != next)
        .map(str::to_string)
        .collect()
}

/// `POST Reset` resets the machine in place: the guest boots again from its entry (its boot
/// counter in RAM, which a reset keeps, says 2), finds the virtio-blk function as firmware
/// left it (the BAR the guest moved and the INTx-disable bit it set are undone, MSI-X off)
/// and the device at status 0 with no queue, drives it again and reads what boot 1 wrote
/// through the same image. With two vCPUs the AP, left counting in real mode by boot 1,
/// stands still after the reset and comes up again through INIT/SIPI. Boot 2 ends with a
/// guest reset through 0xCF9: still exit code 0. With one vCPU the machine is paused first:
/// it stays paused through the reset, and boots again only once resumed.
fn reset_over_the_api(mode: IrqChip, vcpus: u32) {
    let socket = socket_for(&format!("reset{vcpus}"), mode);
    let disk = ResetDisk::new(mode, vcpus);
    let cmdline = if vcpus > 1 {
        "reset-api smp"
    } else {
        "reset-api"
    };
    let mut vm = Vm::multiboot(cmdline)
        .irqchip(mode)
        .vcpus(vcpus)
        .pci(&[
            "0:0,hostbridge",
            &format!("4,virtio-blk,{}", disk.0.display()),
            "31,lpc",
        ])
        .args([
            "--restful-uri".to_string(),
            format!("unix://{}", socket.display()),
        ])
        .spawn();
    vm.wait_for_line("reset-api ready");
    wait_for_socket(&socket);
    let target = Target::Unix(socket.clone());
    let (code, body) = curl(&target, "GET", "/vm/state", None);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"canReset\":true"), "{body}");
    let paused_first = vcpus == 1;
    if paused_first {
        let (code, body) = curl(&target, "POST", "/vm/state", Some(r#"{"state":"Pause"}"#));
        assert_eq!(code, 202, "{body}");
    }
    let started = std::time::Instant::now();
    let (code, body) = curl(&target, "POST", "/vm/state", Some(r#"{"state":"Reset"}"#));
    assert_eq!(code, 202, "{body}");
    eprintln!(
        "reset over the API ({mode:?}, -c {vcpus}) answered in {:?}",
        started.elapsed()
    );
    if paused_first {
        let (_, body) = curl(&target, "GET", "/vm/state", None);
        assert!(body.contains("VirtualMachineStatePaused"), "{body}");
        thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !vm.stdout_so_far().contains("reset-api boot 2"),
            "a paused machine ran after the reset"
        );
        let (code, body) = curl(&target, "POST", "/vm/state", Some(r#"{"state":"Resume"}"#));
        assert_eq!(code, 202, "{body}");
    }
    let outcome = vm.finish();
    outcome.assert_exit(0).assert_line("reset-api done");
    let first = boot_lines(&outcome, 1);
    let second = boot_lines(&outcome, 2);
    assert!(!first.is_empty() && !second.is_empty(), "{outcome}");
    // What firmware leaves, the same at both boots: the function and device at power-on.
    let at_power_on = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| {
                [
                    "command ",
                    "bar0 ",
                    "msix control ",
                    "status ",
                    "queue pfn ",
                ]
                .iter()
                .any(|p| l.starts_with(&format!("reset-api {p}")))
            })
            .cloned()
            .collect()
    };
    assert_eq!(at_power_on(&first).len(), 5, "{outcome}");
    assert_eq!(at_power_on(&first), at_power_on(&second), "{outcome}");
    assert!(
        second.contains(&"reset-api status 00".to_string()),
        "{outcome}"
    );
    assert!(
        second.contains(&"reset-api queue pfn 00000000".to_string()),
        "{outcome}"
    );
    assert!(
        first.contains(&"reset-api sector1 was ........".to_string()),
        "{outcome}"
    );
    assert!(
        second.contains(&"reset-api sector1 was boot 1..".to_string()),
        "{outcome}"
    );
    assert!(second.contains(&"reset-api io ok".to_string()), "{outcome}");
    if vcpus > 1 {
        for lines in [&first, &second] {
            assert!(lines.contains(&"cpu1 up".to_string()), "{outcome}");
            assert!(
                lines.contains(&"reset-api cpu1 counting".to_string()),
                "{outcome}"
            );
        }
        assert!(
            second.contains(&"reset-api cpu1 stopped".to_string()),
            "{outcome}"
        );
    }
    assert!(
        !outcome.lines().any(|l| l.starts_with("reset-api boot 3")),
        "{outcome}"
    );
    let image = std::fs::read(&disk.0).unwrap();
    assert_eq!(&image[512..518], b"boot 2", "boot 2 wrote sector 1");
    let _ = std::fs::remove_dir_all(socket.parent().unwrap());
}

guest_test!(
    reset_boots_the_guest_again_with_its_devices_at_power_on,
    |mode| reset_over_the_api(mode, 1)
);

guest_test!(reset_puts_the_ap_back_to_wait_for_sipi, |mode| {
    reset_over_the_api(mode, 2)
});
