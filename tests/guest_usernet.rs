//! The user-mode network back ends through the real binary: the test guest's IPv4 client
//! (`test/guests/usernet.c`) gets a DHCP lease, resolves the gateway with ARP, sends a UDP
//! datagram to the gateway's address that reaches a listener of this test on 127.0.0.1,
//! and answers a UDP datagram and a TCP connection that this test sends to forwarded ports
//! on 127.0.0.1. Once through the built-in network (libslirp), once through passt
//! (`virtio-net,socket=PATH`) started by the test. All traffic stays on this machine: host
//! sockets are on 127.0.0.1 only, and the guest sends only to its gateway.

// Unix sockets and Debian's passt: Linux only.
#![cfg(target_os = "linux")]

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Vm;

const UUID: &str = "0c5f3b8e-7d21-4a6b-9e43-5a1d2c3b4e5f";
const GUEST_UDP: u16 = 7777;
const GUEST_TCP: u16 = 8080;

/// A UDP listener on 127.0.0.1 that answers the guest's datagrams (the guest sends again if
/// an answer is lost) until none comes for 2 s; returns the first.
fn host_listener() -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    listener
        .set_read_timeout(Some(common::GUEST_TIMEOUT))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let Ok((n, from)) = listener.recv_from(&mut buf) else {
            return Vec::new();
        };
        let first = buf[..n].to_vec();
        listener.send_to(b"xhyve-usernet host", from).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        while let Ok((_, from)) = listener.recv_from(&mut buf) {
            listener.send_to(b"xhyve-usernet host", from).unwrap();
        }
        first
    });
    (port, thread)
}

fn free_port(udp: bool) -> u16 {
    if udp {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// Sends a datagram to the forwarded port until the guest's answer comes back.
fn udp_through_forward(port: u16, vm: &mut common::Running) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let deadline = Instant::now() + common::GUEST_TIMEOUT;
    let mut buf = [0u8; 512];
    while Instant::now() < deadline && !vm.has_exited() {
        socket
            .send_to(b"xhyve-usernet host fwd", ("127.0.0.1", port))
            .unwrap();
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return buf[..n].to_vec();
        }
    }
    panic!("no answer through the UDP forward\n{}", vm.stdout_so_far());
}

/// Connects to the forwarded TCP port, sends a line and reads the guest's answer.
fn tcp_through_forward(port: u16, vm: &mut common::Running) -> Vec<u8> {
    let deadline = Instant::now() + common::GUEST_TIMEOUT;
    while Instant::now() < deadline && !vm.has_exited() {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        stream
            .set_read_timeout(Some(common::GUEST_TIMEOUT))
            .unwrap();
        stream.write_all(b"hello guest").unwrap();
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        if !reply.is_empty() {
            return reply;
        }
    }
    panic!("no answer through the TCP forward\n{}", vm.stdout_so_far());
}

/// Runs the guest against the network `device` and checks every step; `gateway` is what
/// DHCP names as the router.
/// `tcp_fwd` None: no TCP step.
fn run_guest(
    mode: common::IrqChip,
    device: &str,
    udp_fwd: u16,
    tcp_fwd: Option<u16>,
    host_port: u16,
) -> common::Outcome {
    let tcp = if tcp_fwd.is_some() {
        format!(" tcp {GUEST_TCP}")
    } else {
        String::new()
    };
    let mut vm = Vm::multiboot(&format!("usernet port {host_port} fwd {GUEST_UDP}{tcp}"))
        .pci(&["0:0,hostbridge", device, "31,lpc"])
        .args(["-U", UUID])
        .env("XHYVE_LOG", "info")
        .irqchip(mode)
        .spawn();
    vm.wait_for_line("usernet fwd ready");
    let answer = udp_through_forward(udp_fwd, &mut vm);
    assert_eq!(answer, b"xhyve-usernet fwd reply");
    if let Some(tcp_fwd) = tcp_fwd {
        vm.wait_for_line("usernet tcp ready");
        let answer = tcp_through_forward(tcp_fwd, &mut vm);
        assert_eq!(answer, b"xhyve-usernet tcp reply");
    }
    let out = vm.finish();
    out.assert_exit(1)
        .assert_line("usernet udp sent")
        .assert_line("usernet udp reply xhyve-usernet host")
        .assert_line("usernet fwd got xhyve-usernet host fwd")
        .assert_line("usernet ok");
    if tcp_fwd.is_some() {
        out.assert_line("usernet tcp syn answered")
            .assert_line("usernet tcp got hello guest");
    }
    out
}

guest_test!(user_network_dhcp_arp_udp_and_forwards, |mode| {
    let (host_port, listener) = host_listener();
    let (udp_fwd, tcp_fwd) = (free_port(true), free_port(false));
    let device = format!(
        "2,virtio-net,user,dns=off,hostfwd=udp:127.0.0.1:{udp_fwd}-:{GUEST_UDP},hostfwd=tcp:127.0.0.1:{tcp_fwd}-:{GUEST_TCP}"
    );
    let out = run_guest(mode, &device, udp_fwd, Some(tcp_fwd), host_port);
    out.assert_line("usernet dhcp 10.0.2.15 router 10.0.2.2");
    let arp = out
        .lines()
        .find(|l| l.starts_with("usernet arp 10.0.2.2 is "))
        .unwrap_or_else(|| panic!("no ARP answer\n{out}"));
    assert!(!arp.ends_with("00:00:00:00:00:00"), "{arp}");
    assert_eq!(listener.join().unwrap(), b"xhyve-usernet guest");
    assert!(
        out.stderr.contains("has IPv4 address 10.0.2.15 (DHCP)"),
        "the VMM logs the guest's lease\n{out}"
    );
});

/// passt, started by the test on a socket in a fresh directory; killed on drop.
struct Passt {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Passt {
    /// `None` (after a note) when Debian's passt is not installed.
    fn start(tag: &str, udp_fwd: u16, tcp_fwd: u16) -> Option<Passt> {
        let dir = std::env::temp_dir().join(format!("xhyve-passt-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // passt started as root drops to "nobody" before it binds its socket: that user must
        // be able to create it here.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.join("passt.sock");
        // Foreground, one client, IPv4 only, no DNS handed out, forwards bound to 127.0.0.1
        // only. The guest talks only to its gateway, which passt maps to the host's loopback.
        let spawned = Command::new("passt")
            .args([
                "-f",
                "-1",
                "-4",
                "-D",
                "none",
                "--no-dhcp-dns",
                "--no-dhcp-search",
            ])
            .arg("--socket")
            .arg(&socket)
            .args(["-t", &format!("127.0.0.1/{tcp_fwd}:{GUEST_TCP}")])
            .args(["-u", &format!("127.0.0.1/{udp_fwd}:{GUEST_UDP}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if std::env::var_os("XHYVE_REQUIRE_KVM").is_some_and(|v| v == "1") {
                    panic!("XHYVE_REQUIRE_KVM=1 but passt cannot run: {e} (apt-get install passt)");
                }
                eprintln!("note: skipping the passt test: {e} (apt-get install passt)");
                return None;
            }
        };
        let passt = Passt { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !passt.socket.exists() {
            assert!(Instant::now() < deadline, "passt made no socket");
            std::thread::sleep(Duration::from_millis(20));
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

guest_test!(passt_over_a_stream_socket, |mode| {
    let (host_port, listener) = host_listener();
    let (udp_fwd, tcp_fwd) = (free_port(true), free_port(false));
    let tag = match mode {
        common::IrqChip::Kernel => "k",
        common::IrqChip::User => "u",
    };
    let Some(passt) = Passt::start(tag, udp_fwd, tcp_fwd) else {
        return;
    };
    let device = format!("2,virtio-net,socket={}", passt.socket.display());
    let out = run_guest(mode, &device, udp_fwd, Some(tcp_fwd), host_port);
    assert!(out.lines().any(|l| l.starts_with("usernet dhcp ")), "{out}");
    assert_eq!(listener.join().unwrap(), b"xhyve-usernet guest");
    let dhcp = out
        .lines()
        .find(|l| l.starts_with("usernet dhcp "))
        .unwrap();
    let address = dhcp.split(' ').nth(2).unwrap();
    assert!(
        out.stderr
            .contains(&format!("has IPv4 address {address} (DHCP)")),
        "the VMM learns passt's lease too\n{out}"
    );
    drop(passt);
});

#[test]
fn print_mac_derives_the_user_network_mac() {
    let out = common::run_xhyve([
        "-M",
        "-s",
        "5,virtio-net,user,mac=02:12:34:56:78:9a",
        "-f",
        "kexec,/nonexistent",
    ]);
    out.assert_exit(0).assert_line("MAC: 02:12:34:56:78:9a");
}

#[test]
fn a_missing_daemon_socket_is_a_clear_setup_error() {
    if !common::kvm_usable() {
        return;
    }
    let out = Vm::multiboot("poweroff")
        .pci(&[
            "0:0,hostbridge",
            "3,virtio-net,socket=/nonexistent/passt.sock",
            "31,lpc",
        ])
        .run();
    out.assert_exit(1);
    assert!(
        out.stderr
            .contains("cannot connect to /nonexistent/passt.sock"),
        "{out}"
    );
}
