//! The FUSE server driven as the Linux virtio-fs driver drives it, over in-memory requests.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use vmm_sys_util::tempdir::TempDir;

use super::abi::{op, ENTRY_OUT, IN_HEADER, OUT_HEADER, ROOT_ID};
use super::server::{Options, Server, MAX_WRITE};
use crate::fs::linux_abi::{errno, mode as lmode, oflag};
use crate::fs::p9::wire::Reader;
use crate::fs::sandbox::Share;
use crate::fs::IdMapping;

struct Client {
    srv: Server,
    unique: u64,
    _tmp: TempDir,
    dir: PathBuf,
    outside: PathBuf,
}

/// Builds a request body.
#[derive(Default)]
struct Args(Vec<u8>);
impl Args {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn name(mut self, n: &[u8]) -> Self {
        self.0.extend_from_slice(n);
        self.0.push(0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, extlen+padding
    m.extend_from_slice(body);
    m
}

struct Entry {
    id: u64,
    mode: u32,
    size: u64,
    nlink: u32,
    uid: u32,
}

fn entry(b: &[u8]) -> Entry {
    assert!(b.len() >= ENTRY_OUT);
    let mut r = Reader::new(b);
    let id = r.u64().unwrap();
    r.bytes(32).unwrap();
    attr(&mut r, id)
}

fn attr(r: &mut Reader, id: u64) -> Entry {
    let _ino = r.u64().unwrap();
    let size = r.u64().unwrap();
    r.bytes(8 + 24 + 12).unwrap();
    let mode = r.u32().unwrap();
    let nlink = r.u32().unwrap();
    let uid = r.u32().unwrap();
    Entry {
        id,
        mode,
        size,
        nlink,
        uid,
    }
}

impl Client {
    fn with(ro: bool, opts: Options) -> Client {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-fuse-").unwrap();
        let dir = tmp.as_path().join("share");
        let outside = tmp.as_path().join("outside");
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"SECRET").unwrap();
        let srv = Server::new(Share::new(&dir, ro).unwrap(), opts);
        let mut c = Client {
            srv,
            unique: 0,
            _tmp: tmp,
            dir,
            outside,
        };
        let b = c
            .call(
                op::INIT,
                0,
                Args::default()
                    .u32(7)
                    .u32(38)
                    .u32(65536)
                    .u32(u32::MAX)
                    .raw(&[0; 48]),
            )
            .unwrap();
        assert_eq!(b.len(), 64);
        c
    }

    fn new() -> Client {
        Client::with(false, Options::default())
    }

    fn raw(&mut self, req: &[u8]) -> Option<(i32, u64, Vec<u8>)> {
        let mut out = Vec::new();
        if !self.srv.handle(req, &mut out) {
            assert!(out.is_empty());
            return None;
        }
        let mut r = Reader::new(&out);
        let len = r.u32().unwrap() as usize;
        assert_eq!(len, out.len());
        let err = r.u32().unwrap() as i32;
        let unique = r.u64().unwrap();
        Some((err, unique, r.rest().to_vec()))
    }

    fn call(&mut self, opcode: u32, node: u64, args: Args) -> Result<Vec<u8>, i32> {
        self.unique += 2;
        let (err, unique, body) = self
            .raw(&request(opcode, self.unique, node, &args.0))
            .expect("a reply");
        assert_eq!(unique, self.unique);
        if err != 0 {
            assert!(body.is_empty());
            return Err(-err);
        }
        Ok(body)
    }

    fn lookup(&mut self, dir: u64, name: &[u8]) -> Result<Entry, i32> {
        self.call(op::LOOKUP, dir, Args::default().name(name))
            .map(|b| entry(&b))
    }

    fn open(&mut self, node: u64, flags: u32) -> Result<u64, i32> {
        self.call(op::OPEN, node, Args::default().u32(flags).u32(0))
            .map(|b| Reader::new(&b).u64().unwrap())
    }

    fn read(&mut self, fh: u64, off: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.call(
            op::READ,
            0,
            Args::default()
                .u64(fh)
                .u64(off)
                .u32(size)
                .u32(0)
                .u64(0)
                .u32(0)
                .u32(0),
        )
    }

    fn write(&mut self, fh: u64, off: u64, data: &[u8]) -> Result<u32, i32> {
        let a = Args::default()
            .u64(fh)
            .u64(off)
            .u32(data.len() as u32)
            .u32(0)
            .u64(0)
            .u32(0)
            .u32(0)
            .raw(data);
        self.call(op::WRITE, 0, a)
            .map(|b| Reader::new(&b).u32().unwrap())
    }

    fn readdir(&mut self, node: u64, size: u32) -> Vec<Vec<u8>> {
        let fh = self
            .call(op::OPENDIR, node, Args::default().u32(0).u32(0))
            .map(|b| Reader::new(&b).u64().unwrap())
            .unwrap();
        let mut names = Vec::new();
        let mut off = 0;
        loop {
            let b = self
                .call(
                    op::READDIR,
                    node,
                    Args::default()
                        .u64(fh)
                        .u64(off)
                        .u32(size)
                        .u32(0)
                        .u64(0)
                        .u32(0)
                        .u32(0),
                )
                .unwrap();
            assert!(b.len() <= size as usize);
            if b.is_empty() {
                break;
            }
            let mut r = Reader::new(&b);
            while r.remaining() > 0 {
                r.u64().unwrap();
                off = r.u64().unwrap();
                let n = r.u32().unwrap() as usize;
                r.u32().unwrap();
                names.push(r.bytes(n).unwrap().to_vec());
                r.bytes((24 + n).next_multiple_of(8) - 24 - n).unwrap();
            }
        }
        self.call(
            op::RELEASEDIR,
            node,
            Args::default().u64(fh).u32(0).u32(0).u64(0),
        )
        .unwrap();
        names
    }
}

#[test]
fn init_is_required_and_negotiates() {
    let tmp = TempDir::new_with_prefix("/tmp/xhyve-fuse-").unwrap();
    let mut srv = Server::new(
        Share::new(tmp.as_path(), false).unwrap(),
        Options::default(),
    );
    let mut out = Vec::new();
    assert!(srv.handle(&request(op::GETATTR, 9, ROOT_ID, &[0; 16]), &mut out));
    assert_eq!(
        i32::from_le_bytes(out[4..8].try_into().unwrap()),
        -errno::EIO
    );
    out.clear();
    let init = Args::default()
        .u32(7)
        .u32(31)
        .u32(1 << 17)
        .u32(1 << 22 | 1 << 5 | 1 << 12);
    srv.handle(&request(op::INIT, 10, 0, &init.0), &mut out);
    let mut r = Reader::new(&out[OUT_HEADER..]);
    assert_eq!(
        (r.u32().unwrap(), r.u32().unwrap(), r.u32().unwrap()),
        (7, 31, 1 << 17)
    );
    // Only flags both sides know are granted.
    assert_eq!(r.u32().unwrap(), 1 << 22 | 1 << 5);
    r.u32().unwrap();
    assert_eq!(r.u32().unwrap(), MAX_WRITE);
}

#[test]
fn files_round_trip_with_large_io() {
    let mut c = Client::new();
    let b = c
        .call(
            op::CREATE,
            ROOT_ID,
            Args::default()
                .u32(oflag::O_RDWR)
                .u32(lmode::S_IFREG | 0o644)
                .u32(0o022)
                .u32(0)
                .name(b"f"),
        )
        .unwrap();
    assert_eq!(b.len(), ENTRY_OUT + 16);
    let e = entry(&b);
    let fh = Reader::new(&b[ENTRY_OUT..]).u64().unwrap();
    let data: Vec<u8> = (0..3 * MAX_WRITE).map(|i| (i % 253) as u8).collect();
    for (i, chunk) in data.chunks(MAX_WRITE as usize).enumerate() {
        assert_eq!(
            c.write(fh, (i * MAX_WRITE as usize) as u64, chunk).unwrap() as usize,
            chunk.len()
        );
    }
    assert_eq!(fs::read(c.dir.join("f")).unwrap(), data);
    let mut back = Vec::new();
    while back.len() < data.len() {
        let got = c.read(fh, back.len() as u64, 8 * MAX_WRITE).unwrap();
        assert!(!got.is_empty() && got.len() <= MAX_WRITE as usize);
        back.extend_from_slice(&got);
    }
    assert_eq!(back, data);
    let got = c
        .call(op::GETATTR, e.id, Args::default().u32(0).u32(0).u64(0))
        .unwrap();
    assert_eq!(
        attr(&mut Reader::new(&got[16..]), e.id).size,
        data.len() as u64
    );
    // A write whose size field claims more than was sent.
    let a = Args::default()
        .u64(fh)
        .u64(0)
        .u32(100)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .raw(b"short");
    assert_eq!(c.call(op::WRITE, 0, a), Err(errno::EINVAL));
    c.call(op::FSYNC, e.id, Args::default().u64(fh).u32(0).u32(0))
        .unwrap();
    c.call(
        op::FLUSH,
        e.id,
        Args::default().u64(fh).u32(0).u32(0).u64(0),
    )
    .unwrap();
    c.call(
        op::RELEASE,
        e.id,
        Args::default().u64(fh).u32(0).u32(0).u64(0),
    )
    .unwrap();
    assert_eq!(c.read(fh, 0, 10), Err(errno::EBADF));
    assert_eq!(c.srv.table_sizes().1, 0);
}

#[test]
fn namespace_operations_and_statfs() {
    let mut c = Client::new();
    let d1 = entry(
        &c.call(
            op::MKDIR,
            ROOT_ID,
            Args::default().u32(0o755).u32(0).name(b"d1"),
        )
        .unwrap(),
    );
    let d2 = entry(
        &c.call(
            op::MKDIR,
            ROOT_ID,
            Args::default().u32(0o755).u32(0).name(b"d2"),
        )
        .unwrap(),
    );
    assert_eq!(d1.mode & lmode::S_IFMT, lmode::S_IFDIR);
    fs::write(c.dir.join("d1/f"), b"x").unwrap();
    let f = c.lookup(d1.id, b"f").unwrap();
    let l = entry(
        &c.call(op::LINK, d2.id, Args::default().u64(f.id).name(b"hard"))
            .unwrap(),
    );
    assert_eq!((l.id, l.nlink), (f.id, 2));
    c.call(
        op::RENAME,
        d1.id,
        Args::default().u64(d2.id).name(b"f").name(b"moved"),
    )
    .unwrap();
    assert!(c.dir.join("d2/moved").exists());
    assert_eq!(
        c.call(
            op::RENAME2,
            d2.id,
            Args::default()
                .u64(d1.id)
                .u32(1)
                .u32(0)
                .name(b"moved")
                .name(b"x")
        ),
        Err(errno::EINVAL)
    );
    let s = entry(
        &c.call(
            op::SYMLINK,
            ROOT_ID,
            Args::default().name(b"ln").name(b"/etc/passwd"),
        )
        .unwrap(),
    );
    assert_eq!(
        c.call(op::READLINK, s.id, Args::default()).unwrap(),
        b"/etc/passwd"
    );
    let nod = |c: &mut Client, mode: u32, name: &[u8]| {
        c.call(
            op::MKNOD,
            ROOT_ID,
            Args::default()
                .u32(mode)
                .u32(0x0103)
                .u32(0)
                .u32(0)
                .name(name),
        )
    };
    assert_eq!(
        nod(&mut c, lmode::S_IFCHR | 0o666, b"null"),
        Err(errno::EPERM)
    );
    let fifo = entry(&nod(&mut c, lmode::S_IFIFO | 0o600, b"fifo").unwrap());
    assert_eq!(c.open(fifo.id, oflag::O_RDONLY), Err(errno::ENXIO));
    let mut names = c.readdir(ROOT_ID, 80);
    names.sort();
    assert_eq!(
        names,
        [&b"d1"[..], b"d2", b"fifo", b"ln"].map(|s| s.to_vec())
    );
    assert_eq!(
        c.call(op::RMDIR, ROOT_ID, Args::default().name(b"d2")),
        Err(errno::ENOTEMPTY)
    );
    c.call(op::UNLINK, d2.id, Args::default().name(b"moved"))
        .unwrap();
    c.call(op::UNLINK, d2.id, Args::default().name(b"hard"))
        .unwrap();
    c.call(op::RMDIR, ROOT_ID, Args::default().name(b"d2"))
        .unwrap();
    let st = c.call(op::STATFS, ROOT_ID, Args::default()).unwrap();
    assert_eq!(st.len(), 80);
    // blocks, then bsize at 40 and frsize, the unit of the counts, at 48.
    let host = crate::fs::p9::tests::nix_statvfs(&c.dir);
    #[allow(clippy::unnecessary_cast)] // u32 on macOS
    let (blocks, host_frsize) = (host.f_blocks as u64, host.f_frsize as u64);
    let mut r = Reader::new(&st);
    assert_eq!(r.u64().unwrap(), blocks);
    let frsize = u32::from_le_bytes(st[48..52].try_into().unwrap());
    assert_eq!(u64::from(frsize), host_frsize);
    // SETATTR: truncate and chmod, attributes come back.
    let valid = 1 | 8;
    let a = Args::default()
        .u32(valid)
        .u32(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(0o600)
        .u32(0)
        .u32(0)
        .u32(0)
        .u32(0);
    let b = c.call(op::SETATTR, f.id, a).unwrap();
    let at = attr(&mut Reader::new(&b[16..]), f.id);
    assert_eq!((at.size, at.mode), (0, lmode::S_IFREG | 0o600));
    assert_eq!(
        c.call(
            op::GETXATTR,
            f.id,
            Args::default().u32(0).u32(0).name(b"user.x")
        ),
        Err(errno::ENOSYS)
    );
}

#[test]
fn lookups_stay_inside_the_share() {
    let mut c = Client::new();
    symlink(&c.outside, c.dir.join("out")).unwrap();
    symlink("../outside/secret", c.dir.join("sec")).unwrap();
    let root = c.lookup(ROOT_ID, b"..").unwrap();
    assert_eq!(root.id, ROOT_ID);
    for bad in [&b"a/b"[..], b"", b".", b"/etc"] {
        assert_eq!(c.lookup(ROOT_ID, bad).err(), Some(errno::EINVAL), "{bad:?}");
    }
    assert_eq!(c.lookup(ROOT_ID, b"outside").err(), Some(errno::ENOENT));
    let out = c.lookup(ROOT_ID, b"out").unwrap();
    assert_eq!(out.mode & lmode::S_IFMT, lmode::S_IFLNK);
    assert_eq!(c.lookup(out.id, b"secret").err(), Some(errno::ENOTDIR));
    let sec = c.lookup(ROOT_ID, b"sec").unwrap();
    assert_eq!(c.open(sec.id, oflag::O_RDONLY), Err(errno::ELOOP));
    assert_eq!(
        c.call(
            op::CREATE,
            out.id,
            Args::default().u32(2).u32(0o644).u32(0).u32(0).name(b"x")
        ),
        Err(errno::ENOTDIR)
    );
    // Node ids never handed out are unknown.
    assert_eq!(c.lookup(12345, b"x").err(), Some(errno::ENOENT));
}

#[test]
fn forget_drops_nodes_and_tables_are_bounded() {
    let mut c = Client::with(
        false,
        Options {
            max_nodes: 3,
            max_handles: 1,
            ..Default::default()
        },
    );
    for n in [&b"a"[..], b"b", b"c"] {
        fs::write(c.dir.join(std::str::from_utf8(n).unwrap()), b"").unwrap();
    }
    let a = c.lookup(ROOT_ID, b"a").unwrap();
    assert_eq!(c.lookup(ROOT_ID, b"a").unwrap().id, a.id);
    let b = c.lookup(ROOT_ID, b"b").unwrap();
    assert_eq!(c.lookup(ROOT_ID, b"c").err(), Some(errno::ENFILE));
    // FORGET takes no reply; two lookups of a need two forgets.
    assert!(c
        .raw(&request(op::FORGET, 99, a.id, &1u64.to_le_bytes()))
        .is_none());
    assert_eq!(c.srv.table_sizes().0, 3);
    let batch = Args::default()
        .u32(2)
        .u32(0)
        .u64(a.id)
        .u64(1)
        .u64(b.id)
        .u64(5);
    assert!(c
        .raw(&request(op::BATCH_FORGET, 100, 0, &batch.0))
        .is_none());
    assert_eq!(c.srv.table_sizes().0, 1);
    assert_eq!(
        c.call(op::GETATTR, a.id, Args::default().u32(0).u32(0).u64(0)),
        Err(errno::ENOENT)
    );
    // The root cannot be forgotten.
    assert!(c
        .raw(&request(op::FORGET, 101, ROOT_ID, &100u64.to_le_bytes()))
        .is_none());
    let c2 = c.lookup(ROOT_ID, b"c").unwrap();
    c.open(c2.id, oflag::O_RDONLY).unwrap();
    assert_eq!(c.open(c2.id, oflag::O_RDONLY), Err(errno::ENFILE));
}

#[test]
fn read_only_and_squash() {
    let mut c = Client::with(
        true,
        Options {
            ids: IdMapping::Squash { uid: 501, gid: 20 },
            ..Default::default()
        },
    );
    fs::write(c.dir.join("f"), b"keep").unwrap();
    let f = c.lookup(ROOT_ID, b"f").unwrap();
    assert_eq!(f.uid, 501);
    assert_eq!(c.open(f.id, oflag::O_WRONLY), Err(errno::EROFS));
    assert_eq!(
        c.open(f.id, oflag::O_RDONLY | oflag::O_TRUNC),
        Err(errno::EROFS)
    );
    assert_eq!(
        c.call(
            op::MKDIR,
            ROOT_ID,
            Args::default().u32(0o755).u32(0).name(b"d")
        ),
        Err(errno::EROFS)
    );
    assert_eq!(
        c.call(op::UNLINK, ROOT_ID, Args::default().name(b"f")),
        Err(errno::EROFS)
    );
    let fh = c.open(f.id, oflag::O_RDONLY).unwrap();
    assert_eq!(c.read(fh, 0, 100).unwrap(), b"keep");
    assert_eq!(c.write(fh, 0, b"x"), Err(errno::EBADF));
}

#[test]
fn malformed_requests_get_an_error_reply() {
    let mut c = Client::new();
    // Shorter than a header.
    let (err, _, _) = c.raw(&[1, 2, 3]).unwrap();
    assert_eq!(err, -errno::EINVAL);
    // A length field past the end, unique kept.
    let mut m = request(op::LOOKUP, 77, ROOT_ID, b"x\0");
    m[0..4].copy_from_slice(&1000u32.to_le_bytes());
    let (err, unique, _) = c.raw(&m).unwrap();
    assert_eq!((err, unique), (-errno::EINVAL, 77));
    // A name with no terminating NUL.
    assert_eq!(
        c.call(op::LOOKUP, ROOT_ID, Args::default().raw(b"abc"))
            .err(),
        Some(errno::EINVAL)
    );
    // Truncated fixed arguments.
    assert_eq!(
        c.call(op::READ, 0, Args::default().u64(1)).err(),
        Some(errno::EINVAL)
    );
    assert_eq!(
        c.call(200, ROOT_ID, Args::default()).err(),
        Some(errno::ENOSYS)
    );
}
