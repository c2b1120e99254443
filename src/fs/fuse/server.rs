//! The in-process virtio-fs server: FUSE requests in, replies out, on the [`Share`] sandbox.
//! Node ids name looked-up nodes (one id per host inode while the kernel holds it), file
//! handles name open descriptors; both tables are bounded.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use super::abi::{self, fattr, op, InHeader, ATTR, ENTRY_OUT, IN_HEADER, OUT_HEADER, ROOT_ID};
use crate::fs::linux_abi::{self, errno};
use crate::fs::p9::wire::{Reader, WireError};
use crate::fs::sandbox::{Attr, DirEntry, FsError, Node, SetAttr, SetTime, Share};
use crate::fs::IdMapping;

/// Largest write (and read) offered to the kernel: 1 MiB (256 pages).
pub const MAX_WRITE: u32 = 1024 * 1024;
/// Default bounds of the node and handle tables. Every node holds an O_PATH descriptor, so
/// the node bound must stay under the process's descriptor limit.
pub const DEFAULT_MAX_NODES: usize = 1 << 16;
pub const DEFAULT_MAX_HANDLES: usize = 1 << 16;
/// How long the guest may cache names and attributes (seconds): host changes show within it.
const VALID_SECS: u64 = 1;

/// Server options (from `-s N,virtio-fs,DIR,tag=T[,ro][,uid=N,gid=N]`).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub ids: IdMapping,
    pub max_nodes: usize,
    pub max_handles: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ids: IdMapping::Passthrough,
            max_nodes: DEFAULT_MAX_NODES,
            max_handles: DEFAULT_MAX_HANDLES,
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("malformed request: {0}")]
    Wire(#[from] WireError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("request length field {len} does not match the {got} bytes received")]
    BadLength { len: u32, got: usize },
    #[error("name is not NUL-terminated")]
    Unterminated,
    #[error("unknown node id {0}")]
    NoNode(u64),
    #[error("unknown file handle {0}")]
    NoHandle(u64),
    #[error("{0} table is full")]
    TableFull(&'static str),
    #[error("opcode {0} is not supported")]
    Unsupported(u32),
    #[error("INIT has not been received")]
    NotInitialised,
    #[error("write of {0} bytes exceeds the {MAX_WRITE}-byte limit")]
    TooBig(u32),
    #[error("rename flags {0:#x} are not supported")]
    RenameFlags(u32),
    #[error("{op}: {err}")]
    Io {
        op: &'static str,
        err: std::io::Error,
    },
}

impl FuseError {
    pub fn errno(&self) -> i32 {
        match self {
            FuseError::Wire(_) | FuseError::BadLength { .. } | FuseError::Unterminated => {
                errno::EINVAL
            }
            FuseError::Fs(e) => e.errno(),
            FuseError::NoNode(_) => errno::ENOENT,
            FuseError::NoHandle(_) => errno::EBADF,
            FuseError::TableFull(_) => errno::ENFILE,
            FuseError::Unsupported(_) => errno::ENOSYS,
            FuseError::NotInitialised => errno::EIO,
            FuseError::TooBig(_) => errno::EINVAL,
            FuseError::RenameFlags(_) => errno::EINVAL,
            FuseError::Io { err, .. } => {
                linux_abi::to_linux_errno(err.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    }
}

type Result<T> = std::result::Result<T, FuseError>;

/// Splits the header off a request, checking its length field.
pub fn parse_header(req: &[u8]) -> Result<(InHeader, &[u8])> {
    let mut r = Reader::new(req);
    let h = InHeader {
        len: r.u32()?,
        opcode: r.u32()?,
        unique: r.u64()?,
        nodeid: r.u64()?,
        uid: r.u32()?,
        gid: r.u32()?,
        pid: r.u32()?,
    };
    r.u32()?; // total_extlen, padding
    if (h.len as usize) < IN_HEADER || h.len as usize > req.len() {
        return Err(FuseError::BadLength {
            len: h.len,
            got: req.len(),
        });
    }
    Ok((h, &req[IN_HEADER..h.len as usize]))
}

/// A NUL-terminated name at the front of `r`.
fn cname<'a>(r: &mut Reader<'a>) -> Result<&'a [u8]> {
    let rest = r.rest();
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(FuseError::Unterminated)?;
    *r = Reader::new(&rest[end + 1..]);
    Ok(&rest[..end])
}

struct Inode {
    node: Arc<Node>,
    lookups: u64,
}

struct Handle {
    fd: OwnedFd,
    /// A directory's listing, taken at OPENDIR and read from by offset.
    dir: Option<Vec<DirEntry>>,
}

/// A FUSE server for one share.
pub struct Server {
    share: Share,
    opts: Options,
    initialised: bool,
    inodes: HashMap<u64, Inode>,
    by_ino: HashMap<(u64, u64), u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    can_chown: bool,
}

/// A reply under construction.
struct Out<'a> {
    buf: &'a mut Vec<u8>,
}

impl<'a> Out<'a> {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }
    fn attr(&mut self, a: &Attr) -> &mut Self {
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(a.atime.0 as u64)
            .u64(a.mtime.0 as u64)
            .u64(a.ctime.0 as u64);
        self.u32(a.atime.1 as u32)
            .u32(a.mtime.1 as u32)
            .u32(a.ctime.1 as u32);
        self.u32(a.mode)
            .u32(a.nlink.min(u32::MAX as u64) as u32)
            .u32(a.uid)
            .u32(a.gid);
        self.u32(a.rdev as u32).u32(a.blksize as u32).u32(0)
    }
}

impl Server {
    pub fn new(share: Share, opts: Options) -> Server {
        let root = share.root();
        let mut inodes = HashMap::new();
        let mut by_ino = HashMap::new();
        by_ino.insert((root.dev, root.ino), ROOT_ID);
        // The root is never forgotten: its count starts at one and FORGET cannot take it.
        inodes.insert(
            ROOT_ID,
            Inode {
                node: root,
                lookups: 1,
            },
        );
        // SAFETY: geteuid has no preconditions.
        let can_chown = unsafe { libc::geteuid() } == 0;
        Server {
            share,
            opts,
            initialised: false,
            inodes,
            by_ino,
            next_id: ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
            can_chown,
        }
    }

    /// Live node ids and open handles (for tests and diagnostics).
    pub fn table_sizes(&self) -> (usize, usize) {
        (self.inodes.len(), self.handles.len())
    }

    /// Handles one request. Returns false when the request takes no reply (FORGET); otherwise
    /// exactly one reply has been appended to `out`.
    pub fn handle(&mut self, req: &[u8], out: &mut Vec<u8>) -> bool {
        let (h, body) = match parse_header(req) {
            Ok(v) => v,
            Err(e) => {
                log::debug!("virtio-fs: {e}");
                let unique = req
                    .get(8..16)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(0);
                Self::error(out, unique, errno::EINVAL);
                return true;
            }
        };
        if h.opcode == op::FORGET || h.opcode == op::BATCH_FORGET {
            self.forget(&h, body);
            return false;
        }
        let start = out.len();
        out.resize(start + OUT_HEADER, 0);
        let mut o = Out { buf: out };
        match self.dispatch(&h, body, &mut o) {
            Ok(()) => {
                let len = (out.len() - start) as u32;
                out[start..start + 4].copy_from_slice(&len.to_le_bytes());
                out[start + 8..start + 16].copy_from_slice(&h.unique.to_le_bytes());
            }
            Err(e) => {
                if !matches!(e, FuseError::Unsupported(_)) {
                    log::debug!("virtio-fs: opcode {} node {}: {e}", h.opcode, h.nodeid);
                }
                out.truncate(start);
                Self::error(out, h.unique, e.errno());
            }
        }
        true
    }

    fn error(out: &mut Vec<u8>, unique: u64, errno: i32) {
        out.extend_from_slice(&(OUT_HEADER as u32).to_le_bytes());
        out.extend_from_slice(&(-errno).to_le_bytes());
        out.extend_from_slice(&unique.to_le_bytes());
    }

    fn dispatch(&mut self, h: &InHeader, body: &[u8], o: &mut Out) -> Result<()> {
        let mut r = Reader::new(body);
        if h.opcode == op::INIT {
            return self.init(&mut r, o);
        }
        if !self.initialised {
            return Err(FuseError::NotInitialised);
        }
        match h.opcode {
            op::LOOKUP => {
                let name = cname(&mut r)?;
                let dir = self.node(h.nodeid)?;
                let node = self.share.lookup(&dir, name)?;
                self.entry(node, o)
            }
            op::GETATTR => {
                let node = self.node(h.nodeid)?;
                self.attr_out(&node, o)
            }
            op::SETATTR => self.setattr(h, &mut r, o),
            op::READLINK => {
                let node = self.node(h.nodeid)?;
                let target = self.share.readlink(&node)?;
                o.buf.extend_from_slice(&target);
                Ok(())
            }
            op::SYMLINK => {
                let name = cname(&mut r)?;
                let target = cname(&mut r)?;
                let dir = self.node(h.nodeid)?;
                let node = self.share.symlink(&dir, name, target)?;
                self.own(&node, h);
                self.entry(node, o)
            }
            op::MKNOD => {
                let mode = r.u32()?;
                let _rdev = r.u32()?;
                let _umask = r.u32()?;
                r.u32()?;
                let name = cname(&mut r)?;
                let dir = self.node(h.nodeid)?;
                let node = self.share.mknod(&dir, name, mode)?;
                self.own(&node, h);
                self.entry(node, o)
            }
            op::MKDIR => {
                let mode = r.u32()?;
                let _umask = r.u32()?;
                let name = cname(&mut r)?;
                let dir = self.node(h.nodeid)?;
                let node = self.share.mkdir(&dir, name, mode)?;
                self.own(&node, h);
                self.entry(node, o)
            }
            op::UNLINK | op::RMDIR => {
                let name = cname(&mut r)?;
                let dir = self.node(h.nodeid)?;
                self.share.unlink(&dir, name, h.opcode == op::RMDIR)?;
                Ok(())
            }
            op::RENAME | op::RENAME2 => {
                let newdir = r.u64()?;
                if h.opcode == op::RENAME2 {
                    let flags = r.u32()?;
                    r.u32()?;
                    if flags != 0 {
                        return Err(FuseError::RenameFlags(flags));
                    }
                }
                let old = cname(&mut r)?;
                let new = cname(&mut r)?;
                let (od, nd) = (self.node(h.nodeid)?, self.node(newdir)?);
                self.share.rename(&od, old, &nd, new)?;
                Ok(())
            }
            op::LINK => {
                let oldid = r.u64()?;
                let name = cname(&mut r)?;
                let (node, dir) = (self.node(oldid)?, self.node(h.nodeid)?);
                let new = self.share.link(&node, &dir, name)?;
                self.entry(new, o)
            }
            op::OPEN | op::OPENDIR => {
                let flags = r.u32()?;
                let node = self.node(h.nodeid)?;
                let fd = self.share.open(&node, linux_abi::host_open_flags(flags))?;
                let dir = if h.opcode == op::OPENDIR {
                    Some(self.share.read_dir(&node)?)
                } else {
                    None
                };
                let fh = self.new_handle(Handle { fd, dir })?;
                o.u64(fh).u32(0).u32(0);
                Ok(())
            }
            op::CREATE => {
                let flags = r.u32()?;
                let mode = r.u32()?;
                let _umask = r.u32()?;
                r.u32()?;
                let name = cname(&mut r)?;
                let dir = self.node(h.nodeid)?;
                if self.handles.len() >= self.opts.max_handles {
                    return Err(FuseError::TableFull("handle"));
                }
                let (node, fd) =
                    self.share
                        .create(&dir, name, linux_abi::host_open_flags(flags), mode)?;
                self.own(&node, h);
                self.entry(node, o)?;
                let fh = self.new_handle(Handle { fd, dir: None })?;
                o.u64(fh).u32(0).u32(0);
                Ok(())
            }
            op::READ => self.read(&mut r, o),
            op::WRITE => self.write(&mut r, o),
            op::STATFS => {
                let node = self.node(h.nodeid)?;
                let s = self.share.statfs(&node)?;
                o.u64(s.blocks)
                    .u64(s.bfree)
                    .u64(s.bavail)
                    .u64(s.files)
                    .u64(s.ffree);
                o.u32(s.bsize as u32)
                    .u32(s.namelen as u32)
                    .u32(s.frsize as u32)
                    .u32(0)
                    .zeros(24);
                Ok(())
            }
            op::RELEASE | op::RELEASEDIR => {
                let fh = r.u64()?;
                self.handles.remove(&fh).ok_or(FuseError::NoHandle(fh))?;
                Ok(())
            }
            op::FLUSH => {
                let fh = r.u64()?;
                self.handles.get(&fh).ok_or(FuseError::NoHandle(fh))?;
                Ok(())
            }
            op::FSYNC | op::FSYNCDIR => {
                let fh = r.u64()?;
                let fd = self
                    .handles
                    .get(&fh)
                    .ok_or(FuseError::NoHandle(fh))?
                    .fd
                    .as_raw_fd();
                // SAFETY: fsync on a descriptor the handle table owns.
                if unsafe { libc::fsync(fd) } != 0 {
                    return Err(FuseError::Io {
                        op: "fsync",
                        err: std::io::Error::last_os_error(),
                    });
                }
                Ok(())
            }
            op::READDIR => self.readdir(&mut r, o),
            op::DESTROY => {
                self.handles.clear();
                self.initialised = false;
                Ok(())
            }
            // No xattrs, no remote POSIX locks (the guest kernel keeps them locally when
            // INIT did not offer them), no ACCESS (ENOSYS makes the kernel check itself).
            other => Err(FuseError::Unsupported(other)),
        }
    }

    fn init(&mut self, r: &mut Reader, o: &mut Out) -> Result<()> {
        let major = r.u32()?;
        let minor = r.u32()?;
        let max_readahead = r.u32()?;
        let flags = r.u32()?;
        if major != abi::KERNEL_VERSION {
            // Tell the kernel which major we speak; it decides.
            o.u32(abi::KERNEL_VERSION).u32(abi::KERNEL_MINOR).zeros(56);
            return Ok(());
        }
        let _ = minor;
        self.initialised = true;
        let ours = abi::init::ASYNC_READ | abi::init::BIG_WRITES | abi::init::MAX_PAGES;
        o.u32(abi::KERNEL_VERSION)
            .u32(abi::KERNEL_MINOR)
            .u32(max_readahead)
            .u32(flags & ours);
        o.u16(16).u16(12); // max_background, congestion_threshold
        o.u32(MAX_WRITE).u32(1); // max_write, time_gran (ns)
        o.u16((MAX_WRITE / 4096) as u16).u16(0); // max_pages, map_alignment
        o.zeros(32); // flags2, max_stack_depth, unused
        Ok(())
    }

    fn node(&self, id: u64) -> Result<Arc<Node>> {
        self.inodes
            .get(&id)
            .map(|i| i.node.clone())
            .ok_or(FuseError::NoNode(id))
    }

    fn attr(&self, node: &Node) -> Result<Attr> {
        let mut a = self.share.getattr(node)?;
        if let IdMapping::Squash { uid, gid } = self.opts.ids {
            a.uid = uid;
            a.gid = gid;
        }
        Ok(a)
    }

    fn attr_out(&self, node: &Node, o: &mut Out) -> Result<()> {
        let a = self.attr(node)?;
        o.u64(VALID_SECS).u32(0).u32(0).attr(&a);
        Ok(())
    }

    /// Registers a looked-up node (or counts one more lookup of a known inode) and writes
    /// `fuse_entry_out`.
    fn entry(&mut self, node: Arc<Node>, o: &mut Out) -> Result<()> {
        let a = self.attr(&node)?;
        let key = (node.dev, node.ino);
        let id = match self.by_ino.get(&key) {
            Some(&id) => {
                if let Some(i) = self.inodes.get_mut(&id) {
                    i.lookups += 1;
                    // The fresh node knows the current name and parent (after a rename), which
                    // reopen-by-name (no /proc, macOS) and `..` rely on.
                    i.node = node;
                }
                id
            }
            None => {
                if self.inodes.len() >= self.opts.max_nodes {
                    return Err(FuseError::TableFull("node"));
                }
                let id = self.next_id;
                self.next_id += 1;
                self.inodes.insert(id, Inode { node, lookups: 1 });
                self.by_ino.insert(key, id);
                id
            }
        };
        let start = o.buf.len();
        o.u64(id)
            .u64(0)
            .u64(VALID_SECS)
            .u64(VALID_SECS)
            .u32(0)
            .u32(0)
            .attr(&a);
        debug_assert_eq!(o.buf.len() - start, ENTRY_OUT);
        debug_assert_eq!(ENTRY_OUT - 40, ATTR);
        Ok(())
    }

    fn forget(&mut self, h: &InHeader, body: &[u8]) {
        let mut r = Reader::new(body);
        if h.opcode == op::FORGET {
            if let Ok(n) = r.u64() {
                self.forget_one(h.nodeid, n);
            }
            return;
        }
        let Ok(count) = r.u32() else { return };
        let _ = r.u32();
        for _ in 0..count {
            match (r.u64(), r.u64()) {
                (Ok(id), Ok(n)) => self.forget_one(id, n),
                _ => return,
            }
        }
    }

    fn forget_one(&mut self, id: u64, n: u64) {
        if id == ROOT_ID {
            return;
        }
        if let Some(i) = self.inodes.get_mut(&id) {
            i.lookups = i.lookups.saturating_sub(n);
            if i.lookups == 0 {
                let key = (i.node.dev, i.node.ino);
                self.inodes.remove(&id);
                self.by_ino.remove(&key);
            }
        }
    }

    fn new_handle(&mut self, h: Handle) -> Result<u64> {
        if self.handles.len() >= self.opts.max_handles {
            return Err(FuseError::TableFull("handle"));
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(fh, h);
        Ok(fh)
    }

    fn own(&self, node: &Node, h: &InHeader) {
        if self.can_chown && self.opts.ids == IdMapping::Passthrough {
            let attr = SetAttr {
                uid: Some(h.uid),
                gid: Some(h.gid),
                ..Default::default()
            };
            if let Err(e) = self.share.setattr(node, &attr) {
                log::debug!("virtio-fs: chown of a new file: {e}");
            }
        }
    }

    fn setattr(&mut self, h: &InHeader, r: &mut Reader, o: &mut Out) -> Result<()> {
        let valid = r.u32()?;
        r.u32()?;
        let _fh = r.u64()?;
        let size = r.u64()?;
        let _lock_owner = r.u64()?;
        let (atime, mtime, _ctime) = (r.u64()?, r.u64()?, r.u64()?);
        let (atimensec, mtimensec, _ctimensec) = (r.u32()?, r.u32()?, r.u32()?);
        let mode = r.u32()?;
        r.u32()?;
        let uid = r.u32()?;
        let gid = r.u32()?;
        let time = |bit: u32, now: u32, s: u64, ns: u32| {
            if valid & now != 0 {
                SetTime::Now
            } else if valid & bit != 0 {
                SetTime::At(s as i64, ns as i64)
            } else {
                SetTime::Keep
            }
        };
        let squash = matches!(self.opts.ids, IdMapping::Squash { .. });
        let attr = SetAttr {
            mode: (valid & fattr::MODE != 0).then_some(mode),
            uid: (valid & fattr::UID != 0 && !squash).then_some(uid),
            gid: (valid & fattr::GID != 0 && !squash).then_some(gid),
            size: (valid & fattr::SIZE != 0).then_some(size),
            atime: time(fattr::ATIME, fattr::ATIME_NOW, atime, atimensec),
            mtime: time(fattr::MTIME, fattr::MTIME_NOW, mtime, mtimensec),
        };
        let node = self.node(h.nodeid)?;
        let changes = fattr::MODE
            | fattr::UID
            | fattr::GID
            | fattr::SIZE
            | fattr::ATIME
            | fattr::MTIME
            | fattr::ATIME_NOW
            | fattr::MTIME_NOW;
        if valid & changes != 0 {
            self.share.setattr(&node, &attr)?;
        }
        self.attr_out(&node, o)
    }

    fn read(&mut self, r: &mut Reader, o: &mut Out) -> Result<()> {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let size = r.u32()?.min(MAX_WRITE);
        let fd = self
            .handles
            .get(&fh)
            .ok_or(FuseError::NoHandle(fh))?
            .fd
            .as_raw_fd();
        let offset = i64::try_from(offset).map_err(|_| FuseError::Io {
            op: "read",
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let at = o.buf.len();
        o.buf.reserve(size as usize);
        // SAFETY: the spare capacity holds `size` bytes; only the `n` pread reports are then
        // counted as initialised.
        unsafe {
            let n = libc::pread(
                fd,
                o.buf.as_mut_ptr().add(at).cast(),
                size as usize,
                offset as libc::off_t,
            );
            if n < 0 {
                return Err(FuseError::Io {
                    op: "read",
                    err: std::io::Error::last_os_error(),
                });
            }
            o.buf.set_len(at + n as usize);
        }
        Ok(())
    }

    fn write(&mut self, r: &mut Reader, o: &mut Out) -> Result<()> {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let size = r.u32()?;
        let _write_flags = r.u32()?;
        let _lock_owner = r.u64()?;
        let _flags = r.u32()?;
        r.u32()?;
        if size > MAX_WRITE {
            return Err(FuseError::TooBig(size));
        }
        let data = r.bytes(size as usize)?;
        let fd = self
            .handles
            .get(&fh)
            .ok_or(FuseError::NoHandle(fh))?
            .fd
            .as_raw_fd();
        let offset = i64::try_from(offset).map_err(|_| FuseError::Io {
            op: "write",
            err: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: `data` is a valid slice of `size` bytes.
        let n =
            unsafe { libc::pwrite(fd, data.as_ptr().cast(), data.len(), offset as libc::off_t) };
        if n < 0 {
            return Err(FuseError::Io {
                op: "write",
                err: std::io::Error::last_os_error(),
            });
        }
        o.u32(n as u32).u32(0);
        Ok(())
    }

    /// `fuse_dirent`s from the listing taken at OPENDIR; offsets are 1-based indices.
    fn readdir(&mut self, r: &mut Reader, o: &mut Out) -> Result<()> {
        let fh = r.u64()?;
        let offset = r.u64()?;
        let size = r.u32()?.min(MAX_WRITE) as usize;
        let h = self.handles.get(&fh).ok_or(FuseError::NoHandle(fh))?;
        let list = h.dir.as_ref().ok_or(FuseError::Io {
            op: "readdir",
            err: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        })?;
        let mut used = 0;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, e) in list.iter().enumerate().skip(start) {
            let len = (24 + e.name.len()).next_multiple_of(8);
            if used + len > size {
                break;
            }
            o.u64(e.ino)
                .u64(i as u64 + 1)
                .u32(e.name.len() as u32)
                .u32(e.dtype as u32);
            o.buf.extend_from_slice(&e.name);
            o.zeros(len - 24 - e.name.len());
            used += len;
        }
        Ok(())
    }
}
