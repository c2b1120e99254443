//! The stack in-process, driven from the device's end of the frame link as a guest would:
//! DHCP, ARP for the gateway, UDP to a 127.0.0.1 listener through the gateway, and a UDP
//! host forward. Every socket is on 127.0.0.1.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use super::*;
use crate::net::dhcp::{dhcp_reply, DHCPOFFER};
use crate::net::options::HostFwd;
use crate::net::packet::{self, arp_reply, parse_udp};
use crate::net::NetBackend;

const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x15]);

/// Waits for the first frame from the stack that `pick` accepts.
fn expect<T>(link: &mut DgramSocket, what: &str, mut pick: impl FnMut(&[u8]) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline {
        match link.recv(&mut buf) {
            Ok(n) => {
                if let Some(found) = pick(&buf[..n]) {
                    return found;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: nothing from the stack in 5 s");
}

/// Runs DHCP to the end; returns the guest's address and the gateway's MAC.
pub(crate) fn dhcp(link: &mut DgramSocket, mac: MacAddr) -> (Ipv4Addr, MacAddr) {
    link.send(&packet::dhcp_client(mac, 0x1234, None)).unwrap();
    let offer = expect(link, "DHCP offer", |f| {
        dhcp_reply(f).filter(|r| r.message_type == DHCPOFFER)
    });
    let server = offer.server.expect("server id");
    link.send(&packet::dhcp_client(
        mac,
        0x1234,
        Some((offer.yiaddr, server)),
    ))
    .unwrap();
    let ack = expect(link, "DHCP ack", |f| {
        crate::net::dhcp::dhcp_ack(f)
            .map(|(client, addr)| (client, addr, MacAddr(f[6..12].try_into().unwrap())))
    });
    assert_eq!(ack.0, mac);
    (ack.1, ack.2)
}

#[test]
fn a_guest_gets_a_lease_the_gateway_and_the_hosts_loopback() {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (net, mut link) = UserNet::start(&UserNetOptions::default(), MAC).unwrap();
    assert_eq!(net.guest_ip(), None);

    let (addr, gw_mac) = dhcp(&mut link, MAC);
    assert_eq!(addr, DHCP_START);
    assert_eq!(
        net.guest_ip(),
        Some(DHCP_START),
        "the lease is known to the VMM"
    );

    link.send(&packet::arp_request(MAC, addr, GATEWAY)).unwrap();
    let (mac, ip) = expect(&mut link, "ARP reply", arp_reply);
    assert_eq!((mac, ip), (gw_mac, GATEWAY));

    // The gateway is the host's loopback: a datagram to 10.0.2.2:port reaches 127.0.0.1:port.
    let guest = SocketAddrV4::new(addr, 40000);
    link.send(&packet::udp(
        gw_mac,
        MAC,
        guest,
        SocketAddrV4::new(GATEWAY, port),
        b"to host",
    ))
    .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = listener.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"to host");
    listener.send_to(b"to guest", from).unwrap();
    let (src, dst, payload) = expect(&mut link, "UDP reply", |f| {
        parse_udp(f).map(|(s, d, p)| (s, d, p.to_vec()))
    });
    assert_eq!(
        (src, dst, payload.as_slice()),
        (SocketAddrV4::new(GATEWAY, port), guest, &b"to guest"[..])
    );
    drop(net);
}

#[test]
fn udp_host_forwards_reach_the_guest_and_a_busy_port_is_an_error() {
    for restrict in [false, true] {
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        let host = match probe.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let options = UserNetOptions {
            hostfwd: vec![HostFwd {
                udp: true,
                host,
                guest_addr: None,
                guest_port: 7777,
            }],
            restrict,
            no_dns: true,
        };
        match UserNet::start(&options, MAC) {
            Err(SlirpError::HostFwd {
                proto: "udp",
                host: h,
            }) => assert_eq!(h, host),
            other => panic!("busy port: {:?}", other.map(|_| ())),
        }
        drop(probe);

        let (_net, mut link) = UserNet::start(&options, MAC).unwrap();
        let (addr, gw_mac) = dhcp(&mut link, MAC);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(if restrict {
                300
            } else {
                5000
            })))
            .unwrap();
        client.send_to(b"ping guest", host).unwrap();
        let (src, dst, payload) = expect(&mut link, "forwarded datagram", |f| {
            parse_udp(f)
                .filter(|(_, d, _)| d.port() == 7777)
                .map(|(s, d, p)| (s, d, p.to_vec()))
        });
        assert_eq!(dst, SocketAddrV4::new(addr, 7777));
        assert_eq!(payload, b"ping guest");
        link.send(&packet::udp(gw_mac, MAC, dst, src, b"pong host"))
            .unwrap();
        let mut buf = [0u8; 64];
        let reply = client.recv_from(&mut buf);
        if restrict {
            // libslirp's restricted mode drops every UDP datagram from the guest, replies to
            // a forward included: UDP forwards then carry host-to-guest traffic only.
            assert!(reply.is_err(), "restricted guest's UDP got out");
        } else {
            assert_eq!(&buf[..reply.unwrap().0], b"pong host");
        }
    }
}

#[test]
fn restrict_keeps_the_guest_from_the_host() {
    let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
    listener
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let options = UserNetOptions {
        restrict: true,
        ..Default::default()
    };
    let (_net, mut link) = UserNet::start(&options, MAC).unwrap();
    let (addr, gw_mac) = dhcp(&mut link, MAC);
    let guest = SocketAddrV4::new(addr, 40000);
    link.send(&packet::udp(
        gw_mac,
        MAC,
        guest,
        SocketAddrV4::new(GATEWAY, port),
        b"escape",
    ))
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        listener.recv_from(&mut buf).is_err(),
        "restrict let a datagram out"
    );
}

#[test]
fn the_config_matches_the_c_layout() {
    // Measured with the C compiler against libslirp 4.7's header (x86_64 and aarch64 alike).
    assert_eq!(std::mem::size_of::<ffi::SlirpConfig>(), 184);
    assert_eq!(std::mem::offset_of!(ffi::SlirpConfig, disable_dns), 176);
    assert_eq!(std::mem::offset_of!(ffi::SlirpConfig, if_mtu), 136);
    assert_eq!(std::mem::offset_of!(ffi::SlirpConfig, outbound_addr), 160);
    assert_eq!(std::mem::size_of::<ffi::SlirpCb>(), 88);
    assert!(version().starts_with('4'), "{}", version());
}

/// An ICMP echo request in an IPv4 packet, checksums filled in.
fn icmp_echo(dst_mac: MacAddr, src: Ipv4Addr, dst: Ipv4Addr, id: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&1u16.to_be_bytes());
    icmp.extend_from_slice(b"xhyve ping");
    let sum = packet::checksum(&icmp, 0);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = packet::checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = dst_mac.0.to_vec();
    f.extend_from_slice(&MAC.0);
    f.extend_from_slice(&packet::ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

#[test]
fn the_gateway_answers_ping() {
    // The stack answers echo requests to its own addresses itself: no host socket, nothing
    // leaves the process. (Pings elsewhere use the host's ping sockets where allowed.)
    let (_net, mut link) = UserNet::start(&UserNetOptions::default(), MAC).unwrap();
    let (addr, gw_mac) = dhcp(&mut link, MAC);
    link.send(&icmp_echo(gw_mac, addr, GATEWAY, 0x4242))
        .unwrap();
    let reply = expect(&mut link, "echo reply", |f| {
        let ip = f.get(14..)?;
        (f[12..14] == [8, 0] && ip[9] == 1 && ip.get(20) == Some(&0)).then(|| ip[20..].to_vec())
    });
    assert_eq!(
        reply[4..6],
        0x4242u16.to_be_bytes(),
        "the echo's identifier"
    );
    assert!(reply.ends_with(b"xhyve ping"));
}

/// A device handle that only counts what it is asked.
#[derive(Default)]
struct Counting(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl DeviceHandle for Counting {
    fn pause(&mut self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn shutdown(&mut self) {
        self.0.fetch_add(100, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn shutting_the_device_down_stops_the_stack_and_frees_its_forwards() {
    // The device manager outlives the run loop (signal and API threads hold it), so the
    // stack must stop on the handle's shutdown, not wait for a drop that never comes.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let options = UserNetOptions {
        hostfwd: vec![HostFwd {
            udp: false,
            host: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
            guest_addr: None,
            guest_port: 22,
        }],
        ..Default::default()
    };
    let (net, mut link) = UserNet::start(&options, MAC).unwrap();
    assert!(net.is_running());
    dhcp(&mut link, MAC);
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_err(),
        "the forward listens on {port}"
    );
    let calls = Counting::default();
    let seen = calls.0.clone();
    let mut handle = UserNetHandle::new(Box::new(calls), net);
    handle.pause();
    assert_eq!(seen.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_err(),
        "a pause leaves the stack running"
    );
    let started = Instant::now();
    handle.shutdown();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the stack stopped promptly"
    );
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::Relaxed),
        101,
        "the device's own handle is shut down too"
    );
    std::net::TcpListener::bind(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("port {port} still held after shutdown: {e}"));
    // The link's far end is gone: the device's sends fail instead of queueing for nobody.
    assert!(link.send(&packet::dhcp_client(MAC, 8, None)).is_err());
    handle.shutdown();
}
