//! The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 little-endian bytes before every
//! payload. Parsing checks only the shape; what a field may say is the muxer's business.

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type served.
pub const TYPE_STREAM: u16 = 1;

pub mod op {
    pub const INVALID: u16 = 0;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// SHUTDOWN flags: the sender will receive / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// Why bytes are not a packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("packet of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Short(usize),
    #[error("header says {len} payload bytes, {have} present")]
    Length { len: u32, have: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub ty: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, PacketError> {
        if b.len() < HEADER_LEN {
            return Err(PacketError::Short(b.len()));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().expect("2 bytes"));
        Ok(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            ty: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    /// A header and exactly the payload it announces (a chain may carry more buffer space).
    pub fn parse_packet(b: &[u8]) -> Result<(Header, &[u8]), PacketError> {
        let h = Header::parse(b)?;
        let have = b.len() - HEADER_LEN;
        if h.len as usize > have {
            return Err(PacketError::Length { len: h.len, have });
        }
        Ok((h, &b[HEADER_LEN..HEADER_LEN + h.len as usize]))
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.src_cid.to_le_bytes());
        out.extend_from_slice(&self.dst_cid.to_le_bytes());
        out.extend_from_slice(&self.src_port.to_le_bytes());
        out.extend_from_slice(&self.dst_port.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.ty.to_le_bytes());
        out.extend_from_slice(&self.op.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.buf_alloc.to_le_bytes());
        out.extend_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_lengths_are_checked() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1024,
            dst_port: 80,
            len: 3,
            ty: 1,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        };
        let mut b = Vec::new();
        h.write(&mut b);
        assert_eq!(b.len(), HEADER_LEN);
        b.extend_from_slice(b"abcdef");
        let (p, data) = Header::parse_packet(&b).unwrap();
        assert_eq!((p, data), (h, &b"abc"[..]));
        assert_eq!(Header::parse(&b[..43]), Err(PacketError::Short(43)));
        let mut big = h;
        big.len = 100;
        let mut b = Vec::new();
        big.write(&mut b);
        assert_eq!(
            Header::parse_packet(&b),
            Err(PacketError::Length { len: 100, have: 0 })
        );
    }
}
