//! Learning the guest's IPv4 address from the DHCP ACK its network hands it, so nobody has to
//! scrape a lease file (docker-machine's "IP not found for MAC in DHCP leases"). Frames from
//! the network to the guest pass [`GuestLease::observe`]; only a well-formed BOOTP reply
//! carrying DHCP message type ACK counts. Parsing never trusts a length it did not check.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

use super::MacAddr;

const ETHERTYPE_IPV4: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
const BOOTPS: u16 = 67;
const BOOTPC: u16 = 68;
const BOOTREPLY: u8 = 2;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// Fixed BOOTP fields before the options (RFC 2131, figure 1), plus the cookie.
const BOOTP_FIXED: usize = 236;
const OPTION_PAD: u8 = 0;
const OPTION_END: u8 = 255;
const OPTION_MESSAGE_TYPE: u8 = 53;
const DHCPACK: u8 = 5;

const OPTION_SERVER_ID: u8 = 54;
pub const DHCPOFFER: u8 = 2;

/// What a DHCP server's reply says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpReply {
    pub client: MacAddr,
    pub yiaddr: Ipv4Addr,
    /// Option 53 (2 offer, 5 ack, ...).
    pub message_type: u8,
    /// Option 54, where present.
    pub server: Option<Ipv4Addr>,
}

/// The client hardware address and the address a DHCP ACK in `frame` assigns, if it is one.
pub fn dhcp_ack(frame: &[u8]) -> Option<(MacAddr, Ipv4Addr)> {
    dhcp_reply(frame)
        .filter(|r| r.message_type == DHCPACK)
        .map(|r| (r.client, r.yiaddr))
}

/// Parses a DHCP reply (BOOTP reply with a message type) from an Ethernet frame.
pub fn dhcp_reply(frame: &[u8]) -> Option<DhcpReply> {
    if frame.len() < 14 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return None;
    }
    let ip = &frame[14..];
    if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != IPPROTO_UDP {
        return None;
    }
    // A fragment cannot be parsed on its own (more-fragments flag or an offset).
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF != 0 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0xF) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ihl < 20 || total < ihl || total > ip.len() {
        return None;
    }
    let udp = &ip[ihl..total];
    if udp.len() < 8
        || u16::from_be_bytes([udp[0], udp[1]]) != BOOTPS
        || u16::from_be_bytes([udp[2], udp[3]]) != BOOTPC
    {
        return None;
    }
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < 8 || udp_len > udp.len() {
        return None;
    }
    let bootp = &udp[8..udp_len];
    if bootp.len() < BOOTP_FIXED + 4
        || bootp[0] != BOOTREPLY
        || bootp[BOOTP_FIXED..BOOTP_FIXED + 4] != MAGIC_COOKIE
    {
        return None;
    }
    let yiaddr = Ipv4Addr::new(bootp[16], bootp[17], bootp[18], bootp[19]);
    let mut chaddr = [0u8; 6];
    chaddr.copy_from_slice(&bootp[28..34]);
    let mut options = &bootp[BOOTP_FIXED + 4..];
    let (mut message_type, mut server) = (None, None);
    while let Some((&code, rest)) = options.split_first() {
        match code {
            OPTION_PAD => options = rest,
            OPTION_END => break,
            _ => {
                let (&len, rest) = rest.split_first()?;
                let value = rest.get(..usize::from(len))?;
                match (code, value) {
                    (OPTION_MESSAGE_TYPE, &[t]) => message_type = Some(t),
                    (OPTION_SERVER_ID, &[a, b, c, d]) => server = Some(Ipv4Addr::new(a, b, c, d)),
                    _ => {}
                }
                options = &rest[usize::from(len)..];
            }
        }
    }
    Some(DhcpReply {
        client: MacAddr(chaddr),
        yiaddr,
        message_type: message_type?,
        server,
    })
}

/// The guest's current IPv4 address as its network last acknowledged it.
#[derive(Debug, Default)]
pub struct GuestLease {
    /// 0: none yet (0.0.0.0 is never a lease).
    addr: AtomicU32,
}

impl GuestLease {
    pub fn get(&self) -> Option<Ipv4Addr> {
        match self.addr.load(Ordering::Relaxed) {
            0 => None,
            a => Some(Ipv4Addr::from(a)),
        }
    }

    /// Looks at a frame on its way to the guest whose MAC is `guest`; logs a new lease at
    /// info level (what `XHYVE_LOG=info` shows).
    pub fn observe(&self, frame: &[u8], guest: MacAddr, what: &str) {
        let Some((client, addr)) = dhcp_ack(frame) else {
            return;
        };
        if client != guest || addr.is_unspecified() {
            return;
        }
        let old = self.addr.swap(u32::from(addr), Ordering::Relaxed);
        if old != u32::from(addr) {
            log::info!("{what}: guest {guest} has IPv4 address {addr} (DHCP)");
        }
    }
}

/// A back end whose frames to the guest are watched for the guest's DHCP lease (a daemon's
/// DHCP server, e.g. passt's, tells nobody else).
pub struct LeaseSnoop<B> {
    inner: B,
    lease: std::sync::Arc<GuestLease>,
    guest: MacAddr,
    what: &'static str,
}

impl<B> LeaseSnoop<B> {
    pub fn new(inner: B, guest: MacAddr, what: &'static str) -> Self {
        LeaseSnoop {
            inner,
            lease: Default::default(),
            guest,
            what,
        }
    }

    pub fn lease(&self) -> std::sync::Arc<GuestLease> {
        self.lease.clone()
    }
}

impl<B: super::NetBackend> super::NetBackend for LeaseSnoop<B> {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.inner.send(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.recv(buf)?;
        self.lease.observe(&buf[..n], self.guest, self.what);
        Ok(n)
    }
}

impl<B: std::os::fd::AsRawFd> std::os::fd::AsRawFd for LeaseSnoop<B> {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.inner.as_raw_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A DHCP reply as a server sends it: Ethernet, IPv4, UDP 67 -> 68, BOOTP, options.
    pub(crate) fn reply(chaddr: [u8; 6], yiaddr: [u8; 4], options: &[u8]) -> Vec<u8> {
        let mut bootp = vec![0u8; BOOTP_FIXED];
        bootp[0] = BOOTREPLY;
        bootp[1] = 1;
        bootp[2] = 6;
        bootp[16..20].copy_from_slice(&yiaddr);
        bootp[28..34].copy_from_slice(&chaddr);
        bootp.extend_from_slice(&MAGIC_COOKIE);
        bootp.extend_from_slice(options);
        let udp_len = 8 + bootp.len();
        let mut f = vec![0xFF; 6];
        f.extend_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = 20 + udp_len;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0,
            0,
            64,
            IPPROTO_UDP,
            0,
            0,
        ]);
        f.extend_from_slice(&[10, 0, 2, 2, 255, 255, 255, 255]);
        f.extend_from_slice(&BOOTPS.to_be_bytes());
        f.extend_from_slice(&BOOTPC.to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&bootp);
        f
    }

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

    #[test]
    fn an_ack_names_the_client_and_its_address() {
        let ack = reply(
            MAC,
            [10, 0, 2, 15],
            &[OPTION_PAD, 1, 4, 255, 255, 255, 0, 53, 1, 5, 255],
        );
        assert_eq!(
            dhcp_ack(&ack),
            Some((MacAddr(MAC), Ipv4Addr::new(10, 0, 2, 15)))
        );
        let offer = reply(MAC, [10, 0, 2, 15], &[53, 1, 2, 255]);
        assert_eq!(dhcp_ack(&offer), None, "an offer is not a lease");
        assert_eq!(
            dhcp_ack(&reply(MAC, [10, 0, 2, 15], &[1, 4, 255, 255, 255, 0, 255])),
            None
        );
    }

    #[test]
    fn truncated_or_foreign_frames_are_ignored() {
        let ack = reply(MAC, [10, 0, 2, 15], &[53, 1, 5, 255]);
        for len in 0..ack.len() - 4 {
            // Cut anywhere before the message type's value: never a lease, never a panic.
            let mut cut = ack[..len].to_vec();
            if cut.len() > 17 {
                // keep the IP length honest so the parser reaches deeper fields
                let total = (cut.len() - 14) as u16;
                cut[16..18].copy_from_slice(&total.to_be_bytes());
            }
            assert_eq!(dhcp_ack(&cut), None, "cut at {len}");
        }
        let mut option_overrun = reply(MAC, [10, 0, 2, 15], &[53, 200, 5]);
        assert_eq!(dhcp_ack(&option_overrun), None);
        option_overrun[14 + 6] = 0x20; // more fragments
        assert_eq!(dhcp_ack(&option_overrun), None);
        let mut to_server = ack.clone();
        to_server[14 + 20 + 2] = 0; // destination port 67
        to_server[14 + 20 + 3] = 67;
        assert_eq!(dhcp_ack(&to_server), None);
    }

    #[test]
    fn the_lease_follows_acks_for_our_mac_only() {
        let lease = GuestLease::default();
        assert_eq!(lease.get(), None);
        lease.observe(
            &reply([2, 0, 0, 0, 0, 8], [10, 0, 2, 16], &[53, 1, 5, 255]),
            MacAddr(MAC),
            "t",
        );
        assert_eq!(lease.get(), None, "another client's lease");
        lease.observe(
            &reply(MAC, [10, 0, 2, 15], &[53, 1, 5, 255]),
            MacAddr(MAC),
            "t",
        );
        assert_eq!(lease.get(), Some(Ipv4Addr::new(10, 0, 2, 15)));
    }
}
