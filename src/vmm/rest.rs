//! The control API, in the shape of vfkit's REST API (`--restful-uri`), which podman machine
//! and crc already speak:
//!
//! - `GET /vm/state`: `{"state": "VirtualMachineStateRunning" | "...Paused" | "...Stopping",
//!   "canStart", "canPause", "canResume", "canStop", "canHardStop", "canReset"}`;
//! - `POST /vm/state` with `{"state": "Stop" | "HardStop" | "Pause" | "Resume" | "Reset"}`:
//!   202 when done. `Stop` presses the ACPI power button (409 if the guest has no ACPI
//!   enabled to see it), `HardStop` stops the VM at once (exit code 1, as a signal).
//!   `Reset` (ours; vfkit has none) resets the machine in place, as a reset button or
//!   QEMU's `system_reset`: same process, devices and disk images, the guest starts again
//!   from its boot entry (a paused VM stays paused); 409 while the VM stops. A reset the
//!   guest asks for itself (0xCF9, the i8042, a triple fault) still ends xhyve with exit 0;
//! - `GET /vm/inspect`: the configuration (`vcpus`, `memoryBytes`, `bootloader`, `devices`
//!   with their PCI slots, disk images and MACs).
//!
//! Errors are `{"error": "..."}` with a 4xx status. The Unix socket is created 0600 (only
//! the owner may stop the VM) and removed at exit. Requests are read by tiny_http's
//! connection threads, so clients are served concurrently; each request is answered on the
//! API thread in a few microseconds (a pause waits until the machine is quiet).

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::control::Lifecycle;
use super::exit::StopReason;
use crate::config::{
    DeviceConfig, DeviceKind, Firmware, RestEndpoint, SerialBackend, SerialConfig, VmConfig,
};
use crate::devices::power_mgmt::PowerButton;

/// Largest request body read; a state change is a few dozen bytes.
const MAX_BODY: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("--restful-uri: cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--restful-uri: {0:?} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("--restful-uri: cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// The socket to remove at exit.
static SOCKET: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Removes the API's Unix socket, if this process made one. Safe to call more than once.
pub fn remove_socket() {
    if let Some(path) = SOCKET.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = std::fs::remove_file(path);
    }
}

/// What the API acts on.
pub struct Api {
    pub machine: Arc<dyn Lifecycle>,
    pub power_button: Option<Arc<dyn PowerButton>>,
    /// The `GET /vm/inspect` answer, fixed at start.
    pub inspect: Value,
}

/// Listens on `endpoint` and serves the API on a thread of its own until the process ends.
pub fn start(endpoint: &RestEndpoint, api: Api) -> Result<(), RestError> {
    let server = match endpoint {
        RestEndpoint::Unix(path) => tiny_http::Server::from_listener(bind_unix(path)?, None),
        RestEndpoint::Tcp(addr) => tiny_http::Server::http(addr),
    }
    .map_err(|e| RestError::Listen {
        what: format!("{endpoint:?}"),
        source: std::io::Error::other(e.to_string()),
    })?;
    std::thread::Builder::new()
        .name("rest-api".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                serve(&api, request);
            }
        })
        .map(|_| ())
        .map_err(RestError::Thread)
}

/// Binds the socket with mode 0600 from the start: the umask covers the window between
/// bind() and any chmod, in which another user could otherwise connect.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, RestError> {
    let listen_error = |source| RestError::Listen {
        what: format!("{path:?}"),
        source,
    };
    // A socket left by an earlier run is replaced (as vfkit does); anything else is not ours.
    match path.symlink_metadata() {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(listen_error)?
        }
        Ok(_) => return Err(RestError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file creation mask; it is restored below.
    let old = unsafe { libc::umask(0o177) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(listen_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_error)?;
    *SOCKET.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    super::signals::remove_at_crash(path);
    Ok(listener)
}

fn serve(api: &Api, mut request: tiny_http::Request) {
    let mut body = Vec::new();
    let too_long = request.body_length().is_some_and(|n| n as u64 > MAX_BODY);
    let read = request
        .as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body);
    let (status, answer) = if too_long || body.len() as u64 > MAX_BODY {
        error(413, "request body larger than 64 KiB")
    } else if read.is_err() {
        error(400, "cannot read the request body")
    } else {
        let method = request.method().as_str().to_string();
        let url = request.url().to_string();
        handle(api, &method, &url, &body)
    };
    let mut response = tiny_http::Response::from_data(match &answer {
        Some(value) => value.to_string().into_bytes(),
        None => Vec::new(),
    })
    .with_status_code(status);
    if answer.is_some() {
        if let Ok(header) = "Content-Type: application/json".parse::<tiny_http::Header>() {
            response = response.with_header(header);
        }
    }
    // The client may have gone; nothing to do about it.
    let _ = request.respond(response);
}

fn error(status: u16, message: &str) -> (u16, Option<Value>) {
    (status, Some(json!({ "error": message })))
}

/// Answers one request: a status and an optional JSON body. Never trusts the client's input:
/// every path, method and body that is not understood gets a 4xx naming what was wrong.
fn handle(api: &Api, method: &str, url: &str, body: &[u8]) -> (u16, Option<Value>) {
    // vfkit's router ignores a query string; so do we.
    let path = url.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/vm/state") => (200, Some(state(api))),
        ("POST", "/vm/state") => change_state(api, body),
        ("GET", "/vm/inspect") => (200, Some(api.inspect.clone())),
        (_, "/vm/state") | (_, "/vm/inspect") => {
            error(405, &format!("method {method} not allowed on {path}"))
        }
        _ => error(404, &format!("no such endpoint: {path}")),
    }
}

fn state(api: &Api) -> Value {
    let stopping = api.machine.is_stopping();
    let paused = api.machine.is_paused();
    let name = if stopping {
        "VirtualMachineStateStopping"
    } else if paused {
        "VirtualMachineStatePaused"
    } else {
        "VirtualMachineStateRunning"
    };
    let listens = api.power_button.as_ref().is_some_and(|b| b.guest_listens());
    json!({
        "state": name,
        "canStart": false,
        "canPause": !stopping && !paused,
        "canResume": !stopping && paused,
        "canStop": !stopping && listens,
        "canHardStop": !stopping,
        "canReset": !stopping,
    })
}

fn change_state(api: &Api, body: &[u8]) -> (u16, Option<Value>) {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return error(400, &format!("the body is not JSON: {e}")),
    };
    let Some(wanted) = request.get("state").and_then(Value::as_str) else {
        return error(
            400,
            "expected {\"state\": \"Stop|HardStop|Pause|Resume|Reset\"}",
        );
    };
    if api.machine.is_stopping() {
        return error(409, "the VM is stopping");
    }
    match wanted {
        "Pause" => api.machine.pause(),
        "Resume" => api.machine.resume(),
        "HardStop" => api.machine.stop_now(StopReason::Requested),
        "Reset" => match api.machine.reset() {
            Ok(()) => {}
            Err(e @ super::control::ResetError::Stopping) => return error(409, &e.to_string()),
            // The machine stops: it cannot run on half reset.
            Err(e) => return error(500, &e.to_string()),
        },
        "Stop" => match &api.power_button {
            None => return error(409, "no ACPI power button: the VM runs without -A"),
            Some(button) => {
                if !button.press() {
                    return error(
                        409,
                        "the guest has not enabled ACPI, so it cannot see the power button; \
                         use HardStop",
                    );
                }
            }
        },
        other => {
            return error(
                400,
                &format!(
                    "invalid new VMState: {other:?}; expected Stop, HardStop, Pause, Resume \
                     or Reset"
                ),
            )
        }
    }
    (202, None)
}

/// `GET /vm/inspect`: the configuration in vfkit's field names where they exist.
pub fn inspect(config: &VmConfig) -> Value {
    let bootloader = match &config.firmware {
        Firmware::Kexec {
            kernel,
            initrd,
            cmdline,
        } => json!({
            "kind": "linuxBootloader",
            "vmlinuzPath": kernel,
            "initrdPath": initrd.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            "kernelCmdLine": cmdline,
        }),
        Firmware::Multiboot {
            kernel,
            modules,
            cmdline,
        } => json!({
            "kind": "multibootBootloader",
            "kernelPath": kernel,
            "kernelCmdLine": cmdline,
            "modules": modules
                .iter()
                .map(|m| json!({ "path": m.path, "cmdLine": m.cmdline }))
                .collect::<Vec<_>>(),
        }),
    };
    let mut devices: Vec<Value> = config
        .devices
        .iter()
        .map(|d| pci_device(config, d))
        .collect();
    for (port, serial) in [("com1", &config.com1), ("com2", &config.com2)] {
        if let Some(serial) = serial {
            devices.push(serial_device(port, serial));
        }
    }
    json!({
        "vcpus": config.vcpus,
        "memoryBytes": config.memory_bytes,
        "bootloader": bootloader,
        "devices": devices,
        "acpi": config.acpi,
        "uuid": config.uuid.map(uuid_text),
    })
}

fn pci_device(config: &VmConfig, d: &DeviceConfig) -> Value {
    let a = d.address;
    let slot = format!("{}:{}:{}", a.bus, a.slot, a.function);
    let disk = |kind: &str, o: &crate::block::BlockOptions| {
        json!({
            "kind": kind,
            "pciSlot": slot,
            "imagePath": o.path,
            "readOnly": o.read_only || kind == "ahcicd",
        })
    };
    match &d.kind {
        DeviceKind::VirtioBlk(o) => disk("virtioblk", o),
        DeviceKind::AhciHd(o) => disk("ahcihd", o),
        DeviceKind::AhciCd(o) => disk("ahcicd", o),
        DeviceKind::VirtioRnd => json!({ "kind": "virtiorng", "pciSlot": slot }),
        DeviceKind::VirtioTap(tap) => json!({
            "kind": "virtionet",
            "pciSlot": slot,
            "nat": false,
            "tap": tap.name,
            "macAddress": crate::config::tap_mac(config.uuid, a, tap).to_string(),
        }),
        // Without mac= vmnet assigns the MAC when it starts; vfkit omits it then too.
        DeviceKind::VirtioNet(o) => json!({
            "kind": "virtionet",
            "pciSlot": slot,
            "nat": true,
            "macAddress": o.mac.map(|m| m.to_string()),
        }),
        DeviceKind::Hostbridge | DeviceKind::AmdHostbridge => {
            json!({ "kind": "hostbridge", "pciSlot": slot })
        }
        DeviceKind::Lpc => json!({ "kind": "lpc", "pciSlot": slot }),
        // vfkit's shape for shares ("virtiofs": sharedDir, mountTag); 9P says where it goes.
        DeviceKind::VirtioFs(o) => json!({
            "kind": "virtiofs",
            "pciSlot": slot,
            "sharedDir": o.dir,
            "mountTag": o.tag,
            "readOnly": o.read_only,
        }),
        DeviceKind::Virtio9p(o) => match &o.backend {
            crate::fs::options::P9Backend::Dir { dir, read_only, .. } => json!({
                "kind": "virtio9p",
                "pciSlot": slot,
                "sharedDir": dir,
                "mountTag": o.tag,
                "readOnly": read_only,
            }),
            crate::fs::options::P9Backend::Forward(target) => json!({
                "kind": "virtio9p",
                "pciSlot": slot,
                "mountTag": o.tag,
                "server": format!("{target:?}"),
            }),
        },
        DeviceKind::VirtioSock(v) => json!({
            "kind": "virtiosock",
            "pciSlot": slot,
            "guestCid": v.guest_cid,
            "socketDir": v.dir,
            "guestForwards": v.guest_forwards,
        }),
    }
}

fn serial_device(port: &str, serial: &SerialConfig) -> Value {
    let (stdio, pty, link, tty) = match &serial.backend {
        SerialBackend::Stdio => (true, false, None, None),
        SerialBackend::Autopty(link) => (false, true, link.clone(), None),
        SerialBackend::Null => (false, false, None, None),
        SerialBackend::Tty(path) => (false, false, None, Some(path.clone())),
    };
    json!({
        "kind": "serial",
        "port": port,
        "usesStdio": stdio,
        "usesPty": pty,
        "ptyLink": link,
        "ttyPath": tty,
        "logFile": serial.log_ring,
    })
}

fn uuid_text(u: [u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::control::Control;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// The control's stop plus a pause flag: what the API needs of a machine.
    struct FakeMachine {
        control: Arc<Control>,
        paused: AtomicBool,
        resets: std::sync::atomic::AtomicUsize,
    }

    impl Lifecycle for FakeMachine {
        fn pause(&self) {
            self.paused.store(true, Ordering::SeqCst)
        }
        fn resume(&self) {
            self.paused.store(false, Ordering::SeqCst)
        }
        fn is_paused(&self) -> bool {
            self.paused.load(Ordering::SeqCst)
        }
        fn is_stopping(&self) -> bool {
            self.control.is_stopping()
        }
        fn reset(&self) -> Result<(), crate::vmm::control::ResetError> {
            if self.control.is_stopping() {
                return Err(crate::vmm::control::ResetError::Stopping);
            }
            self.resets.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn stop_now(&self, reason: StopReason) {
            self.control.stop(reason)
        }
    }

    struct Button {
        listens: AtomicBool,
        pressed: AtomicBool,
    }

    impl PowerButton for Button {
        fn press(&self) -> bool {
            self.pressed.store(true, Ordering::SeqCst);
            self.listens.load(Ordering::SeqCst)
        }
        fn guest_listens(&self) -> bool {
            self.listens.load(Ordering::SeqCst)
        }
    }

    fn api(listens: bool) -> (Api, Arc<Button>, Arc<Control>) {
        let (control, _woken) = Control::new(1);
        let button = Arc::new(Button {
            listens: AtomicBool::new(listens),
            pressed: AtomicBool::new(false),
        });
        let machine = Arc::new(FakeMachine {
            control: control.clone(),
            paused: AtomicBool::new(false),
            resets: Default::default(),
        });
        let api = Api {
            machine,
            power_button: Some(button.clone()),
            inspect: json!({"vcpus": 1}),
        };
        (api, button, control)
    }

    fn post(api: &Api, body: &str) -> (u16, Option<Value>) {
        handle(api, "POST", "/vm/state", body.as_bytes())
    }

    #[test]
    fn state_reports_running_then_paused() {
        let (api, _, _control) = api(true);
        let (status, body) = handle(&api, "GET", "/vm/state", b"");
        assert_eq!(status, 200);
        let body = body.unwrap();
        assert_eq!(body["state"], "VirtualMachineStateRunning");
        assert_eq!(body["canPause"], true);
        assert_eq!(body["canStop"], true);
        assert_eq!(post(&api, r#"{"state":"Pause"}"#).0, 202);
        let body = handle(&api, "GET", "/vm/state", b"").1.unwrap();
        assert_eq!(body["state"], "VirtualMachineStatePaused");
        assert_eq!(body["canResume"], true);
        assert_eq!(post(&api, r#"{"state":"Resume"}"#).0, 202);
        assert!(!api.machine.is_paused());
    }

    #[test]
    fn stop_presses_the_button_and_hardstop_stops() {
        let (api, button, control) = api(true);
        assert_eq!(post(&api, r#"{"state":"Stop"}"#).0, 202);
        assert!(button.pressed.load(Ordering::SeqCst));
        assert!(!api.machine.is_stopping());
        assert_eq!(post(&api, r#"{"state":"HardStop"}"#).0, 202);
        assert_eq!(control.stop_reason(), Some(StopReason::Requested));
        let body = handle(&api, "GET", "/vm/state", b"").1.unwrap();
        assert_eq!(body["state"], "VirtualMachineStateStopping");
        assert_eq!(post(&api, r#"{"state":"Pause"}"#).0, 409);
    }

    #[test]
    fn reset_resets_and_is_a_conflict_once_stopping() {
        let (control, _woken) = Control::new(1);
        let machine = Arc::new(FakeMachine {
            control: control.clone(),
            paused: AtomicBool::new(true),
            resets: Default::default(),
        });
        let api = Api {
            machine: machine.clone(),
            power_button: None,
            inspect: json!({}),
        };
        let body = handle(&api, "GET", "/vm/state", b"").1.unwrap();
        assert_eq!(body["canReset"], true);
        assert_eq!(post(&api, r#"{"state":"Reset"}"#).0, 202);
        assert_eq!(machine.resets.load(Ordering::SeqCst), 1);
        assert!(machine.is_paused(), "a paused VM stays paused");
        control.stop(StopReason::Requested);
        let body = handle(&api, "GET", "/vm/state", b"").1.unwrap();
        assert_eq!(body["canReset"], false);
        let (status, body) = post(&api, r#"{"state":"Reset"}"#);
        assert_eq!(status, 409);
        assert!(body.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("stopping"));
        assert_eq!(machine.resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stop_without_acpi_is_a_conflict() {
        let (api, _, _control) = api(false);
        let (status, body) = post(&api, r#"{"state":"Stop"}"#);
        assert_eq!(status, 409);
        assert!(body.unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("HardStop"));
        assert!(!api.machine.is_stopping());
    }

    #[test]
    fn bad_requests_get_4xx_with_a_message() {
        let (api, _, _control) = api(true);
        for (method, path, body, status, text) in [
            ("POST", "/vm/state", "{", 400, "not JSON"),
            (
                "POST",
                "/vm/state",
                r#"{"state":"Explode"}"#,
                400,
                "\"Explode\"",
            ),
            ("POST", "/vm/state", r#"{"state":3}"#, 400, "expected"),
            ("POST", "/vm/state", "[]", 400, "expected"),
            ("DELETE", "/vm/state", "", 405, "DELETE"),
            ("POST", "/vm/inspect", "", 405, "POST"),
            ("GET", "/vm/nothing", "", 404, "/vm/nothing"),
        ] {
            let (got, answer) = handle(&api, method, path, body.as_bytes());
            assert_eq!(got, status, "{method} {path} {body}");
            let message = answer.unwrap()["error"].as_str().unwrap().to_string();
            assert!(message.contains(text), "{message}");
        }
        assert!(!api.machine.is_stopping());
    }

    #[test]
    fn inspect_lists_devices_and_macs() {
        let args = [
            "xhyve",
            "-c",
            "2",
            "-m",
            "512M",
            "-U",
            "12345678-1234-1234-1234-123456789abc",
            "-s",
            "0:0,hostbridge",
            "-s",
            "2,virtio-blk,/img/d.raw,ro",
            "-s",
            "3,virtio-tap,tap7,mac=02:11:22:33:44:55",
            "-s",
            "31,lpc",
            "-l",
            "com1,autopty=/s/tty,log=/s/ring",
            "-f",
            "kexec,/k,/i,console=ttyS0",
        ];
        let crate::cli::Action::Run(config) = crate::cli::parse(args).unwrap() else {
            panic!("not a run");
        };
        let v = inspect(&config);
        assert_eq!(v["vcpus"], 2);
        assert_eq!(v["memoryBytes"], 512u64 << 20);
        assert_eq!(v["uuid"], "12345678-1234-1234-1234-123456789abc");
        assert_eq!(v["bootloader"]["kind"], "linuxBootloader");
        assert_eq!(v["bootloader"]["kernelCmdLine"], "console=ttyS0");
        let devices = v["devices"].as_array().unwrap();
        let blk = devices.iter().find(|d| d["kind"] == "virtioblk").unwrap();
        assert_eq!(blk["imagePath"], "/img/d.raw");
        assert_eq!(blk["readOnly"], true);
        assert_eq!(blk["pciSlot"], "0:2:0");
        let net = devices.iter().find(|d| d["kind"] == "virtionet").unwrap();
        assert_eq!(net["macAddress"], "02:11:22:33:44:55");
        assert_eq!(net["tap"], "tap7");
        let com1 = devices.iter().find(|d| d["kind"] == "serial").unwrap();
        assert_eq!(com1["ptyLink"], "/s/tty");
        assert_eq!(com1["logFile"], "/s/ring");
    }
}
