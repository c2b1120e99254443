//! Fuzz entry point for the vsock packet header and the muxer behind it
//! (`fuzz/fuzz_targets/vsock_packet.rs`). The input is a sequence of guest TX packets, each a
//! u16 LE length and that many bytes, fed to one muxer (guest CID 3) in a fresh scratch
//! directory, removed when the input is done.

use crate::fs::fuzz::ScratchDir;

use super::muxer::{Muxer, VsockConfig};
use super::packet::{op, Header, HOST_CID};

pub fn fuzz_packets(data: &[u8]) {
    let Some(dir) = ScratchDir::new("xv-fuzz-") else {
        return;
    };
    let Ok(mut m) = Muxer::new(VsockConfig {
        guest_cid: 3,
        dir: dir.path().to_path_buf(),
        guest_forwards: vec![1234],
    }) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let pkt = &rest[2..2 + n];
        rest = &rest[2 + n..];
        if let Ok(h) = Header::parse(pkt) {
            let mut again = Vec::new();
            h.write(&mut again);
            assert_eq!(&again[..], &pkt[..again.len()]);
        }
        let was_rst = Header::parse(pkt).map(|h| h.op == op::RST).unwrap_or(false);
        let _ = m.handle_guest(pkt);
        m.poll_host();
        while let Some(out) = m.next_rx() {
            let (h, payload) = Header::parse_packet(&out).expect("packets to the guest parse");
            assert_eq!(payload.len(), h.len as usize);
            assert!(!(was_rst && h.op == op::RST), "answered an RST with an RST");
            // Only the RST refusing a packet with foreign addresses goes elsewhere.
            if h.op != op::RST {
                assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, 3));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_packets_never_panic() {
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let mut data = Vec::new();
            for _ in 0..(next() % 6) {
                let mut h = Header {
                    src_cid: if next() % 4 == 0 { next() % 5 } else { 3 },
                    dst_cid: 2,
                    ty: 1,
                    ..Default::default()
                };
                h.src_port = (next() % 4) as u32;
                h.dst_port = (next() % 4) as u32;
                h.op = (next() % 9) as u16;
                h.flags = (next() % 4) as u32;
                h.buf_alloc = next() as u32;
                h.fwd_cnt = next() as u32;
                let payload = (next() % 64) as usize;
                h.len = if next() % 5 == 0 {
                    next() as u32
                } else {
                    payload as u32
                };
                let mut p = Vec::new();
                h.write(&mut p);
                p.extend((0..payload).map(|_| next() as u8));
                data.extend_from_slice(&(p.len() as u16).to_le_bytes());
                data.extend_from_slice(&p);
            }
            fuzz_packets(&data);
        }
    }
}
