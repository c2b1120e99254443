//! Network back ends alone, from the device's side of the link (no guest): UDP frames with
//! 1400-byte payloads, guest to host (to the gateway's address, i.e. a 127.0.0.1 listener
//! of this harness) and host to guest (from 127.0.0.1 to a forwarded port), through the
//! built-in network (libslirp) and through passt (`virtio-net,socket=`, if installed).
//! Every socket is on 127.0.0.1.
//!
//!     cargo bench --bench net [-- --frames N]
//!
//! Figures: frames per second delivered (the link or the listener counts them) and the
//! payload rate. Both stacks drop when flooded, so "delivered" can be below "sent".

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use xhyve::net::dhcp::{dhcp_ack, dhcp_reply, DHCPOFFER};
use xhyve::net::options::{HostFwd, UserNetOptions};
use xhyve::net::packet::{self, arp_reply};
use xhyve::net::slirp::UserNet;
use xhyve::net::socket::StreamSocket;
use xhyve::net::{MacAddr, NetBackend};

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x42]);
const PAYLOAD: usize = 1400;
const GUEST_PORT: u16 = 7777;

fn wait_frame<T>(link: &mut dyn NetBackend, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match link.recv(&mut buf) {
            Ok(n) => {
                if let Some(t) = pick(&buf[..n]) {
                    return t;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_micros(200))
            }
            Err(e) => panic!("link: {e}"),
        }
    }
    panic!("no answer from the back end");
}

/// DHCP and ARP: (guest address, gateway address, gateway MAC).
fn join(link: &mut dyn NetBackend) -> (Ipv4Addr, Ipv4Addr, MacAddr) {
    link.send(&packet::dhcp_client(MAC, 9, None)).unwrap();
    let offer = wait_frame(link, |f| {
        dhcp_reply(f).filter(|r| r.message_type == DHCPOFFER)
    });
    let server = offer.server.unwrap();
    link.send(&packet::dhcp_client(MAC, 9, Some((offer.yiaddr, server))))
        .unwrap();
    let addr = wait_frame(link, |f| dhcp_ack(f).map(|(_, a)| a));
    // Both stacks name their gateway as the DHCP server.
    let gateway = server;
    link.send(&packet::arp_request(MAC, addr, gateway)).unwrap();
    let (gw_mac, _) = wait_frame(link, |f| arp_reply(f).filter(|(_, ip)| *ip == gateway));
    (addr, gateway, gw_mac)
}

fn report(what: &str, frames: u64, elapsed: Duration) {
    let s = elapsed.as_secs_f64();
    println!(
        "{what:<34} {:>9.0} frames/s {:>8.1} MB/s payload ({frames} frames in {s:.2} s)",
        frames as f64 / s,
        frames as f64 * PAYLOAD as f64 / s / 1e6
    );
}

/// Guest to host: `count` frames to the gateway's `port`, counted by the listener.
fn guest_to_host(
    what: &str,
    link: &mut dyn NetBackend,
    me: (Ipv4Addr, Ipv4Addr, MacAddr),
    count: u64,
) {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let frame = packet::udp(
        me.2,
        MAC,
        SocketAddrV4::new(me.0, 5000),
        SocketAddrV4::new(me.1, port),
        &[0x5A; PAYLOAD],
    );
    let counter = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0u64;
        let mut last = Instant::now();
        while listener.recv_from(&mut buf).is_ok() {
            got += 1;
            last = Instant::now();
        }
        (got, last)
    });
    let start = Instant::now();
    for i in 0..count {
        link.send(&frame).unwrap();
        // Let the stack breathe now and then, as a guest's ring would pace it.
        if i % 64 == 63 {
            std::thread::yield_now();
        }
    }
    let (got, last) = counter.join().unwrap();
    report(
        &format!("{what} guest->host ({got}/{count})"),
        got,
        last - start,
    );
}

/// Host to guest: `count` datagrams to the forwarded `port`, counted at the link.
fn host_to_guest(what: &str, link: &mut dyn NetBackend, port: u16, count: u64) {
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    let start = Instant::now();
    let mut got = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut last = start;
    let mut sent = 0u64;
    let mut idle_since = None;
    loop {
        if sent < count {
            sender
                .send_to(&[0xA5; PAYLOAD], ("127.0.0.1", port))
                .unwrap();
            sent += 1;
        }
        loop {
            match link.recv(&mut buf) {
                Ok(n) if n > PAYLOAD => {
                    got += 1;
                    last = Instant::now();
                    idle_since = None;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if sent == count {
            let idle = *idle_since.get_or_insert_with(Instant::now);
            if idle.elapsed() > Duration::from_millis(300) {
                break;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    report(
        &format!("{what} host->guest ({got}/{count})"),
        got,
        last - start,
    );
}

fn passt(udp_fwd: u16) -> Option<(Child, std::path::PathBuf)> {
    let dir = std::env::temp_dir().join(format!("xhyve-bench-passt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).ok()?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).ok()?;
    let socket = dir.join("passt.sock");
    let child = Command::new("passt")
        .args([
            "-f",
            "-1",
            "-4",
            "-D",
            "none",
            "--no-dhcp-dns",
            "--no-dhcp-search",
            "-t",
            "none",
        ])
        .arg("--socket")
        .arg(&socket)
        .args(["-u", &format!("127.0.0.1/{udp_fwd}:{GUEST_PORT}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((child, socket))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: u64 = args
        .iter()
        .position(|a| a == "--frames")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);

    let udp_fwd = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = UserNetOptions {
        hostfwd: vec![HostFwd {
            udp: true,
            host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, udp_fwd),
            guest_addr: None,
            guest_port: GUEST_PORT,
        }],
        restrict: false,
        no_dns: true,
    };
    let (_stack, mut link) = UserNet::start(&options, MAC).unwrap();
    let me = join(&mut link);
    guest_to_host("slirp", &mut link, me, count);
    host_to_guest("slirp", &mut link, udp_fwd, count);

    let udp_fwd = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match passt(udp_fwd) {
        Some((mut child, socket)) => {
            let mut link = StreamSocket::connect(&socket).unwrap();
            let me = join(&mut link);
            guest_to_host("passt", &mut link, me, count);
            host_to_guest("passt", &mut link, udp_fwd, count);
            drop(link);
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(socket.parent().unwrap());
        }
        None => println!("passt: not installed, skipped"),
    }
}
