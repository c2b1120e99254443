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
        assert_eq!(
            curl(&target, "POST", "/vm/state", Some(r#"{"state":"Stop"}"#)).0,
            202
        );
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
