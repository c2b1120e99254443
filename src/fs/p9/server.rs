//! The 9P2000.L server: one request message in, one reply message out, on top of the
//! [`Share`] sandbox. It knows no transport; the virtio-9p device and the tests feed it bytes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::wire::{self, Qid, Reader, WireError, Writer, QTDIR, QTFILE, QTSYMLINK};
use crate::fs::linux_abi::{self, errno};
use crate::fs::sandbox::{Attr, FsError, Kind, Node, SetAttr, SetTime, Share};
pub use crate::fs::IdMapping;

/// Message types (9P2000.L and the base 9P2000 ones it keeps).
pub mod msg {
    pub const RLERROR: u8 = 7;
    pub const TSTATFS: u8 = 8;
    pub const TLOPEN: u8 = 12;
    pub const TLCREATE: u8 = 14;
    pub const TSYMLINK: u8 = 16;
    pub const TMKNOD: u8 = 18;
    pub const TRENAME: u8 = 20;
    pub const TREADLINK: u8 = 22;
    pub const TGETATTR: u8 = 24;
    pub const TSETATTR: u8 = 26;
    pub const TXATTRWALK: u8 = 30;
    pub const TXATTRCREATE: u8 = 32;
    pub const TREADDIR: u8 = 40;
    pub const TFSYNC: u8 = 50;
    pub const TLOCK: u8 = 52;
    pub const TGETLOCK: u8 = 54;
    pub const TLINK: u8 = 70;
    pub const TMKDIR: u8 = 72;
    pub const TRENAMEAT: u8 = 74;
    pub const TUNLINKAT: u8 = 76;
    pub const TVERSION: u8 = 100;
    pub const TAUTH: u8 = 102;
    pub const TATTACH: u8 = 104;
    pub const TFLUSH: u8 = 108;
    pub const TWALK: u8 = 110;
    pub const TREAD: u8 = 116;
    pub const TWRITE: u8 = 118;
    pub const TCLUNK: u8 = 120;
    pub const TREMOVE: u8 = 122;
}

/// The protocol version this server speaks.
pub const VERSION: &[u8] = b"9P2000.L";
/// Largest message size offered (the Linux virtio client asks for up to 512 KiB by default;
/// newer ones can go higher).
pub const MAX_MSIZE: u32 = 1024 * 1024;
/// Smallest message size accepted: a walk of 16 maximal names must fit.
pub const MIN_MSIZE: u32 = 4096;
/// Header of Rread/Rwrite and friends: size, type, tag, count.
const IOHDR: u32 = 4 + 1 + 2 + 4;
/// Most names in one Twalk.
const MAX_WELEM: u16 = 16;
/// Default bound on the fid table.
pub const DEFAULT_MAX_FIDS: usize = 16384;

/// Tgetattr "basic" fields, the ones a Linux stat needs.
const GETATTR_BASIC: u64 = 0x7ff;
/// Tsetattr valid bits.
const SETATTR_MODE: u32 = 0x1;
const SETATTR_UID: u32 = 0x2;
const SETATTR_GID: u32 = 0x4;
const SETATTR_SIZE: u32 = 0x8;
const SETATTR_ATIME: u32 = 0x10;
const SETATTR_MTIME: u32 = 0x20;
const SETATTR_ATIME_SET: u32 = 0x80;
const SETATTR_MTIME_SET: u32 = 0x100;
/// Linux AT_REMOVEDIR, in Tunlinkat flags.
const AT_REMOVEDIR: u32 = 0x200;

/// Server options (from `-s N,virtio-9p,DIR,tag=T[,ro][,uid=N,gid=N]`).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub ids: IdMapping,
    pub max_fids: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ids: IdMapping::Passthrough,
            max_fids: DEFAULT_MAX_FIDS,
        }
    }
}

/// Why a request failed: the errno the guest gets, and for the log what happened.
#[derive(Debug, thiserror::Error)]
pub enum P9Error {
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("unknown fid {0}")]
    NoFid(u32),
    #[error("fid {0} is already in use")]
    FidInUse(u32),
    #[error("fid table is full ({0} fids)")]
    TooManyFids(usize),
    #[error("fid {0} is not open")]
    NotOpen(u32),
    #[error("fid {0} is already open")]
    AlreadyOpen(u32),
    #[error("no version negotiated yet")]
    NoVersion,
    #[error("message type {0} is not supported")]
    Unsupported(u8),
    #[error("{op}: {err}")]
    Io {
        op: &'static str,
        err: std::io::Error,
    },
    #[error("count {count} exceeds msize {msize}")]
    TooBig { count: u32, msize: u32 },
}

impl P9Error {
    pub fn errno(&self) -> i32 {
        match self {
            P9Error::Wire(_) | P9Error::TooBig { .. } => errno::EINVAL,
            P9Error::Fs(e) => e.errno(),
            P9Error::NoFid(_) | P9Error::NotOpen(_) => errno::EBADF,
            P9Error::FidInUse(_) | P9Error::AlreadyOpen(_) => errno::EBADF,
            P9Error::TooManyFids(_) => errno::ENFILE,
            P9Error::NoVersion => errno::EINVAL,
            P9Error::Unsupported(_) => errno::EOPNOTSUPP,
            P9Error::Io { err, .. } => {
                linux_abi::to_linux_errno(err.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    }
}

type Result<T> = std::result::Result<T, P9Error>;

fn io_err(op: &'static str) -> P9Error {
    P9Error::Io {
        op,
        err: std::io::Error::last_os_error(),
    }
}

/// A fid: a node, and once opened its descriptor (and for directories the listing being read).
struct Fid {
    node: Arc<Node>,
    open: Option<OwnedFd>,
    dir: Option<Vec<(Qid, u8, Vec<u8>)>>,
    /// The guest user this fid acts for (from Tattach), for owners of new files.
    uid: u32,
}

/// A 9P2000.L server for one share.
pub struct Server {
    share: Share,
    opts: Options,
    msize: u32,
    versioned: bool,
    fids: HashMap<u32, Fid>,
    root_dev: u64,
    /// Whether created files can be given to the guest's uid/gid (the VMM runs as root).
    can_chown: bool,
}

impl Server {
    pub fn new(share: Share, opts: Options) -> Server {
        let root_dev = share.root().dev;
        // SAFETY: geteuid has no preconditions.
        let can_chown = unsafe { libc::geteuid() } == 0;
        Server {
            share,
            opts,
            msize: MAX_MSIZE,
            versioned: false,
            fids: HashMap::new(),
            root_dev,
            can_chown,
        }
    }

    /// The negotiated message size.
    pub fn msize(&self) -> u32 {
        self.msize
    }

    /// How many fids are live.
    pub fn fid_count(&self) -> usize {
        self.fids.len()
    }

    /// Handles one request and appends exactly one reply to `out` (an Rlerror when the request
    /// fails, or cannot even be parsed).
    pub fn handle(&mut self, req: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        let (ty, tag, body) = match wire::split(req) {
            Ok(parts) => parts,
            Err(e) => {
                // Without a trustworthy header, answer the tag if there is one.
                let tag = req
                    .get(5..7)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .unwrap_or(u16::MAX);
                log::debug!("9p: {e}");
                return Self::error(out, tag, errno::EINVAL);
            }
        };
        if let Err(e) = self.dispatch(ty, tag, body, out) {
            log::debug!("9p: type {ty} tag {tag}: {e}");
            out.truncate(start);
            Self::error(out, tag, e.errno());
        }
    }

    fn error(out: &mut Vec<u8>, tag: u16, errno: i32) {
        let mut w = Writer::new(out, msg::RLERROR, tag);
        w.u32(errno as u32);
        w.finish();
    }

    fn dispatch(&mut self, ty: u8, tag: u16, body: &[u8], out: &mut Vec<u8>) -> Result<()> {
        let mut r = Reader::new(body);
        if ty == msg::TVERSION {
            return self.version(&mut r, tag, out);
        }
        if !self.versioned {
            return Err(P9Error::NoVersion);
        }
        let rty = ty.wrapping_add(1);
        match ty {
            msg::TATTACH => self.attach(&mut r, tag, out),
            msg::TAUTH => Err(P9Error::Unsupported(ty)),
            msg::TFLUSH => {
                // Requests are answered in order before the next is read: nothing to cancel.
                r.u16()?;
                Writer::new(out, rty, tag).finish();
                Ok(())
            }
            msg::TWALK => self.walk(&mut r, tag, out),
            msg::TGETATTR => self.getattr(&mut r, tag, out),
            msg::TSETATTR => self.setattr(&mut r, tag, out),
            msg::TLOPEN => self.lopen(&mut r, tag, out),
            msg::TLCREATE => self.lcreate(&mut r, tag, out),
            msg::TREAD => self.read(&mut r, tag, out),
            msg::TWRITE => self.write(&mut r, tag, out),
            msg::TREADDIR => self.readdir(&mut r, tag, out),
            msg::TMKDIR => self.mkdir(&mut r, tag, out),
            msg::TSYMLINK => self.symlink(&mut r, tag, out),
            msg::TMKNOD => self.mknod(&mut r, tag, out),
            msg::TLINK => self.link(&mut r, tag, out),
            msg::TRENAME => self.rename(&mut r, tag, out),
            msg::TRENAMEAT => self.renameat(&mut r, tag, out),
            msg::TUNLINKAT => self.unlinkat(&mut r, tag, out),
            msg::TREADLINK => self.readlink(&mut r, tag, out),
            msg::TSTATFS => self.statfs(&mut r, tag, out),
            msg::TFSYNC => self.fsync(&mut r, tag, out),
            msg::TLOCK => self.lock(&mut r, tag, out),
            msg::TGETLOCK => self.getlock(&mut r, tag, out),
            msg::TCLUNK => {
                let fid = r.u32()?;
                self.fids.remove(&fid).ok_or(P9Error::NoFid(fid))?;
                Writer::new(out, rty, tag).finish();
                Ok(())
            }
            msg::TREMOVE => self.remove(&mut r, tag, out),
            // Extended attributes are not offered: the Linux client treats this as "none".
            msg::TXATTRWALK | msg::TXATTRCREATE => Err(P9Error::Unsupported(ty)),
            _ => Err(P9Error::Unsupported(ty)),
        }
    }

    fn version(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let msize = r.u32()?;
        let version = r.str()?;
        // A new version starts a new session: every fid goes.
        self.fids.clear();
        self.msize = msize.clamp(MIN_MSIZE, MAX_MSIZE);
        let mut w = Writer::new(out, msg::TVERSION + 1, tag);
        w.u32(self.msize);
        if version == VERSION {
            self.versioned = true;
            w.str(VERSION);
        } else {
            self.versioned = false;
            w.str(b"unknown");
        }
        w.finish();
        Ok(())
    }

    fn qid(&self, node: &Node) -> Qid {
        let ty = match node.kind {
            Kind::Dir => QTDIR,
            Kind::Symlink => QTSYMLINK,
            _ => QTFILE,
        };
        // Inode numbers are unique per device; a share spanning mounts folds the device in.
        let path = if node.dev == self.root_dev {
            node.ino
        } else {
            node.ino ^ (node.dev << 48)
        };
        Qid {
            ty,
            version: 0,
            path,
        }
    }

    fn fid(&self, fid: u32) -> Result<&Fid> {
        self.fids.get(&fid).ok_or(P9Error::NoFid(fid))
    }

    fn insert_fid(&mut self, fid: u32, f: Fid, replacing: bool) -> Result<()> {
        if !replacing {
            if self.fids.contains_key(&fid) {
                return Err(P9Error::FidInUse(fid));
            }
            if self.fids.len() >= self.opts.max_fids {
                return Err(P9Error::TooManyFids(self.opts.max_fids));
            }
        }
        self.fids.insert(fid, f);
        Ok(())
    }

    fn attach(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let _afid = r.u32()?;
        let _uname = r.str()?;
        let _aname = r.str()?;
        // n_uname is 9P2000.u/L only; a client that leaves it out acts as nobody in particular.
        let uid = if r.remaining() >= 4 {
            r.u32()?
        } else {
            u32::MAX
        };
        let root = self.share.root();
        let qid = self.qid(&root);
        self.insert_fid(
            fid,
            Fid {
                node: root,
                open: None,
                dir: None,
                uid,
            },
            false,
        )?;
        let mut w = Writer::new(out, msg::TATTACH + 1, tag);
        w.qid(&qid);
        w.finish();
        Ok(())
    }

    fn walk(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let newfid = r.u32()?;
        let n = r.u16()?;
        if n > MAX_WELEM {
            return Err(WireError::TooManyNames(n).into());
        }
        let from = self.fid(fid)?;
        // The spec forbids walking from an open fid; Linux's client and QEMU's server do not
        // mind, and the new fid is never open, so nothing is gained by refusing.
        let (mut node, uid) = (from.node.clone(), from.uid);
        if newfid != fid && self.fids.contains_key(&newfid) {
            return Err(P9Error::FidInUse(newfid));
        }
        let mut qids = Vec::with_capacity(n as usize);
        for i in 0..n {
            let name = r.str()?;
            match self.share.lookup(&node, name) {
                Ok(next) => {
                    qids.push(self.qid(&next));
                    node = next;
                }
                // The first name failing fails the walk; a later one returns the qids so far
                // and leaves newfid unused.
                Err(e) if i == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        if qids.len() == n as usize {
            self.insert_fid(
                newfid,
                Fid {
                    node,
                    open: None,
                    dir: None,
                    uid,
                },
                newfid == fid,
            )?;
        }
        let mut w = Writer::new(out, msg::TWALK + 1, tag);
        w.u16(qids.len() as u16);
        for q in &qids {
            w.qid(q);
        }
        w.finish();
        Ok(())
    }

    fn attr(&self, node: &Node) -> Result<Attr> {
        let mut a = self.share.getattr(node)?;
        if let IdMapping::Squash { uid, gid } = self.opts.ids {
            a.uid = uid;
            a.gid = gid;
        }
        Ok(a)
    }

    fn getattr(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let _mask = r.u64()?;
        let f = self.fid(fid)?;
        let a = self.attr(&f.node)?;
        let qid = self.qid(&f.node);
        let mut w = Writer::new(out, msg::TGETATTR + 1, tag);
        w.u64(GETATTR_BASIC)
            .qid(&qid)
            .u32(a.mode)
            .u32(a.uid)
            .u32(a.gid);
        w.u64(a.nlink)
            .u64(a.rdev)
            .u64(a.size)
            .u64(a.blksize)
            .u64(a.blocks);
        for (s, ns) in [a.atime, a.mtime, a.ctime, (0, 0)] {
            w.u64(s as u64).u64(ns as u64);
        }
        w.u64(0).u64(0); // gen, data_version
        w.finish();
        Ok(())
    }

    fn setattr(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let valid = r.u32()?;
        let mode = r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let size = r.u64()?;
        let (asec, ansec, msec, mnsec) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let time = |bit: u32, set: u32, s: u64, ns: u64| match (valid & bit != 0, valid & set != 0)
        {
            (false, _) => SetTime::Keep,
            (true, false) => SetTime::Now,
            (true, true) => SetTime::At(s as i64, ns as i64),
        };
        let squash = matches!(self.opts.ids, IdMapping::Squash { .. });
        let attr = SetAttr {
            mode: (valid & SETATTR_MODE != 0).then_some(mode),
            uid: (valid & SETATTR_UID != 0 && !squash).then_some(uid),
            gid: (valid & SETATTR_GID != 0 && !squash).then_some(gid),
            size: (valid & SETATTR_SIZE != 0).then_some(size),
            atime: time(SETATTR_ATIME, SETATTR_ATIME_SET, asec, ansec),
            mtime: time(SETATTR_MTIME, SETATTR_MTIME_SET, msec, mnsec),
        };
        let node = self.fid(fid)?.node.clone();
        if valid != 0 {
            self.share.setattr(&node, &attr)?;
        }
        Writer::new(out, msg::TSETATTR + 1, tag).finish();
        Ok(())
    }

    fn iounit(&self) -> u32 {
        self.msize - IOHDR
    }

    fn lopen(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let flags = r.u32()?;
        let f = self.fid(fid)?;
        if f.open.is_some() {
            return Err(P9Error::AlreadyOpen(fid));
        }
        let node = f.node.clone();
        let fd = self.share.open(&node, linux_abi::host_open_flags(flags))?;
        let qid = self.qid(&node);
        let iounit = self.iounit();
        let f = self.fids.get_mut(&fid).ok_or(P9Error::NoFid(fid))?;
        f.open = Some(fd);
        f.dir = None;
        let mut w = Writer::new(out, msg::TLOPEN + 1, tag);
        w.qid(&qid).u32(iounit);
        w.finish();
        Ok(())
    }

    /// Gives a new file to the guest user who made it, when mapping passes ids through and
    /// the host lets us. Failure is not the guest's problem: the file stays the VMM's.
    fn own(&self, node: &Node, uid: u32, gid: u32) {
        if self.can_chown && self.opts.ids == IdMapping::Passthrough && uid != u32::MAX {
            let attr = SetAttr {
                uid: Some(uid),
                gid: Some(gid),
                ..Default::default()
            };
            if let Err(e) = self.share.setattr(node, &attr) {
                log::debug!("9p: chown of a new file: {e}");
            }
        }
    }

    fn lcreate(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let name = r.str()?;
        let flags = r.u32()?;
        let mode = r.u32()?;
        let gid = r.u32()?;
        let f = self.fid(fid)?;
        if f.open.is_some() {
            return Err(P9Error::AlreadyOpen(fid));
        }
        let (dir, uid) = (f.node.clone(), f.uid);
        let (node, fd) = self
            .share
            .create(&dir, name, linux_abi::host_open_flags(flags), mode)?;
        self.own(&node, uid, gid);
        let qid = self.qid(&node);
        let iounit = self.iounit();
        // The fid now stands for the new, open file.
        self.fids.insert(
            fid,
            Fid {
                node,
                open: Some(fd),
                dir: None,
                uid,
            },
        );
        let mut w = Writer::new(out, msg::TLCREATE + 1, tag);
        w.qid(&qid).u32(iounit);
        w.finish();
        Ok(())
    }

    fn open_fd(&self, fid: u32) -> Result<i32> {
        let f = self.fid(fid)?;
        f.open
            .as_ref()
            .map(|fd| fd.as_raw_fd())
            .ok_or(P9Error::NotOpen(fid))
    }

    fn read(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let offset = r.u64()?;
        let count = r.u32()?.min(self.msize - IOHDR);
        let fd = self.open_fd(fid)?;
        let offset = i64::try_from(offset).map_err(|_| P9Error::Io {
            op: "read",
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let mut w = Writer::new(out, msg::TREAD + 1, tag);
        w.u32(0);
        let buf = w.buf();
        let at = buf.len();
        buf.reserve(count as usize);
        // The data goes straight into the reply, no intermediate buffer.
        // SAFETY: the spare capacity holds at least `count` bytes; pread writes at most that
        // many, and only the `n` it reports are then counted as initialised.
        let n = unsafe {
            let n = libc::pread(
                fd,
                buf.as_mut_ptr().add(at).cast(),
                count as usize,
                offset as libc::off_t,
            );
            if n < 0 {
                return Err(io_err("read"));
            }
            buf.set_len(at + n as usize);
            n as u32
        };
        buf[at - 4..at].copy_from_slice(&n.to_le_bytes());
        w.finish();
        Ok(())
    }

    fn write(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let offset = r.u64()?;
        let count = r.u32()?;
        if count > self.msize {
            return Err(P9Error::TooBig {
                count,
                msize: self.msize,
            });
        }
        let data = r.bytes(count as usize)?;
        let fd = self.open_fd(fid)?;
        let offset = i64::try_from(offset).map_err(|_| P9Error::Io {
            op: "write",
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: `data` is a valid slice of `count` bytes.
        let n =
            unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), offset as libc::off_t) };
        if n < 0 {
            return Err(io_err("write"));
        }
        let mut w = Writer::new(out, msg::TWRITE + 1, tag);
        w.u32(n as u32);
        w.finish();
        Ok(())
    }

    fn readdir(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let offset = r.u64()?;
        let count = r.u32()?.min(self.msize - IOHDR) as usize;
        let f = self.fid(fid)?;
        if f.open.is_none() {
            return Err(P9Error::NotOpen(fid));
        }
        if f.node.kind != Kind::Dir {
            return Err(FsError::Os {
                op: "readdir",
                name: String::new(),
                err: std::io::Error::from_raw_os_error(libc::ENOTDIR),
            }
            .into());
        }
        // The listing is taken at offset 0 and kept until the fid is clunked or rewound, so
        // offsets stay meaningful while the guest pages through it.
        if offset == 0 || f.dir.is_none() {
            let node = f.node.clone();
            let parent = self.share.lookup(&node, b"..")?;
            let mut list = vec![
                (self.qid(&node), libc::DT_DIR, b".".to_vec()),
                (self.qid(&parent), libc::DT_DIR, b"..".to_vec()),
            ];
            for e in self.share.read_dir(&node)? {
                let ty = match e.dtype {
                    libc::DT_DIR => QTDIR,
                    libc::DT_LNK => QTSYMLINK,
                    _ => QTFILE,
                };
                list.push((
                    Qid {
                        ty,
                        version: 0,
                        path: e.ino,
                    },
                    e.dtype,
                    e.name,
                ));
            }
            self.fids.get_mut(&fid).ok_or(P9Error::NoFid(fid))?.dir = Some(list);
        }
        let list = self.fid(fid)?.dir.as_ref().ok_or(P9Error::NotOpen(fid))?;
        let mut w = Writer::new(out, msg::TREADDIR + 1, tag);
        w.u32(0);
        let mut used = 0usize;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (qid, dtype, name)) in list.iter().enumerate().skip(start) {
            let len = 13 + 8 + 1 + wire::str_len(name);
            if used + len > count {
                break;
            }
            w.qid(qid).u64(i as u64 + 1).u8(*dtype).str(name);
            used += len;
        }
        let buf = w.buf();
        let at = buf.len() - used - 4;
        buf[at..at + 4].copy_from_slice(&(used as u32).to_le_bytes());
        w.finish();
        Ok(())
    }

    fn reply_qid(&mut self, ty: u8, tag: u16, node: &Node, out: &mut Vec<u8>) -> Result<()> {
        let qid = self.qid(node);
        let mut w = Writer::new(out, ty + 1, tag);
        w.qid(&qid);
        w.finish();
        Ok(())
    }

    fn dir_of(&self, fid: u32) -> Result<(Arc<Node>, u32)> {
        let f = self.fid(fid)?;
        Ok((f.node.clone(), f.uid))
    }

    fn mkdir(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let dfid = r.u32()?;
        let name = r.str()?;
        let mode = r.u32()?;
        let gid = r.u32()?;
        let (dir, uid) = self.dir_of(dfid)?;
        let node = self.share.mkdir(&dir, name, mode)?;
        self.own(&node, uid, gid);
        self.reply_qid(msg::TMKDIR, tag, &node, out)
    }

    fn symlink(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let name = r.str()?;
        let target = r.str()?;
        let gid = r.u32()?;
        let (dir, uid) = self.dir_of(fid)?;
        let node = self.share.symlink(&dir, name, target)?;
        self.own(&node, uid, gid);
        self.reply_qid(msg::TSYMLINK, tag, &node, out)
    }

    fn mknod(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let dfid = r.u32()?;
        let name = r.str()?;
        let mode = r.u32()?;
        let _major = r.u32()?;
        let _minor = r.u32()?;
        let gid = r.u32()?;
        let (dir, uid) = self.dir_of(dfid)?;
        let node = self.share.mknod(&dir, name, mode)?;
        self.own(&node, uid, gid);
        self.reply_qid(msg::TMKNOD, tag, &node, out)
    }

    fn link(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let dfid = r.u32()?;
        let fid = r.u32()?;
        let name = r.str()?;
        let dir = self.fid(dfid)?.node.clone();
        let node = self.fid(fid)?.node.clone();
        self.share.link(&node, &dir, name)?;
        Writer::new(out, msg::TLINK + 1, tag).finish();
        Ok(())
    }

    fn rename(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let dfid = r.u32()?;
        let name = r.str()?;
        let node = self.fid(fid)?.node.clone();
        let newdir = self.fid(dfid)?.node.clone();
        let olddir = self.share.lookup(&node, b"..")?;
        if node.is_root() {
            return Err(P9Error::Io {
                op: "rename",
                err: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        self.share
            .rename(&olddir, node.name().to_bytes(), &newdir, name)?;
        Writer::new(out, msg::TRENAME + 1, tag).finish();
        Ok(())
    }

    fn renameat(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let ofid = r.u32()?;
        let oname = r.str()?;
        let nfid = r.u32()?;
        let nname = r.str()?;
        let odir = self.fid(ofid)?.node.clone();
        let ndir = self.fid(nfid)?.node.clone();
        self.share.rename(&odir, oname, &ndir, nname)?;
        Writer::new(out, msg::TRENAMEAT + 1, tag).finish();
        Ok(())
    }

    fn unlinkat(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let dfid = r.u32()?;
        let name = r.str()?;
        let flags = r.u32()?;
        let dir = self.fid(dfid)?.node.clone();
        self.share.unlink(&dir, name, flags & AT_REMOVEDIR != 0)?;
        Writer::new(out, msg::TUNLINKAT + 1, tag).finish();
        Ok(())
    }

    fn remove(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        // Tremove clunks the fid whether or not the removal works.
        let f = self.fids.remove(&fid).ok_or(P9Error::NoFid(fid))?;
        if f.node.is_root() {
            return Err(P9Error::Io {
                op: "remove",
                err: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        let parent = self.share.lookup(&f.node, b"..")?;
        self.share
            .unlink(&parent, f.node.name().to_bytes(), f.node.kind == Kind::Dir)?;
        Writer::new(out, msg::TREMOVE + 1, tag).finish();
        Ok(())
    }

    fn readlink(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let node = self.fid(fid)?.node.clone();
        let target = self.share.readlink(&node)?;
        let mut w = Writer::new(out, msg::TREADLINK + 1, tag);
        w.str(&target);
        w.finish();
        Ok(())
    }

    fn statfs(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let node = self.fid(fid)?.node.clone();
        let s = self.share.statfs(&node)?;
        let mut w = Writer::new(out, msg::TSTATFS + 1, tag);
        // Type: V9FS_MAGIC, what a Linux 9p mount reports anyway. The block size is the unit of
        // the counts: Linux makes it both f_bsize and f_frsize.
        w.u32(0x01021997)
            .u32(s.frsize as u32)
            .u64(s.blocks)
            .u64(s.bfree)
            .u64(s.bavail);
        w.u64(s.files)
            .u64(s.ffree)
            .u64(s.fsid)
            .u32(s.namelen as u32);
        w.finish();
        Ok(())
    }

    fn fsync(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        // Older clients send no datasync field.
        let datasync = if r.remaining() >= 4 { r.u32()? } else { 0 };
        let fd = self.open_fd(fid)?;
        #[cfg(target_os = "linux")]
        // SAFETY: fdatasync/fsync on a descriptor this fid owns.
        let rc = unsafe {
            if datasync != 0 {
                libc::fdatasync(fd)
            } else {
                libc::fsync(fd)
            }
        };
        #[cfg(not(target_os = "linux"))]
        // SAFETY: as above (macOS has no fdatasync in libc's bindings for every version).
        let rc = unsafe {
            let _ = datasync;
            libc::fsync(fd)
        };
        if rc != 0 {
            return Err(io_err("fsync"));
        }
        Writer::new(out, msg::TFSYNC + 1, tag).finish();
        Ok(())
    }

    /// POSIX locks stay in the guest: each guest's kernel already arbitrates its own
    /// processes, and the share has one client. Granting is the honest answer.
    fn lock(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let _ty = r.u8()?;
        let _flags = r.u32()?;
        let _start = r.u64()?;
        let _len = r.u64()?;
        let _proc = r.u32()?;
        let _client = r.str()?;
        self.fid(fid)?;
        let mut w = Writer::new(out, msg::TLOCK + 1, tag);
        w.u8(0); // P9_LOCK_SUCCESS
        w.finish();
        Ok(())
    }

    fn getlock(&mut self, r: &mut Reader, tag: u16, out: &mut Vec<u8>) -> Result<()> {
        let fid = r.u32()?;
        let _ty = r.u8()?;
        let start = r.u64()?;
        let len = r.u64()?;
        let proc_id = r.u32()?;
        let client = r.str()?;
        self.fid(fid)?;
        let mut w = Writer::new(out, msg::TGETLOCK + 1, tag);
        w.u8(2).u64(start).u64(len).u32(proc_id).str(client); // F_UNLCK: nobody holds it
        w.finish();
        Ok(())
    }
}
