//! Fuzz entry points for the two file-server parsers (`fuzz/fuzz_targets/p9_message.rs`,
//! `fuse_request.rs`), also run on stable by the unit tests below with a fixed pseudo-random
//! sequence. Each serves a private scratch share under the temporary directory; the input is
//! a sequence of requests, each a u16 LE length and that many bytes.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use super::fuse::abi::{op, IN_HEADER, OUT_HEADER};
use super::sandbox::Share;
use super::{fuse, p9};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("xhyve-fuzz-{name}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(dir.join("sub"));
    let _ = std::fs::write(dir.join("file"), b"0123456789");
    let _ = std::os::unix::fs::symlink("/etc/passwd", dir.join("link"));
    dir
}

fn requests(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.len() < 2 {
            return None;
        }
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let req = &rest[2..2 + n];
        rest = &rest[2 + n..];
        Some(req)
    })
}

/// 9P: a fresh session (Tversion msize 64 KiB, Tattach fid 0) then the input's messages.
/// Every request gets exactly one well-formed reply no larger than msize, echoing a readable tag.
pub fn fuzz_p9(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| scratch("p9"));
    let Ok(share) = Share::new(dir, false) else {
        return;
    };
    let mut srv = p9::Server::new(
        share,
        p9::Options {
            max_fids: 64,
            ..Default::default()
        },
    );
    let mut out = Vec::new();
    let mut session = Vec::new();
    let mut w = p9::wire::Writer::new(&mut session, 100, 0xffff);
    w.u32(65536).str(b"9P2000.L");
    w.finish();
    srv.handle(&session, &mut out);
    session.clear();
    let mut w = p9::wire::Writer::new(&mut session, 104, 1);
    w.u32(0).u32(u32::MAX).str(b"").str(b"").u32(0);
    w.finish();
    srv.handle(&session, &mut out);
    for req in requests(data) {
        out.clear();
        srv.handle(req, &mut out);
        let (_, tag, _) = p9::wire::split(&out).expect("one well-formed reply");
        assert!(
            out.len() as u32 <= srv.msize().max(65536),
            "reply of {} bytes exceeds msize",
            out.len()
        );
        if req.len() >= 7
            && u32::from_le_bytes([req[0], req[1], req[2], req[3]]) as usize == req.len()
        {
            assert_eq!(tag, u16::from_le_bytes([req[5], req[6]]));
        }
        assert!(srv.fid_count() <= 64);
    }
}

/// FUSE: INIT then the input's requests. A reply, when there is one, is well-formed, echoes
/// the unique id, and carries an error or a body, never both.
pub fn fuzz_fuse(data: &[u8]) {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = DIR.get_or_init(|| scratch("fuse"));
    let Ok(share) = Share::new(dir, false) else {
        return;
    };
    let opts = fuse::Options {
        max_nodes: 64,
        max_handles: 64,
        ..Default::default()
    };
    let mut srv = fuse::Server::new(share, opts);
    let mut init = vec![0u8; IN_HEADER];
    init[0..4].copy_from_slice(&((IN_HEADER + 16) as u32).to_le_bytes());
    init[4..8].copy_from_slice(&op::INIT.to_le_bytes());
    for v in [7u32, 31, 65536, u32::MAX] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    let mut out = Vec::new();
    srv.handle(&init, &mut out);
    for req in requests(data) {
        out.clear();
        if !srv.handle(req, &mut out) {
            assert!(out.is_empty());
            continue;
        }
        assert!(out.len() >= OUT_HEADER);
        assert_eq!(
            u32::from_le_bytes(out[0..4].try_into().unwrap()) as usize,
            out.len()
        );
        let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
        assert!(err <= 0 && err > -4096);
        assert!(err == 0 || out.len() == OUT_HEADER);
        assert!(out.len() <= OUT_HEADER + fuse::server::MAX_WRITE as usize + 256);
        if req.len() >= 16 {
            assert_eq!(out[8..16], req[8..16]);
        }
        let (nodes, handles) = srv.table_sizes();
        assert!(nodes <= 64 + 1 && handles <= 64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// Random requests with plausible headers: a valid size, a real message type and fid 0
    /// often enough to reach the handlers.
    #[test]
    fn random_p9_messages_never_panic() {
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
        let types = [
            8u8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 40, 50, 52, 54, 70, 72, 74, 76, 100, 104, 108,
            110, 116, 118, 120, 122,
        ];
        for _ in 0..300 {
            let mut data = Vec::new();
            for _ in 0..(next() % 8) {
                let len = 7 + (next() % 40) as usize;
                let mut m: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                m[0..4].copy_from_slice(&(len as u32).to_le_bytes());
                m[4] = types[(next() % types.len() as u64) as usize];
                if len >= 11 && next() % 2 == 0 {
                    m[7..11].copy_from_slice(&0u32.to_le_bytes());
                }
                data.extend_from_slice(&(len as u16).to_le_bytes());
                data.extend_from_slice(&m);
            }
            fuzz_p9(&data);
        }
    }

    #[test]
    fn random_fuse_requests_never_panic() {
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        for _ in 0..300 {
            let mut data = Vec::new();
            for _ in 0..(next() % 8) {
                let len = IN_HEADER + (next() % 120) as usize;
                let mut m: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                m[0..4].copy_from_slice(&(len as u32).to_le_bytes());
                m[4..8].copy_from_slice(&((next() % 48) as u32).to_le_bytes());
                m[16..24].copy_from_slice(&(1 + next() % 3).to_le_bytes());
                data.extend_from_slice(&(len as u16).to_le_bytes());
                data.extend_from_slice(&m);
            }
            fuzz_fuse(&data);
        }
    }
}
