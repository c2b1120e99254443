//! Fuzz entry points for the two file-server parsers (`fuzz/fuzz_targets/p9_message.rs`,
//! `fuse_request.rs`), also run on stable by the unit tests below with a fixed pseudo-random
//! sequence. Each input is served on a fresh scratch share under the temporary directory,
//! removed when the input is done (so that an input replays alone, and nothing is left
//! behind); the input is a sequence of requests, each a u16 LE length and that many bytes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use vmm_sys_util::tempdir::TempDir;

use super::fuse::abi::{op, IN_HEADER, OUT_HEADER};
use super::sandbox::Share;
use super::{fuse, p9};

/// A scratch directory `$TMPDIR/PREFIXXXXXXX`, removed when dropped, also after an input took
/// the owner's permissions away from a directory in it (which makes removal fail unless root).
pub(crate) struct ScratchDir(TempDir);

impl ScratchDir {
    pub(crate) fn new(prefix: &str) -> Option<ScratchDir> {
        TempDir::new_with_prefix(std::env::temp_dir().join(prefix))
            .ok()
            .map(ScratchDir)
    }

    pub(crate) fn path(&self) -> &Path {
        self.0.as_path()
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(self.path()).is_ok() {
            return;
        }
        // Give every directory back rwx to its owner, then let TempDir remove the tree.
        fn open_up(dir: &Path) {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    open_up(&entry.path());
                }
            }
        }
        open_up(self.path());
    }
}

/// A fresh share (`sub/`, `file`, and `link` pointing out of it), removed when dropped.
fn scratch(name: &str) -> Option<ScratchDir> {
    let tmp = ScratchDir::new(&format!("xhyve-fuzz-{name}-"))?;
    let dir = tmp.path();
    std::fs::create_dir(dir.join("sub")).ok()?;
    std::fs::write(dir.join("file"), b"0123456789").ok()?;
    std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).ok()?;
    Some(tmp)
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
    let Some(dir) = scratch("p9") else {
        return;
    };
    let Ok(share) = Share::new(dir.path(), false) else {
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
    let Some(dir) = scratch("fuse") else {
        return;
    };
    let Ok(share) = Share::new(dir.path(), false) else {
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

    /// Nothing is left in the temporary directory, also when a directory lost its permissions.
    #[test]
    fn scratch_dirs_are_removed() {
        let tmp = ScratchDir::new("xhyve-fuzz-selftest-").unwrap();
        let path = tmp.path().to_path_buf();
        std::fs::create_dir_all(path.join("a/b")).unwrap();
        std::fs::write(path.join("a/b/f"), b"x").unwrap();
        std::fs::set_permissions(path.join("a/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(path.join("a"), std::fs::Permissions::from_mode(0o000)).unwrap();
        drop(tmp);
        assert!(!path.exists(), "{} is left behind", path.display());
        let share = scratch("selftest").unwrap();
        let path = share.path().to_path_buf();
        assert!(path.join("sub").is_dir() && path.join("file").is_file());
        drop(share);
        assert!(!path.exists(), "{} is left behind", path.display());
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
