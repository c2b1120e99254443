//! The few frames an IPv4 client sends and reads (ARP, UDP, DHCP), built and parsed on the
//! host side: for the network back ends' tests, their benchmark and the fuzz target's seeds.
//! Parsers return `None` on anything malformed.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::MacAddr;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const IPPROTO_UDP: u8 = 17;
pub const BROADCAST: MacAddr = MacAddr([0xFF; 6]);

/// The Internet checksum (RFC 1071) of `data`, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum = sum.wrapping_add(u32::from(word));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: MacAddr, src: MacAddr, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// "Who has `target`? Tell `ip`."
pub fn arp_request(mac: MacAddr, ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, ETHERTYPE_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac.0);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// An ARP reply's sender: (its MAC, its address).
pub fn arp_reply(frame: &[u8]) -> Option<(MacAddr, Ipv4Addr)> {
    let arp = frame.get(14..42)?;
    if u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_ARP
        || arp[..8] != [0, 1, 8, 0, 6, 4, 0, 2]
    {
        return None;
    }
    let mut mac = [0; 6];
    mac.copy_from_slice(&arp[8..14]);
    Some((
        MacAddr(mac),
        Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]),
    ))
}

/// A UDP datagram in an IPv4 packet in an Ethernet frame, checksums filled in.
pub fn udp(
    dst_mac: MacAddr,
    src_mac: MacAddr,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut f = ethernet(dst_mac, src_mac, ETHERTYPE_IPV4);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = IPPROTO_UDP;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let sum = checksum(&ip, 0);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = Vec::with_capacity(udp_len);
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.ip().octets());
    pseudo.extend_from_slice(&dst.ip().octets());
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let partial = u32::from(!checksum(&pseudo, 0));
    let sum = match checksum(&udp, partial) {
        0 => 0xFFFF,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// A UDP datagram's (source, destination, payload), from an unfragmented IPv4 packet.
pub fn parse_udp(frame: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
    if frame.len() < 14 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(*ip.first()? & 0xF) * 4;
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP || ihl < 20 {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF != 0 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp = ip.get(ihl..total)?;
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    let payload = udp.get(8..len)?;
    let addr = |at: usize, port: usize| {
        SocketAddrV4::new(
            Ipv4Addr::new(ip[at], ip[at + 1], ip[at + 2], ip[at + 3]),
            u16::from_be_bytes([udp[port], udp[port + 1]]),
        )
    };
    Some((addr(12, 0), addr(16, 2), payload))
}

/// A DHCP DISCOVER (`requested == None`) or REQUEST from `mac`, broadcast.
pub fn dhcp_client(mac: MacAddr, xid: u32, requested: Option<(Ipv4Addr, Ipv4Addr)>) -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[..4].copy_from_slice(&[1, 1, 6, 0]);
    bootp[4..8].copy_from_slice(&xid.to_be_bytes());
    bootp[10] = 0x80; // broadcast replies: the client has no address yet
    bootp[28..34].copy_from_slice(&mac.0);
    bootp.extend_from_slice(&[99, 130, 83, 99]);
    match requested {
        None => bootp.extend_from_slice(&[53, 1, 1]),
        Some((addr, server)) => {
            bootp.extend_from_slice(&[53, 1, 3, 50, 4]);
            bootp.extend_from_slice(&addr.octets());
            bootp.extend_from_slice(&[54, 4]);
            bootp.extend_from_slice(&server.octets());
        }
    }
    bootp.push(255);
    udp(
        BROADCAST,
        mac,
        SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68),
        SocketAddrV4::new(Ipv4Addr::BROADCAST, 67),
        &bootp,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);

    #[test]
    fn checksums_verify_to_zero() {
        let f = udp(
            BROADCAST,
            MAC,
            "10.0.2.15:1000".parse().unwrap(),
            "10.0.2.2:2000".parse().unwrap(),
            b"odd",
        );
        assert_eq!(checksum(&f[14..34], 0), 0, "IP header");
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, IPPROTO_UDP, 0, 11]);
        assert_eq!(
            checksum(&f[34..], u32::from(!checksum(&pseudo, 0))),
            0,
            "UDP"
        );
        assert_eq!(
            parse_udp(&f),
            Some((
                "10.0.2.15:1000".parse().unwrap(),
                "10.0.2.2:2000".parse().unwrap(),
                &b"odd"[..]
            ))
        );
        assert_eq!(parse_udp(&f[..f.len() - 1]), None, "truncated");
    }

    #[test]
    fn arp_and_dhcp_shapes() {
        let a = arp_request(MAC, Ipv4Addr::new(10, 0, 2, 15), Ipv4Addr::new(10, 0, 2, 2));
        assert_eq!(a.len(), 42);
        assert_eq!(arp_reply(&a), None, "a request is not a reply");
        let mut reply = a.clone();
        reply[21] = 2;
        assert_eq!(arp_reply(&reply), Some((MAC, Ipv4Addr::new(10, 0, 2, 15))));
        let d = dhcp_client(MAC, 7, None);
        let (src, dst, bootp) = parse_udp(&d).unwrap();
        assert_eq!((src.port(), dst.port()), (68, 67));
        assert_eq!(bootp[240..], [53, 1, 1, 255]);
    }
}
