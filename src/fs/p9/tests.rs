//! The 9P server driven as the Linux client drives it, over in-memory messages.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use vmm_sys_util::tempdir::TempDir;

use super::server::msg::*;
use super::server::{IdMapping, Options, Server, MAX_MSIZE, MIN_MSIZE};
use super::wire::{split, Qid, Reader, Writer};
use crate::fs::linux_abi::{errno, mode as lmode, oflag};
use crate::fs::sandbox::Share;

const ROOT: u32 = 1;

struct Client {
    srv: Server,
    tag: u16,
    _tmp: TempDir,
    dir: PathBuf,
    outside: PathBuf,
}

/// A reply: Ok(body) or Err(errno).
type Reply = Result<Vec<u8>, i32>;

impl Client {
    fn with(ro: bool, opts: Options) -> Client {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-9p-").unwrap();
        let dir = tmp.as_path().join("share");
        let outside = tmp.as_path().join("outside");
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"SECRET").unwrap();
        let srv = Server::new(Share::new(&dir, ro).unwrap(), opts);
        let mut c = Client {
            srv,
            tag: 0,
            _tmp: tmp,
            dir,
            outside,
        };
        let body = c.call(TVERSION, |w| {
            w.u32(512 * 1024).str(b"9P2000.L");
        });
        assert!(body.is_ok());
        c.call(TATTACH, |w| {
            w.u32(ROOT).u32(u32::MAX).str(b"root").str(b"").u32(0);
        })
        .unwrap();
        c
    }

    fn new() -> Client {
        Client::with(false, Options::default())
    }

    fn raw(&mut self, msg: &[u8]) -> (u8, u16, Vec<u8>) {
        let mut out = Vec::new();
        self.srv.handle(msg, &mut out);
        let (ty, tag, body) = split(&out).expect("server reply is well formed");
        (ty, tag, body.to_vec())
    }

    fn call(&mut self, ty: u8, f: impl FnOnce(&mut Writer)) -> Reply {
        self.tag = self.tag.wrapping_add(1) % 0xfff0;
        let mut msg = Vec::new();
        let mut w = Writer::new(&mut msg, ty, self.tag);
        f(&mut w);
        w.finish();
        let (rty, rtag, body) = self.raw(&msg);
        assert_eq!(rtag, self.tag);
        if rty == RLERROR {
            return Err(Reader::new(&body).u32().unwrap() as i32);
        }
        assert_eq!(rty, ty + 1, "reply type");
        Ok(body)
    }

    fn walk(&mut self, fid: u32, newfid: u32, names: &[&[u8]]) -> Result<Vec<Qid>, i32> {
        let body = self.call(TWALK, |w| {
            w.u32(fid).u32(newfid).u16(names.len() as u16);
            for n in names {
                w.str(n);
            }
        })?;
        let mut r = Reader::new(&body);
        let n = r.u16().unwrap();
        Ok((0..n)
            .map(|_| Qid {
                ty: r.u8().unwrap(),
                version: r.u32().unwrap(),
                path: r.u64().unwrap(),
            })
            .collect())
    }

    fn lopen(&mut self, fid: u32, flags: u32) -> Result<u32, i32> {
        let b = self.call(TLOPEN, |w| {
            w.u32(fid).u32(flags);
        })?;
        let mut r = Reader::new(&b);
        r.bytes(13).unwrap();
        Ok(r.u32().unwrap())
    }

    fn lcreate(&mut self, fid: u32, name: &[u8], flags: u32, mode: u32) -> Reply {
        self.call(TLCREATE, |w| {
            w.u32(fid).str(name).u32(flags).u32(mode).u32(0);
        })
    }

    fn write(&mut self, fid: u32, off: u64, data: &[u8]) -> Result<u32, i32> {
        let b = self.call(TWRITE, |w| {
            w.u32(fid).u64(off).u32(data.len() as u32).raw(data);
        })?;
        Ok(Reader::new(&b).u32().unwrap())
    }

    fn read(&mut self, fid: u32, off: u64, count: u32) -> Result<Vec<u8>, i32> {
        let b = self.call(TREAD, |w| {
            w.u32(fid).u64(off).u32(count);
        })?;
        let mut r = Reader::new(&b);
        let n = r.u32().unwrap();
        let data = r.rest().to_vec();
        assert_eq!(n as usize, data.len());
        Ok(data)
    }

    fn clunk(&mut self, fid: u32) -> Reply {
        self.call(TCLUNK, |w| {
            w.u32(fid);
        })
    }

    /// (mode, uid, gid, nlink, size) from Tgetattr.
    fn getattr(&mut self, fid: u32) -> Result<(u32, u32, u32, u64, u64), i32> {
        let b = self.call(TGETATTR, |w| {
            w.u32(fid).u64(0x7ff);
        })?;
        let mut r = Reader::new(&b);
        r.u64().unwrap();
        r.bytes(13).unwrap();
        let (mode, uid, gid, nlink) = (
            r.u32().unwrap(),
            r.u32().unwrap(),
            r.u32().unwrap(),
            r.u64().unwrap(),
        );
        r.u64().unwrap();
        Ok((mode, uid, gid, nlink, r.u64().unwrap()))
    }

    fn readdir_all(&mut self, fid: u32, count: u32) -> Vec<Vec<u8>> {
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let b = self
                .call(TREADDIR, |w| {
                    w.u32(fid).u64(off).u32(count);
                })
                .unwrap();
            let mut r = Reader::new(&b);
            let n = r.u32().unwrap() as usize;
            assert!(n <= count as usize);
            let mut e = Reader::new(r.bytes(n).unwrap());
            if n == 0 {
                return names;
            }
            while e.remaining() > 0 {
                e.bytes(13).unwrap();
                off = e.u64().unwrap();
                e.u8().unwrap();
                names.push(e.str().unwrap().to_vec());
            }
        }
    }
}

#[test]
fn version_negotiates_msize_and_resets_fids() {
    let mut c = Client::new();
    for (asked, got) in [
        (2 * MAX_MSIZE, MAX_MSIZE),
        (512 * 1024, 512 * 1024),
        (100, MIN_MSIZE),
    ] {
        let b = c.call(TVERSION, |w| {
            w.u32(asked).str(b"9P2000.L");
        });
        let b = b.unwrap();
        let mut r = Reader::new(&b);
        assert_eq!(
            (r.u32().unwrap(), r.str().unwrap()),
            (got, &b"9P2000.L"[..])
        );
    }
    assert_eq!(c.srv.fid_count(), 0);
    let b = c
        .call(TVERSION, |w| {
            w.u32(8192).str(b"9P2000.u");
        })
        .unwrap();
    assert_eq!(Reader::new(&b[4..]).str().unwrap(), b"unknown");
    // Nothing but Tversion is served until a version is agreed.
    assert_eq!(c.walk(ROOT, 2, &[]), Err(errno::EINVAL));
}

#[test]
fn walks_stay_inside_the_share() {
    let mut c = Client::new();
    fs::create_dir_all(c.dir.join("a/b")).unwrap();
    symlink(&c.outside, c.dir.join("out")).unwrap();
    symlink("../outside/secret", c.dir.join("sec")).unwrap();
    let q = c.walk(ROOT, 2, &[b"a", b"b"]).unwrap();
    assert_eq!(q.len(), 2);
    // Partial walk: the qids found, newfid not made.
    assert_eq!(c.walk(ROOT, 3, &[b"a", b"nope", b"x"]).unwrap().len(), 1);
    assert_eq!(c.clunk(3), Err(errno::EBADF));
    assert_eq!(c.walk(ROOT, 3, &[b"nope"]), Err(errno::ENOENT));
    // `..` from anywhere never leaves the root.
    let root_qid = c.walk(ROOT, 4, &[]).unwrap();
    assert!(root_qid.is_empty());
    let up = c.walk(2, 5, &[b"..", b"..", b"..", b".."]).unwrap();
    let root_path = c.walk(4, 6, &[b"a", b".."]).unwrap()[1];
    assert_eq!(up[3], root_path);
    assert_eq!(c.walk(5, 7, &[b"outside"]), Err(errno::ENOENT));
    for bad in [&b"a/b"[..], b"/etc", b"", b"."] {
        assert_eq!(c.walk(ROOT, 8, &[bad]), Err(errno::EINVAL), "{bad:?}");
    }
    assert_eq!(c.walk(ROOT, 8, &[&b"a"[..]; 17]), Err(errno::EINVAL));
    // Symlinks are walked to, never through, and never opened.
    assert_eq!(c.walk(ROOT, 8, &[b"out", b"secret"]).unwrap().len(), 1);
    c.walk(ROOT, 9, &[b"sec"]).unwrap();
    assert_eq!(c.lopen(9, oflag::O_RDONLY), Err(errno::ELOOP));
    let b = c
        .call(TREADLINK, |w| {
            w.u32(9);
        })
        .unwrap();
    assert_eq!(Reader::new(&b).str().unwrap(), b"../outside/secret");
    // newfid in use.
    assert_eq!(c.walk(ROOT, 2, &[b"a"]), Err(errno::EBADF));
}

#[test]
fn large_writes_and_reads_round_trip() {
    let mut c = Client::new();
    c.walk(ROOT, 2, &[]).unwrap();
    let b = c.lcreate(2, b"big", oflag::O_RDWR, 0o644).unwrap();
    let iounit = Reader::new(&b[13..]).u32().unwrap();
    assert_eq!(iounit, 512 * 1024 - 11);
    let data: Vec<u8> = (0..3 * 512 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut off = 0;
    for chunk in data.chunks(iounit as usize) {
        assert_eq!(c.write(2, off, chunk).unwrap() as usize, chunk.len());
        off += chunk.len() as u64;
    }
    assert_eq!(fs::read(c.dir.join("big")).unwrap(), data);
    let mut back = Vec::new();
    while back.len() < data.len() {
        // Ask for more than msize allows: the server caps the count.
        let got = c.read(2, back.len() as u64, 4 * 1024 * 1024).unwrap();
        assert!(got.len() <= iounit as usize && !got.is_empty());
        back.extend_from_slice(&got);
    }
    assert_eq!(back, data);
    assert!(c.read(2, data.len() as u64, 100).unwrap().is_empty());
    assert_eq!(c.getattr(2).unwrap().4, data.len() as u64);
    // A count larger than the data sent is malformed.
    let r = c.call(TWRITE, |w| {
        w.u32(2).u64(0).u32(100).raw(b"short");
    });
    assert_eq!(r, Err(errno::EINVAL));
    c.call(TFSYNC, |w| {
        w.u32(2).u32(1);
    })
    .unwrap();
}

#[test]
fn namespace_operations() {
    let mut c = Client::new();
    c.walk(ROOT, 2, &[]).unwrap();
    let mk = |c: &mut Client, name: &[u8]| {
        c.call(TMKDIR, |w| {
            w.u32(ROOT).str(name).u32(0o755).u32(0);
        })
    };
    mk(&mut c, b"d1").unwrap();
    mk(&mut c, b"d2").unwrap();
    assert_eq!(mk(&mut c, b"d1"), Err(errno::EEXIST));
    c.walk(ROOT, 3, &[b"d1"]).unwrap();
    c.lcreate(3, b"f", oflag::O_WRONLY, 0o600).unwrap();
    c.write(3, 0, b"data").unwrap();
    c.walk(ROOT, 4, &[b"d1", b"f"]).unwrap();
    c.walk(ROOT, 5, &[b"d2"]).unwrap();
    // Hard link, then rename across directories (the dlite EXDEV complaint).
    c.call(TLINK, |w| {
        w.u32(5).u32(4).str(b"hard");
    })
    .unwrap();
    assert_eq!(c.getattr(4).unwrap().3, 2);
    c.call(TRENAMEAT, |w| {
        w.u32(ROOT).str(b"d1").u32(5).str(b"moved");
    })
    .unwrap();
    assert_eq!(fs::read(c.dir.join("d2/moved/f")).unwrap(), b"data");
    c.walk(ROOT, 6, &[b"d2", b"hard"]).unwrap();
    c.call(TRENAME, |w| {
        w.u32(6).u32(ROOT).str(b"top");
    })
    .unwrap();
    assert!(c.dir.join("top").exists());
    // Symlinks and special files.
    let q = c
        .call(TSYMLINK, |w| {
            w.u32(ROOT).str(b"ln").str(b"/etc/passwd").u32(0);
        })
        .unwrap();
    assert_eq!(q[0], 0x02);
    assert_eq!(
        fs::read_link(c.dir.join("ln")).unwrap().to_str(),
        Some("/etc/passwd")
    );
    let nod = |c: &mut Client, name: &[u8], mode: u32| {
        c.call(TMKNOD, |w| {
            w.u32(ROOT).str(name).u32(mode).u32(1).u32(3).u32(0);
        })
    };
    assert_eq!(
        nod(&mut c, b"null", lmode::S_IFCHR | 0o666),
        Err(errno::EPERM)
    );
    assert_eq!(
        nod(&mut c, b"sda", lmode::S_IFBLK | 0o666),
        Err(errno::EPERM)
    );
    nod(&mut c, b"fifo", lmode::S_IFIFO | 0o644).unwrap();
    c.walk(ROOT, 7, &[b"fifo"]).unwrap();
    assert_eq!(c.lopen(7, oflag::O_RDONLY), Err(errno::ENXIO));
    // Listing, paged through a small count.
    c.lopen(2, oflag::O_RDONLY | oflag::O_DIRECTORY).unwrap();
    let mut names = c.readdir_all(2, 64);
    names.sort();
    let want: Vec<Vec<u8>> = [&b"."[..], b"..", b"d2", b"fifo", b"ln", b"top"]
        .iter()
        .map(|s| s.to_vec())
        .collect();
    assert_eq!(names, want);
    // Removal.
    c.call(TUNLINKAT, |w| {
        w.u32(ROOT).str(b"ln").u32(0);
    })
    .unwrap();
    assert_eq!(
        c.call(TUNLINKAT, |w| {
            w.u32(ROOT).str(b"d2").u32(0x200);
        }),
        Err(errno::ENOTEMPTY)
    );
    c.call(TREMOVE, |w| {
        w.u32(7);
    })
    .unwrap();
    assert!(!c.dir.join("fifo").exists());
    assert_eq!(c.clunk(7), Err(errno::EBADF));
    assert_eq!(
        c.call(TREMOVE, |w| {
            w.u32(ROOT);
        }),
        Err(errno::EBUSY)
    );
}

#[test]
fn attributes_statfs_locks_and_xattrs() {
    let mut c = Client::new();
    fs::write(c.dir.join("f"), b"0123456789").unwrap();
    c.walk(ROOT, 2, &[b"f"]).unwrap();
    let valid = 0x1 | 0x8 | 0x20 | 0x100;
    c.call(TSETATTR, |w| {
        w.u32(2)
            .u32(valid)
            .u32(0o600)
            .u32(0)
            .u32(0)
            .u64(3)
            .u64(0)
            .u64(0)
            .u64(1234)
            .u64(0);
    })
    .unwrap();
    let (mode, ..) = c.getattr(2).unwrap();
    assert_eq!(mode, lmode::S_IFREG | 0o600);
    assert_eq!(c.getattr(2).unwrap().4, 3);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(c.dir.join("f")).unwrap().mtime(), 1234);
    let b = c
        .call(TSTATFS, |w| {
            w.u32(ROOT);
        })
        .unwrap();
    let mut r = Reader::new(&b);
    assert_eq!(r.u32().unwrap(), 0x01021997);
    // The block size is the unit of the counts (f_frsize), which Linux takes as both.
    let host = nix_statvfs(&c.dir);
    #[allow(clippy::unnecessary_cast)] // u32 on macOS
    let want = (host.f_frsize as u64, host.f_blocks as u64);
    assert_eq!((u64::from(r.u32().unwrap()), r.u64().unwrap()), want);
    c.lopen(2, oflag::O_RDWR).unwrap();
    let b = c
        .call(TLOCK, |w| {
            w.u32(2).u8(1).u32(0).u64(0).u64(0).u32(42).str(b"guest");
        })
        .unwrap();
    assert_eq!(b, [0]);
    let b = c
        .call(TGETLOCK, |w| {
            w.u32(2).u8(1).u64(0).u64(10).u32(42).str(b"guest");
        })
        .unwrap();
    assert_eq!(b[0], 2);
    let r = c.call(TXATTRWALK, |w| {
        w.u32(2).u32(3).str(b"user.x");
    });
    assert_eq!(r, Err(errno::EOPNOTSUPP));
    c.call(TFLUSH, |w| {
        w.u16(5);
    })
    .unwrap();
}

#[test]
fn uid_gid_squash() {
    let mut c = Client::with(
        false,
        Options {
            ids: IdMapping::Squash { uid: 501, gid: 20 },
            ..Default::default()
        },
    );
    fs::write(c.dir.join("f"), b"x").unwrap();
    c.walk(ROOT, 2, &[b"f"]).unwrap();
    let (_, uid, gid, ..) = c.getattr(2).unwrap();
    assert_eq!((uid, gid), (501, 20));
    // chown is accepted and changes nothing on the host.
    c.call(TSETATTR, |w| {
        w.u32(2)
            .u32(0x6)
            .u32(0)
            .u32(12345)
            .u32(12345)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0)
            .u64(0);
    })
    .unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_ne!(fs::metadata(c.dir.join("f")).unwrap().uid(), 12345);
}

#[test]
fn read_only_share() {
    let mut c = Client::with(true, Options::default());
    fs::write(c.dir.join("f"), b"keep").unwrap();
    c.walk(ROOT, 2, &[]).unwrap();
    assert_eq!(c.lcreate(2, b"n", oflag::O_RDWR, 0o644), Err(errno::EROFS));
    c.walk(ROOT, 3, &[b"f"]).unwrap();
    assert_eq!(c.lopen(3, oflag::O_WRONLY), Err(errno::EROFS));
    assert_eq!(
        c.lopen(3, oflag::O_RDONLY | oflag::O_TRUNC),
        Err(errno::EROFS)
    );
    c.lopen(3, oflag::O_RDONLY).unwrap();
    assert_eq!(c.write(3, 0, b"x"), Err(errno::EBADF));
    assert_eq!(c.read(3, 0, 100).unwrap(), b"keep");
    let r = c.call(TUNLINKAT, |w| {
        w.u32(ROOT).str(b"f").u32(0);
    });
    assert_eq!(r, Err(errno::EROFS));
}

#[test]
fn fid_table_is_bounded() {
    let mut c = Client::with(
        false,
        Options {
            max_fids: 4,
            ..Default::default()
        },
    );
    for fid in 2..=4 {
        c.walk(ROOT, fid, &[]).unwrap();
    }
    assert_eq!(c.walk(ROOT, 5, &[]), Err(errno::ENFILE));
    // Re-walking a fid onto itself needs no new slot.
    c.walk(4, 4, &[]).unwrap();
    c.clunk(4).unwrap();
    c.walk(ROOT, 5, &[]).unwrap();
}

#[test]
fn malformed_messages_get_an_error_reply() {
    let mut c = Client::new();
    // Truncated body, tag kept.
    let (ty, tag, _) = c.raw(&[9, 0, 0, 0, TWALK, 0x34, 0x12, 1, 0]);
    assert_eq!((ty, tag), (RLERROR, 0x1234));
    // Size field that lies.
    let (ty, _, _) = c.raw(&[100, 0, 0, 0, TCLUNK, 1, 0, 1, 0, 0, 0]);
    assert_eq!(ty, RLERROR);
    // Too short for a header at all.
    let (ty, tag, _) = c.raw(&[1, 2]);
    assert_eq!((ty, tag), (RLERROR, u16::MAX));
    // A string length past the end.
    let mut m = Vec::new();
    let mut w = Writer::new(&mut m, TWALK, 9);
    w.u32(ROOT).u32(2).u16(1).u16(60000).raw(b"abc");
    w.finish();
    let (ty, _, body) = c.raw(&m);
    assert_eq!(
        (ty, Reader::new(&body).u32().unwrap()),
        (RLERROR, errno::EINVAL as u32)
    );
    // Unknown message type.
    let (ty, _, body) = c.raw(&[7, 0, 0, 0, 250, 1, 0]);
    assert_eq!(
        (ty, Reader::new(&body).u32().unwrap()),
        (RLERROR, errno::EOPNOTSUPP as u32)
    );
}

/// The host's statvfs of `path`.
pub(crate) fn nix_statvfs(path: &std::path::Path) -> libc::statvfs {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed plain-data struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c.as_ptr(), &mut st), 0);
        st
    }
}
