//! Slow tier: the built-in user-mode network (`-s 2,virtio-net`, libslirp) driven by Linux's
//! own virtio-net driver and network stack, through the real binary.
//!
//! One boot per interrupt-controller mode does everything, in the order a user meets it:
//! - kernel mode: the kernel's own IP autoconfiguration (`ip=dhcp`) gets a lease from the
//!   built-in DHCP server and prints it, and xhyve's log (`XHYVE_LOG=info`) names the address
//!   it handed out;
//! - user space: busybox `udhcpc` gets a lease again on the cleared interface and configures it
//!   through a script; busybox `nc` (a raw HTTP request) and `wget` (1 MiB) fetch files from
//!   an HTTP server of this test on the host's 127.0.0.1, through the gateway address, which
//!   libslirp maps to the host's loopback;
//! - a host port forward (`hostfwd=tcp:127.0.0.1:PORT-:GUEST_PORT`) carries a payload each
//!   way between a host connection and `nc -l` in the guest;
//! - in kernel irqchip mode, a second NIC (`virtio-net,socket=PATH`) to Debian's passt, which
//!   the test starts (skipped with a note when passt is not installed): a payload each way
//!   through passt's forward from 127.0.0.1 to `nc -l` in the guest, the host's side speaking
//!   first (passt 0.0~git20230309 never completes a handshake the guest must speak first on:
//!   `test/passt-handshake.py`).
//!
//! All traffic stays on this machine: the host's sockets are on 127.0.0.1 and the guest talks
//! only to its gateways (DNS is off).
//!
//! Wall time (both boots at once): ~100 s on a quiet build machine (lease ~44 s after start,
//! the network steps ~30 s; passt's step ~15 s more in kernel mode: 99 s for that boot alone
//! at load 1), 5-6 minutes when other boots load its 2 cores.

#[macro_use]
mod common;
mod linux_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use linux_common::{boot_timeout, host, test_kernel, IrqChip, Linux, Scratch, PROMPT};

/// libslirp's network as QEMU's users know it.
const GUEST_IP: &str = "10.0.2.15";
const GATEWAY: &str = "10.0.2.2";
/// Where `nc -l` listens in the guest.
const GUEST_PORT: u16 = 8080;
/// The passt NIC (eth1): addresses passt is told to hand out, set statically in the guest
/// (passt's DHCP is off, so the kernel's `ip=dhcp` takes libslirp's lease on eth0).
const PASST_GUEST_IP: &str = "10.0.3.15";
const PASST_GATEWAY: &str = "10.0.3.2";
/// Where `nc -l` listens in the guest for passt's forward.
const PASST_GUEST_PORT: u16 = 8081;
/// The small file `nc` fetches, compared as text.
const SMALL: &str = "served to Linux through the built-in network";
/// The large file `wget` fetches: many frames, more than one TCP window.
const LARGE_LEN: usize = 1 << 20;
/// udhcpc's event script, one line each: configure what the lease says (our initramfs has no
/// default script). `$mask` is the prefix length, `$router` the gateway list.
const UDHCPC_SCRIPT: [&str; 5] = [
    "#!/bin/sh",
    "[ \"$1\" = bound ] || exit 0",
    "ip addr add $ip/$mask dev $interface",
    "ip route add default via ${router%% *}",
    "echo udhcpc-script: $interface $ip/$mask via $router",
];

/// Deterministic bytes that no fixed pattern would match by accident.
fn large_payload() -> Vec<u8> {
    let mut x: u32 = 0x2545_f491;
    (0..LARGE_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// A tiny HTTP/1.0 server on 127.0.0.1 serving `/small` and `/large`; stops when dropped.
struct HttpServer {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<String>>>,
}

impl HttpServer {
    fn start(large: Vec<u8>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the HTTP server");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = thread::spawn(move || {
            let mut requests = Vec::new();
            while !stopped.load(Ordering::Relaxed) {
                let (stream, _) = match listener.accept() {
                    Ok(s) => s,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Err(e) => panic!("HTTP server: accept: {e}"),
                };
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(60)))
                    .unwrap();
                requests.push(serve(stream, &large));
            }
            requests
        });
        HttpServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the server; returns the request lines it saw.
    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("HTTP server")
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Answers one request; returns its request line.
fn serve(stream: TcpStream, large: &[u8]) -> String {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return format!("(unreadable) {request}");
    }
    // The headers, up to the empty line.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.trim().is_empty() => break,
            Ok(_) => {}
        }
    }
    let mut stream = reader.into_inner();
    let body: &[u8] = match request.split_whitespace().nth(1) {
        Some("/small") => SMALL.as_bytes(),
        Some("/large") => large,
        _ => b"",
    };
    let status = if body.is_empty() {
        "404 Not Found"
    } else {
        "200 OK"
    };
    let head = format!(
        "HTTP/1.0 {status}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body));
    let _ = stream.shutdown(Shutdown::Write);
    request.trim().to_string()
}

fn sha256_of(scratch: &Scratch, bytes: &[u8]) -> String {
    let path = scratch.path("sha-input");
    std::fs::write(&path, bytes).unwrap();
    let out = host("sha256sum", &[&path.display().to_string()]);
    out.split_whitespace().next().unwrap().to_string()
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The host's side of the forward: connects, reads what the guest sends until its EOF, then
/// sends `payload` and closes. Retries while the guest's listener is not up yet (libslirp
/// and passt accept on the host at once and drop the connection when the guest refuses it).
/// `speak_first`: `payload` goes out before the guest's data is read (all of it fits in the
/// socket buffers), which passt needs to complete the handshake with the guest.
fn forward_exchange(
    port: u16,
    payload: Vec<u8>,
    speak_first: bool,
) -> thread::JoinHandle<Result<Vec<u8>, String>> {
    thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let mut stream = match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => s,
                Err(e) => {
                    last_error = format!("connect: {e}");
                    thread::sleep(Duration::from_millis(500));
                    continue;
                }
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(120)))
                .unwrap();
            if speak_first {
                if let Err(e) = stream.write_all(&payload) {
                    last_error = format!("write to the guest: {e}");
                    thread::sleep(Duration::from_millis(500));
                    continue;
                }
            }
            let mut got = Vec::new();
            match stream.read_to_end(&mut got) {
                Ok(_) if !got.is_empty() => {}
                Ok(_) => {
                    last_error = "the guest closed without data".into();
                    thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(e) if speak_first && e.kind() == std::io::ErrorKind::ConnectionReset => {
                    last_error = format!("read from the guest: {e}");
                    thread::sleep(Duration::from_millis(500));
                    continue;
                }
                Err(e) => return Err(format!("read from the guest: {e}")),
            }
            if !speak_first {
                stream
                    .write_all(&payload)
                    .map_err(|e| format!("write to the guest: {e}"))?;
            }
            stream
                .shutdown(Shutdown::Write)
                .map_err(|e| format!("shutdown: {e}"))?;
            return Ok(got);
        }
        Err(format!("no exchange with the guest: {last_error}"))
    })
}

/// passt on a socket in a fresh directory, forwarding 127.0.0.1:`port` to the guest's
/// `PASST_GUEST_PORT`; killed on drop. `None` (after a note) when passt is not installed.
struct Passt {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Passt {
    fn start(scratch: &Scratch, port: u16) -> Option<Passt> {
        let dir = scratch.path("passt");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // passt started as root drops to "nobody" before it binds its socket.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.join("passt.sock");
        // Foreground, one client, IPv4 only, no DHCP (the guest sets eth1 up itself), the
        // guest's addresses given, one TCP forward bound to 127.0.0.1 and nothing else.
        let spawned = Command::new("passt")
            .args(["-f", "-1", "-4", "-q", "--no-dhcp", "-u", "none"])
            .args(["-a", PASST_GUEST_IP, "-n", "24", "-g", PASST_GATEWAY])
            .args(["-t", &format!("127.0.0.1/{port}:{PASST_GUEST_PORT}")])
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if std::env::var_os("XHYVE_REQUIRE_KVM").is_some_and(|v| v == "1") {
                    panic!("XHYVE_REQUIRE_KVM=1 but passt cannot run: {e} (apt-get install passt)");
                }
                eprintln!("note: no passt NIC: {e} (apt-get install passt)");
                return None;
            }
        };
        let passt = Passt { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !passt.socket.exists() {
            assert!(Instant::now() < deadline, "passt made no socket");
            thread::sleep(Duration::from_millis(20));
        }
        Some(passt)
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Through passt's forward (eth1): the host sends `to_guest` first, the guest answers with
/// `/tmp/out` (sha256 `out_sha`), each side's bytes compared with the other's.
fn passt_exchange(
    vm: &mut linux_common::Booted,
    scratch: &Scratch,
    port: u16,
    to_guest: &[u8],
    out_sha: &str,
) {
    let started = Instant::now();
    // passt learns the guest's MAC from its first frame (until then it sends to the
    // broadcast address, which the guest's TCP drops): an ARP request for the gateway, which
    // passt answers itself.
    let up = vm.sh(&format!(
        "ip link set eth1 up && ip addr add {PASST_GUEST_IP}/24 dev eth1 && \
         arping -c 1 -w 5 -I eth1 {PASST_GATEWAY}; ip addr show dev eth1"
    ));
    assert!(
        up.contains(&format!("inet {PASST_GUEST_IP}/24")),
        "eth1 (passt) up:\n{up}"
    );
    vm.sh(&format!(
        "(nc -l -p {PASST_GUEST_PORT} < /tmp/out > /tmp/in-passt &) && \
         for i in 1 2 3 4 5 6 7 8 9 10; do netstat -tln | grep -q ':{PASST_GUEST_PORT} ' && \
         break; sleep 1; done; netstat -tln | grep ':{PASST_GUEST_PORT} '"
    ));
    let from_guest = forward_exchange(port, to_guest.to_vec(), true)
        .join()
        .expect("passt forward thread")
        .unwrap_or_else(|e| panic!("passt's forward: {e}\n{}", vm.console()));
    assert!(
        from_guest.len() == 131072 && sha256_of(scratch, &from_guest) == out_sha,
        "guest -> host through passt: {} bytes, expected 131072 with sha256 {out_sha}",
        from_guest.len()
    );
    let to_guest_sha = sha256_of(scratch, to_guest);
    let got = vm.sh(
        "while pidof nc >/dev/null; do sleep 1; done; sha256sum /tmp/in-passt; \
         wc -c < /tmp/in-passt",
    );
    assert!(
        got.contains(&to_guest_sha) && got.contains(&to_guest.len().to_string()),
        "host -> guest through passt ({} bytes, sha256 {to_guest_sha}):\n{got}",
        to_guest.len()
    );
    eprintln!(
        "figures (kernel): passt NIC up and both ways {:.1?}",
        started.elapsed()
    );
}

fn network(mode: IrqChip) {
    let Some((kernel, initramfs)) = test_kernel() else {
        return;
    };
    let scratch = Scratch::new(&format!("net-{}", mode.env_value()));
    let large = large_payload();
    let large_sha = sha256_of(&scratch, &large);
    let server = HttpServer::start(large);
    let fwd_port = free_tcp_port();

    // passt in one irqchip mode only: the guest's side is the same in both, and each
    // exchange costs tens of seconds of emulated network stack.
    let passt_port = free_tcp_port();
    let passt = match mode {
        IrqChip::Kernel => Passt::start(&scratch, passt_port),
        IrqChip::User => None,
    };

    let mut linux = Linux::new(&kernel, &initramfs, mode);
    linux.devices = vec![format!(
        "2,virtio-net,dns=off,hostfwd=tcp:127.0.0.1:{fwd_port}-:{GUEST_PORT}"
    )];
    if let Some(passt) = &passt {
        linux
            .devices
            .push(format!("3,virtio-net,socket={}", passt.socket.display()));
    }
    linux.cmdline = "ip=dhcp".into();
    let mut vm = linux.boot();

    // Kernel mode: IP autoconfiguration through the built-in DHCP server.
    let lease = format!("my address is {GUEST_IP}");
    let to_lease = vm.wait_for(&lease, boot_timeout());
    vm.wait_for(PROMPT, boot_timeout());
    let console = vm.console();
    assert!(
        console.contains(&format!("Got DHCP answer from {GATEWAY}"))
            && console.contains(&format!("ipaddr={GUEST_IP}"))
            && console.contains(&format!("gw={GATEWAY}")),
        "the kernel's IP-Config names the lease:\n{console}"
    );
    let stderr = vm.stderr();
    assert!(
        stderr.contains(&format!("has IPv4 address {GUEST_IP} (DHCP)")),
        "xhyve's info log names the guest's address:\n{stderr}"
    );
    eprintln!(
        "figures ({}): kernel lease {to_lease:.1?} after start",
        mode.env_value()
    );

    // User space: forget the kernel's configuration, lease again with udhcpc.
    // Deleting the last address takes the routes through eth0 with it.
    let cleared = vm.sh("ip addr flush dev eth0 && ip addr show dev eth0 && ip route");
    assert!(
        !cleared.contains("inet ") && !cleared.contains("default"),
        "eth0 cleared:\n{cleared}"
    );
    vm.sh(&format!(
        "printf '%s\\n' '{}' > /tmp/udhcpc.sh && chmod +x /tmp/udhcpc.sh",
        UDHCPC_SCRIPT.join("' '")
    ));
    let started = Instant::now();
    let udhcpc = vm.sh("udhcpc -f -q -n -t 5 -T 3 -i eth0 -s /tmp/udhcpc.sh");
    assert!(
        udhcpc.contains(&format!("lease of {GUEST_IP} obtained"))
            && udhcpc.contains(&format!("eth0 {GUEST_IP}/24 via {GATEWAY}")),
        "udhcpc's lease, configured by its script:\n{udhcpc}"
    );
    let addr = vm.sh("ip addr show dev eth0; ip route");
    assert!(
        addr.contains(&format!("inet {GUEST_IP}/24"))
            && addr.contains(&format!("default via {GATEWAY}")),
        "eth0 configured from udhcpc's lease:\n{addr}"
    );
    let to_udhcpc = started.elapsed();
    // The device announces the MTU its receive buffers hold (F_MTU): a larger one, as
    // passt's DHCP offers, is refused instead of breaking TCP.
    let mtu = vm.sh("! ip link set dev eth0 mtu 65520 2>/dev/null && cat /sys/class/net/eth0/mtu");
    // (The kernel's refusal, "mtu greater than device maximum", may land on the console.)
    assert_eq!(
        mtu.trim().lines().last(),
        Some("1500"),
        "eth0's MTU:\n{mtu}"
    );

    // A raw HTTP request through busybox nc, then 1 MiB through wget.
    let started = Instant::now();
    let port = server.port;
    let small = vm.sh(&format!(
        "printf 'GET /small HTTP/1.0\\r\\n\\r\\n' | nc {GATEWAY} {port} > /tmp/small && \
         tail -n 1 /tmp/small; echo"
    ));
    assert_eq!(small.trim(), SMALL, "the small file through nc");
    vm.sh(&format!(
        "wget -q -O /tmp/large http://{GATEWAY}:{port}/large"
    ));
    let to_http = started.elapsed();
    let sum = vm.sh("sha256sum /tmp/large; wc -c < /tmp/large");
    assert!(
        sum.contains(&large_sha) && sum.contains(&LARGE_LEN.to_string()),
        "the 1 MiB file through wget (sha256 {large_sha}):\n{sum}"
    );
    let requests = server.finish();
    assert_eq!(
        requests,
        ["GET /small HTTP/1.0", "GET /large HTTP/1.1"],
        "the requests the host's server saw"
    );

    // The forward: the guest sends 128 KiB (the head of its busybox binary), the host
    // answers with its own payload; each side's sha256 is compared with the other's.
    let started = Instant::now();
    let to_guest: Vec<u8> = (0..4000)
        .flat_map(|i| format!("host line {i}\n").into_bytes())
        .collect();
    let to_guest_sha = sha256_of(&scratch, &to_guest);
    let out = vm.sh("head -c 131072 /bin/busybox > /tmp/out && sha256sum /tmp/out");
    let out_sha = out
        .lines()
        .find(|l| l.ends_with("/tmp/out"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("the guest's sha256 of /tmp/out:\n{out}"))
        .to_string();
    let prepared = started.elapsed();
    vm.sh(&format!(
        "(nc -l -p {GUEST_PORT} < /tmp/out > /tmp/in &) && \
         for i in 1 2 3 4 5 6 7 8 9 10; do netstat -tln | grep -q ':{GUEST_PORT} ' && break; \
         sleep 1; done; netstat -tln | grep ':{GUEST_PORT} '"
    ));
    let listening = started.elapsed();
    let exchange = forward_exchange(fwd_port, to_guest.clone(), false);
    let from_guest = exchange
        .join()
        .expect("forward thread")
        .unwrap_or_else(|e| panic!("the forward: {e}\n{}", vm.console()));
    assert!(
        from_guest.len() == 131072 && sha256_of(&scratch, &from_guest) == out_sha,
        "guest -> host through the forward: {} bytes, expected 131072 with sha256 {out_sha}",
        from_guest.len()
    );
    let exchanged = started.elapsed();
    let got =
        vm.sh("while pidof nc >/dev/null; do sleep 1; done; sha256sum /tmp/in; wc -c < /tmp/in");
    assert!(
        got.contains(&to_guest_sha) && got.contains(&to_guest.len().to_string()),
        "host -> guest through the forward ({} bytes, sha256 {to_guest_sha}):\n{got}",
        to_guest.len()
    );
    let to_forward = started.elapsed();
    eprintln!(
        "figures ({}): udhcpc {to_udhcpc:.1?}, nc + 1 MiB wget {to_http:.1?}, forward both \
         ways {to_forward:.1?} (file ready {prepared:.1?}, guest listening {listening:.1?}, \
         exchange done {exchanged:.1?})",
        mode.env_value()
    );

    if passt.is_some() {
        passt_exchange(&mut vm, &scratch, passt_port, &to_guest, &out_sha);
    }

    let snmp = vm.sh("grep -A1 ^Tcp: /proc/net/snmp; cat /proc/net/dev");
    eprintln!("figures ({}): guest counters:\n{snmp}", mode.env_value());
    if std::env::var_os("XHYVE_TEST_SHOW_CONSOLE").is_some() {
        eprintln!(
            "--- console ---\n{}\n--- stderr ---\n{}",
            vm.console(),
            vm.stderr()
        );
    }
    vm.end_with("poweroff -f", 1);
    // The device owned the stack: it was stopped and joined at shutdown.
    thread::sleep(Duration::from_millis(300));
    assert!(
        vm.stderr().contains("virtio-net user: the stack stopped"),
        "the stack thread joined at exit:\n{}",
        vm.stderr()
    );
}

guest_test!(linux_on_the_built_in_network, |mode| network(mode));
