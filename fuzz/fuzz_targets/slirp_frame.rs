//! A hostile guest's frames into the built-in network (libslirp) through the same link the
//! virtio-net device uses: malformed Ethernet, ARP, IPv4, UDP, TCP, ICMP and DHCP. Each
//! input is one or more frames (split at 2-byte big-endian lengths), followed by an ARP
//! request whose answer proves the stack took them all and is still alive. The stack has
//! `restrict` and `dns=off` set, so nothing a fuzzed frame asks for leaves this machine.
#![no_main]

use std::net::Ipv4Addr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use xhyve::net::options::UserNetOptions;
use xhyve::net::packet::{arp_reply, arp_request};
use xhyve::net::slirp::{UserNet, GATEWAY};
use xhyve::net::socket::DgramSocket;
use xhyve::net::{MacAddr, NetBackend};

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x15]);

fn stack() -> &'static Mutex<(UserNet, DgramSocket)> {
    static STACK: OnceLock<Mutex<(UserNet, DgramSocket)>> = OnceLock::new();
    STACK.get_or_init(|| {
        let options = UserNetOptions {
            restrict: true,
            no_dns: true,
            ..Default::default()
        };
        Mutex::new(UserNet::start(&options, MAC).expect("libslirp starts"))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut guard = stack().lock().unwrap_or_else(|p| p.into_inner());
    let link = &mut guard.1;
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let _ = link.send(&rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    let probe = arp_request(MAC, Ipv4Addr::new(10, 0, 2, 15), GATEWAY);
    link.send(&probe).expect("the link is up");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    loop {
        assert!(Instant::now() < deadline, "the stack stopped answering ARP");
        match link.recv(&mut buf) {
            Ok(n) if arp_reply(&buf[..n]).is_some_and(|(_, ip)| ip == GATEWAY) => break,
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_micros(50)),
        }
    }
});
