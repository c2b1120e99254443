//! Confinement: no guest request reaches anything outside the shared directory.
//!
//! Every file the guest can name is a [`Node`]: an open file descriptor for something inside
//! the share, reached from the root one name at a time. Requests never carry paths to the host:
//! a name is one component (no `/`, no NUL, not `.` or empty), `..` is answered from the chain
//! of nodes the walk came through and stops at the root, and a symbolic link is never followed
//! by the host (the guest reads it and resolves it itself, inside its own mount).
//!
//! - Linux: a name is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
//!   RESOLVE_NO_SYMLINKS)` and `O_PATH | O_NOFOLLOW`, so even a device node is only named, never
//!   opened; kernels without `openat2` (ENOSYS, before 5.6) get `openat(O_PATH | O_NOFOLLOW)`,
//!   which is as tight for a single component. Data is opened later from the node's own fd
//!   through `/proc/self/fd` (the inode already held, no name re-resolved), after a type check.
//! - Elsewhere (macOS): `O_NOFOLLOW` opens of single components; special files are never
//!   opened at all (`fstatat` first; a node for them keeps only its parent and name), and a
//!   reopen by name is checked against the device and inode the node was made with.
//! - A read-only share refuses every mutating request here, on the host side, with EROFS.
//! - Device nodes cannot be created, and no special file is ever opened for data.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::AtomicBool;
#[cfg(any(target_os = "linux", test))]
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::linux_abi::{self, errno, mode as lmode};

/// Longest name accepted (Linux NAME_MAX).
pub const NAME_MAX: usize = 255;

/// Why a request on the share failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("name {0:?} is not a single path component")]
    BadName(String),
    #[error("name of {0} bytes is too long")]
    NameTooLong(usize),
    #[error("the share is read-only")]
    ReadOnly,
    #[error("{op} refused on a special file (mode {mode:o})")]
    Special { op: &'static str, mode: u32 },
    #[error("device nodes cannot be created (mode {0:o})")]
    DeviceNode(u32),
    #[error("{0:?} changed on the host since it was looked up")]
    Stale(String),
    #[error("{op} {name:?}: {err}")]
    Os {
        op: &'static str,
        name: String,
        err: io::Error,
    },
}

impl FsError {
    /// The Linux errno the guest receives.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::BadName(_) => errno::EINVAL,
            FsError::NameTooLong(_) => errno::ENAMETOOLONG,
            FsError::ReadOnly => errno::EROFS,
            FsError::Special { .. } => errno::ENXIO,
            FsError::DeviceNode(_) => errno::EPERM,
            FsError::Stale(_) => errno::ESTALE,
            FsError::Os { err, .. } => {
                linux_abi::to_linux_errno(err.raw_os_error().unwrap_or(libc::EIO))
            }
        }
    }

    fn os(op: &'static str, name: &CStr) -> FsError {
        FsError::Os {
            op,
            name: name.to_string_lossy().into_owned(),
            err: io::Error::last_os_error(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// What kind of file a node is, fixed when it was looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// FIFO, socket, character or block device: listed and stat'ed, never opened.
    Special,
}

impl Kind {
    fn of(st_mode: u32) -> Kind {
        match st_mode & lmode::S_IFMT {
            lmode::S_IFDIR => Kind::Dir,
            lmode::S_IFREG => Kind::File,
            lmode::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// A file inside the share.
#[derive(Debug)]
pub struct Node {
    /// Linux: an O_PATH fd. macOS: an O_EVTONLY fd (files), O_RDONLY (directories),
    /// O_SYMLINK (links), or none for special files.
    fd: Option<OwnedFd>,
    /// The directory this node was reached from (None for the root): `..`, and on hosts
    /// without `/proc` the anchor of reopen-by-name.
    parent: Option<Arc<Node>>,
    name: CString,
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
}

impl Node {
    pub fn is_root(&self) -> bool {
        self.parent.is_none()
    }

    /// The fd to use as a `*at` directory argument or for `fstat`.
    fn raw(&self) -> Option<RawFd> {
        self.fd.as_ref().map(|fd| fd.as_raw_fd())
    }

    /// The node's name in its parent (empty for the root).
    pub fn name(&self) -> &CStr {
        &self.name
    }
}

/// File attributes, in Linux terms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attr {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Attr {
    fn from_stat(st: &libc::stat) -> Attr {
        #[cfg(target_os = "linux")]
        let (atime, mtime, ctime) = (
            (st.st_atime, st.st_atime_nsec),
            (st.st_mtime, st.st_mtime_nsec),
            (st.st_ctime, st.st_ctime_nsec),
        );
        #[cfg(not(target_os = "linux"))]
        let (atime, mtime, ctime) = (
            (st.st_atime, st.st_atime_nsec),
            (st.st_mtime, st.st_mtime_nsec),
            (st.st_ctime, st.st_ctime_nsec),
        );
        #[allow(clippy::unnecessary_cast)]
        Attr {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            mode: linux_abi::linux_mode(st.st_mode as u32),
            nlink: st.st_nlink as u64,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u64,
            size: st.st_size as u64,
            blksize: st.st_blksize as u64,
            blocks: st.st_blocks as u64,
            atime: (atime.0 as i64, atime.1 as i64),
            mtime: (mtime.0 as i64, mtime.1 as i64),
            ctime: (ctime.0 as i64, ctime.1 as i64),
        }
    }
}

/// File-system statistics, in Linux `statfs` terms.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsStat {
    /// Preferred I/O size (`f_bsize`).
    pub bsize: u64,
    /// The unit of the block counts (`f_frsize`): equal to `bsize` on Linux, not on macOS,
    /// where `f_bsize` is a 1 MiB I/O size and the blocks are 4 KiB.
    pub frsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub namelen: u64,
    pub fsid: u64,
}

/// A time to set: leave it, set it to now, or to a given (seconds, nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Keep,
    Now,
    At(i64, i64),
}

/// Attribute changes requested together (9P setattr, FUSE SETATTR).
#[derive(Debug, Clone, Copy)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: SetTime,
    pub mtime: SetTime,
}

impl Default for SetAttr {
    fn default() -> Self {
        SetAttr {
            mode: None,
            uid: None,
            gid: None,
            size: None,
            atime: SetTime::Keep,
            mtime: SetTime::Keep,
        }
    }
}

/// A shared directory and the rules for reaching into it.
#[derive(Debug)]
pub struct Share {
    root: Arc<Node>,
    read_only: bool,
    /// Cleared the first time openat2 reports ENOSYS (kernels before 5.6). Only Linux has it.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    use_openat2: AtomicBool,
    /// `/proc/self/fd`, for reopening a node's inode without resolving its name again.
    proc_fd: Option<OwnedFd>,
}

fn cstring(name: &[u8]) -> Result<CString> {
    CString::new(name).map_err(|_| FsError::BadName(String::from_utf8_lossy(name).into_owned()))
}

/// Permission bits a guest may set. Set-user-ID never reaches the host (a guest-made
/// set-uid binary in the share would be a way up for host users); set-group-ID only on
/// directories, where it means group inheritance.
pub fn safe_mode(mode: u32, dir: bool) -> u32 {
    #[allow(clippy::unnecessary_cast)] // mode_t is u16 on macOS
    let mut m = mode & 0o7777 & !(libc::S_ISUID as u32);
    if !dir {
        #[allow(clippy::unnecessary_cast)]
        {
            m &= !(libc::S_ISGID as u32);
        }
    }
    m
}

/// Checks that a guest-supplied name is one path component and not `.` or `..`.
pub fn check_name(name: &[u8]) -> Result<CString> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong(name.len()));
    }
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(FsError::BadName(String::from_utf8_lossy(name).into_owned()));
    }
    cstring(name)
}

fn fstat_fd(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: `st` is plain data, fully written by fstat on success; fd is a valid descriptor
    // the caller owns for the duration of the call.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn fstatat_nofollow(dir: RawFd, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: as fstat_fd; `name` is NUL-terminated and AT_SYMLINK_NOFOLLOW keeps it from
    // following a link.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }
}

/// Takes ownership of a descriptor a libc call just returned.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: callers pass only a fresh, valid descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(target_os = "linux")]
fn openat2_beneath(dir: RawFd, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; all-zero is its "no flags" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS;
    // SAFETY: `how` is a valid open_how of the size passed; `name` is NUL-terminated.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(owned(fd as RawFd))
}

impl Share {
    /// Opens `dir` as a share. The operator's path is trusted (it may itself be a symlink);
    /// nothing the guest sends is.
    pub fn new(dir: &Path, read_only: bool) -> Result<Share> {
        use std::os::unix::ffi::OsStrExt;
        let path = cstring(dir.as_os_str().as_bytes())?;
        #[cfg(target_os = "linux")]
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
        #[cfg(not(target_os = "linux"))]
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        // SAFETY: `path` is NUL-terminated; the result is checked.
        let fd = unsafe { libc::open(path.as_ptr(), flags) };
        if fd < 0 {
            return Err(FsError::os("open share", &path));
        }
        let fd = owned(fd);
        let st = fstat_fd(fd.as_raw_fd()).map_err(|err| FsError::Os {
            op: "stat share",
            name: dir.display().to_string(),
            err,
        })?;
        #[allow(clippy::unnecessary_cast)]
        let root = Arc::new(Node {
            fd: Some(fd),
            parent: None,
            name: CString::default(),
            kind: Kind::Dir,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        });
        Ok(Share {
            root,
            read_only,
            use_openat2: AtomicBool::new(cfg!(target_os = "linux")),
            proc_fd: Self::open_proc_fd(),
        })
    }

    #[cfg(target_os = "linux")]
    fn open_proc_fd() -> Option<OwnedFd> {
        // SAFETY: constant NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/proc/self/fd".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        (fd >= 0).then(|| owned(fd))
    }

    #[cfg(not(target_os = "linux"))]
    fn open_proc_fd() -> Option<OwnedFd> {
        None
    }

    /// Tests only: behave as a kernel without openat2 / without /proc.
    #[cfg(test)]
    pub(crate) fn force_fallbacks(&mut self, no_openat2: bool, no_proc: bool) {
        if no_openat2 {
            self.use_openat2.store(false, Ordering::Relaxed);
        }
        if no_proc {
            self.proc_fd = None;
        }
    }

    pub fn root(&self) -> Arc<Node> {
        self.root.clone()
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(FsError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn dir_fd(&self, dir: &Node) -> Result<RawFd> {
        if dir.kind != Kind::Dir {
            return Err(FsError::Os {
                op: "lookup",
                name: dir.name.to_string_lossy().into_owned(),
                err: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        dir.raw()
            .ok_or_else(|| FsError::Stale(dir.name.to_string_lossy().into_owned()))
    }

    /// One step of a walk: `name` in `dir`, or `..` (the parent, the root's being itself).
    pub fn lookup(&self, dir: &Arc<Node>, name: &[u8]) -> Result<Arc<Node>> {
        if name == b".." {
            return Ok(dir.parent.clone().unwrap_or_else(|| dir.clone()));
        }
        let cname = check_name(name)?;
        let dirfd = self.dir_fd(dir)?;
        self.lookup_at(dir, dirfd, cname).map(Arc::new)
    }

    #[cfg(target_os = "linux")]
    fn lookup_at(&self, dir: &Arc<Node>, dirfd: RawFd, name: CString) -> Result<Node> {
        let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        let fd = loop {
            if self.use_openat2.load(Ordering::Relaxed) {
                match openat2_beneath(dirfd, &name, flags) {
                    Ok(fd) => break fd,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                        self.use_openat2.store(false, Ordering::Relaxed);
                        continue;
                    }
                    Err(err) => {
                        return Err(FsError::Os {
                            op: "lookup",
                            name: name.to_string_lossy().into_owned(),
                            err,
                        })
                    }
                }
            }
            // SAFETY: `name` is one checked component; O_NOFOLLOW|O_PATH never follows a
            // trailing link nor opens a device.
            let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags) };
            if fd < 0 {
                return Err(FsError::os("lookup", &name));
            }
            break owned(fd);
        };
        let st = fstat_fd(fd.as_raw_fd()).map_err(|err| FsError::Os {
            op: "stat",
            name: name.to_string_lossy().into_owned(),
            err,
        })?;
        Ok(Self::node(Some(fd), dir, name, &st))
    }

    #[cfg(not(target_os = "linux"))]
    fn lookup_at(&self, dir: &Arc<Node>, dirfd: RawFd, name: CString) -> Result<Node> {
        let before = fstatat_nofollow(dirfd, &name).map_err(|err| FsError::Os {
            op: "lookup",
            name: name.to_string_lossy().into_owned(),
            err,
        })?;
        let flags = match Kind::of(before.st_mode as u32) {
            Kind::Dir => libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            Kind::File => libc::O_EVTONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            Kind::Symlink => libc::O_SYMLINK | libc::O_EVTONLY,
            // Opening a device or FIFO can have effects of its own: name it only.
            Kind::Special => return Ok(Self::node(None, dir, name, &before)),
        };
        // SAFETY: one checked component, never following a link (O_NOFOLLOW / O_SYMLINK).
        let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(FsError::os("lookup", &name));
        }
        let fd = owned(fd);
        let st = fstat_fd(fd.as_raw_fd()).map_err(|err| FsError::Os {
            op: "stat",
            name: name.to_string_lossy().into_owned(),
            err,
        })?;
        if st.st_ino != before.st_ino || st.st_dev != before.st_dev {
            return Err(FsError::Stale(name.to_string_lossy().into_owned()));
        }
        Ok(Self::node(Some(fd), dir, name, &st))
    }

    #[allow(clippy::unnecessary_cast)]
    fn node(fd: Option<OwnedFd>, parent: &Arc<Node>, name: CString, st: &libc::stat) -> Node {
        Node {
            fd,
            parent: Some(parent.clone()),
            name,
            kind: Kind::of(st.st_mode as u32),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        }
    }

    /// The node's current attributes.
    pub fn getattr(&self, node: &Node) -> Result<Attr> {
        let st = match (node.raw(), &node.parent) {
            (Some(fd), _) => fstat_fd(fd),
            (None, Some(parent)) => fstatat_nofollow(self.dir_fd(parent)?, &node.name),
            (None, None) => return Err(FsError::Stale("/".into())),
        }
        .map_err(|err| FsError::Os {
            op: "stat",
            name: node.name.to_string_lossy().into_owned(),
            err,
        })?;
        Ok(Attr::from_stat(&st))
    }

    /// Opens a regular file or directory for I/O with host `flags` (from
    /// [`linux_abi::host_open_flags`]); everything else is refused.
    pub fn open(&self, node: &Node, flags: i32) -> Result<OwnedFd> {
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if writes {
            self.writable()?;
        }
        let flags = match node.kind {
            Kind::File => flags,
            Kind::Dir if !writes => libc::O_RDONLY | libc::O_DIRECTORY,
            Kind::Dir => return Err(Self::errno_err("open", node, libc::EISDIR)),
            Kind::Symlink => return Err(Self::errno_err("open", node, libc::ELOOP)),
            Kind::Special => {
                return Err(FsError::Special {
                    op: "open",
                    mode: self.getattr(node)?.mode,
                })
            }
        };
        let fd = self.reopen(node, flags)?;
        // The inode is the one looked up; check its type once more anyway (cheap, and it is
        // the last line before data flows).
        let st = fstat_fd(fd.as_raw_fd()).map_err(|err| FsError::Os {
            op: "stat",
            name: node.name.to_string_lossy().into_owned(),
            err,
        })?;
        #[allow(clippy::unnecessary_cast)]
        if Kind::of(st.st_mode as u32) != node.kind {
            return Err(FsError::Stale(node.name.to_string_lossy().into_owned()));
        }
        Ok(fd)
    }

    fn errno_err(op: &'static str, node: &Node, errno: i32) -> FsError {
        FsError::Os {
            op,
            name: node.name.to_string_lossy().into_owned(),
            err: io::Error::from_raw_os_error(errno),
        }
    }

    /// A new descriptor for the node's inode, opened with `flags`.
    fn reopen(&self, node: &Node, flags: i32) -> Result<OwnedFd> {
        let flags = flags & !(libc::O_CREAT | libc::O_EXCL);
        if let (Some(proc_fd), Some(fd)) = (&self.proc_fd, node.raw()) {
            #[cfg(target_os = "linux")]
            if node.kind != Kind::Symlink {
                let name = CString::new(fd.to_string()).expect("digits have no NUL");
                // SAFETY: opens the magic link of a descriptor we hold: the same inode, no
                // guest-controlled name involved.
                let new = unsafe {
                    libc::openat(proc_fd.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC)
                };
                if new < 0 {
                    return Err(FsError::os("open", &node.name));
                }
                return Ok(owned(new));
            }
            let _ = (proc_fd, fd);
        }
        // No /proc: by name from the parent, never following a link, without blocking on a
        // FIFO swapped in, then checked to be the inode we looked up.
        let (dirfd, name) = match &node.parent {
            Some(parent) => (self.dir_fd(parent)?, node.name.as_c_str()),
            None => (node.raw().ok_or_else(|| FsError::Stale("/".into()))?, c"."),
        };
        // SAFETY: a checked single component (or "."), O_NOFOLLOW.
        let fd = unsafe {
            libc::openat(
                dirfd,
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(FsError::os("open", name));
        }
        let fd = owned(fd);
        let st = fstat_fd(fd.as_raw_fd()).map_err(|err| FsError::Os {
            op: "stat",
            name: name.to_string_lossy().into_owned(),
            err,
        })?;
        #[allow(clippy::unnecessary_cast)]
        if st.st_ino as u64 != node.ino || st.st_dev as u64 != node.dev {
            return Err(FsError::Stale(node.name.to_string_lossy().into_owned()));
        }
        if flags & libc::O_NONBLOCK == 0 {
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(fd)
    }

    /// Creates and opens a new regular file. It never opens an existing one (O_EXCL): a name
    /// that appeared in between, link or device, gets EEXIST instead.
    pub fn create(
        &self,
        dir: &Arc<Node>,
        name: &[u8],
        flags: i32,
        mode: u32,
    ) -> Result<(Arc<Node>, OwnedFd)> {
        self.writable()?;
        let cname = check_name(name)?;
        let dirfd = self.dir_fd(dir)?;
        let flags = (flags & !(libc::O_TRUNC))
            | libc::O_CREAT
            | libc::O_EXCL
            | libc::O_NOFOLLOW
            | libc::O_CLOEXEC;
        // SAFETY: one checked component; O_EXCL|O_NOFOLLOW only ever makes a new file.
        let fd = unsafe {
            libc::openat(
                dirfd,
                cname.as_ptr(),
                flags,
                safe_mode(mode, false) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(FsError::os("create", &cname));
        }
        let fd = owned(fd);
        let st = fstat_fd(fd.as_raw_fd()).map_err(|err| FsError::Os {
            op: "stat",
            name: cname.to_string_lossy().into_owned(),
            err,
        })?;
        // The node holds its own descriptor of the same inode (no second name resolution).
        let node_fd = fd.try_clone().map_err(|err| FsError::Os {
            op: "dup",
            name: cname.to_string_lossy().into_owned(),
            err,
        })?;
        Ok((Arc::new(Self::node(Some(node_fd), dir, cname, &st)), fd))
    }

    pub fn mkdir(&self, dir: &Arc<Node>, name: &[u8], mode: u32) -> Result<Arc<Node>> {
        self.writable()?;
        let cname = check_name(name)?;
        let dirfd = self.dir_fd(dir)?;
        // SAFETY: one checked component.
        if unsafe { libc::mkdirat(dirfd, cname.as_ptr(), safe_mode(mode, true) as libc::mode_t) }
            != 0
        {
            return Err(FsError::os("mkdir", &cname));
        }
        self.lookup(dir, name)
    }

    /// Creates a symbolic link. Its target is stored, never resolved by the host.
    pub fn symlink(&self, dir: &Arc<Node>, name: &[u8], target: &[u8]) -> Result<Arc<Node>> {
        self.writable()?;
        let cname = check_name(name)?;
        let ctarget = cstring(target)?;
        let dirfd = self.dir_fd(dir)?;
        // SAFETY: NUL-terminated strings; the target is only stored.
        if unsafe { libc::symlinkat(ctarget.as_ptr(), dirfd, cname.as_ptr()) } != 0 {
            return Err(FsError::os("symlink", &cname));
        }
        self.lookup(dir, name)
    }

    /// Creates a regular file, FIFO or socket node. Device nodes are refused.
    pub fn mknod(&self, dir: &Arc<Node>, name: &[u8], mode: u32) -> Result<Arc<Node>> {
        self.writable()?;
        let cname = check_name(name)?;
        let ftype = mode & lmode::S_IFMT;
        let host_type = match ftype {
            0 | lmode::S_IFREG => libc::S_IFREG,
            lmode::S_IFIFO => libc::S_IFIFO,
            lmode::S_IFSOCK => libc::S_IFSOCK,
            _ => return Err(FsError::DeviceNode(mode)),
        };
        let dirfd = self.dir_fd(dir)?;
        // SAFETY: one checked component, no device number.
        if unsafe {
            libc::mknodat(
                dirfd,
                cname.as_ptr(),
                host_type | safe_mode(mode, false) as libc::mode_t,
                0,
            )
        } != 0
        {
            return Err(FsError::os("mknod", &cname));
        }
        self.lookup(dir, name)
    }

    /// A new hard link `name` in `dir` to `node` (not a directory).
    pub fn link(&self, node: &Node, dir: &Arc<Node>, name: &[u8]) -> Result<Arc<Node>> {
        self.writable()?;
        if node.kind == Kind::Dir {
            return Err(Self::errno_err("link", node, libc::EPERM));
        }
        let cname = check_name(name)?;
        let dirfd = self.dir_fd(dir)?;
        let rc = match (&self.proc_fd, node.raw()) {
            (Some(proc_fd), Some(fd)) => {
                let num = CString::new(fd.to_string()).expect("digits have no NUL");
                // SAFETY: the magic link of a descriptor we hold names exactly its inode.
                unsafe {
                    libc::linkat(
                        proc_fd.as_raw_fd(),
                        num.as_ptr(),
                        dirfd,
                        cname.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                }
            }
            _ => {
                let parent = node
                    .parent
                    .as_ref()
                    .ok_or_else(|| Self::errno_err("link", node, libc::EPERM))?;
                let pfd = self.dir_fd(parent)?;
                let st = fstatat_nofollow(pfd, &node.name).map_err(|err| FsError::Os {
                    op: "link",
                    name: node.name.to_string_lossy().into_owned(),
                    err,
                })?;
                #[allow(clippy::unnecessary_cast)]
                if st.st_ino as u64 != node.ino {
                    return Err(FsError::Stale(node.name.to_string_lossy().into_owned()));
                }
                // SAFETY: checked components; flags 0 never follows a link.
                unsafe { libc::linkat(pfd, node.name.as_ptr(), dirfd, cname.as_ptr(), 0) }
            }
        };
        if rc != 0 {
            return Err(FsError::os("link", &cname));
        }
        self.lookup(dir, name)
    }

    /// Renames within the share, across directories too.
    pub fn rename(&self, old_dir: &Node, old: &[u8], new_dir: &Node, new: &[u8]) -> Result<()> {
        self.writable()?;
        let cold = check_name(old)?;
        let cnew = check_name(new)?;
        let (ofd, nfd) = (self.dir_fd(old_dir)?, self.dir_fd(new_dir)?);
        // SAFETY: checked single components relative to directories inside the share.
        if unsafe { libc::renameat(ofd, cold.as_ptr(), nfd, cnew.as_ptr()) } != 0 {
            return Err(FsError::os("rename", &cold));
        }
        Ok(())
    }

    /// Removes a name; `dir_only` is rmdir.
    pub fn unlink(&self, dir: &Node, name: &[u8], dir_only: bool) -> Result<()> {
        self.writable()?;
        let cname = check_name(name)?;
        let dirfd = self.dir_fd(dir)?;
        let flags = if dir_only { libc::AT_REMOVEDIR } else { 0 };
        // SAFETY: a checked single component.
        if unsafe { libc::unlinkat(dirfd, cname.as_ptr(), flags) } != 0 {
            return Err(FsError::os("unlink", &cname));
        }
        Ok(())
    }

    /// The target of a symbolic link, as stored.
    pub fn readlink(&self, node: &Node) -> Result<Vec<u8>> {
        if node.kind != Kind::Symlink {
            return Err(Self::errno_err("readlink", node, libc::EINVAL));
        }
        let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
        #[cfg(target_os = "linux")]
        let (dirfd, name) = (
            node.raw()
                .ok_or_else(|| FsError::Stale(node.name.to_string_lossy().into_owned()))?,
            c"",
        );
        #[cfg(not(target_os = "linux"))]
        let (dirfd, name) = match &node.parent {
            Some(parent) => (self.dir_fd(parent)?, node.name.as_c_str()),
            None => return Err(Self::errno_err("readlink", node, libc::EINVAL)),
        };
        // SAFETY: `buf` has the length passed; an empty name with an O_PATH fd reads that link.
        let n =
            unsafe { libc::readlinkat(dirfd, name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(FsError::os("readlink", &node.name));
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Changes attributes. Mode and times of a symbolic link are left alone (Linux has none
    /// to change); truncation opens the file for writing first.
    pub fn setattr(&self, node: &Node, attr: &SetAttr) -> Result<()> {
        self.writable()?;
        if let Some(size) = attr.size {
            let fd = self.open(node, libc::O_WRONLY)?;
            // SAFETY: ftruncate on a descriptor we own.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
                return Err(FsError::os("truncate", &node.name));
            }
        }
        if attr.uid.is_some() || attr.gid.is_some() {
            let uid = attr.uid.unwrap_or(u32::MAX);
            let gid = attr.gid.unwrap_or(u32::MAX);
            self.at_node(node, "chown", |dirfd, name, nofollow| {
                // SAFETY: see at_node; -1 leaves an id unchanged.
                unsafe { libc::fchownat(dirfd, name.as_ptr(), uid, gid, nofollow) }
            })?;
        }
        if node.kind == Kind::Symlink || node.kind == Kind::Special {
            return Ok(());
        }
        if let Some(mode) = attr.mode {
            let mode = safe_mode(mode, node.kind == Kind::Dir);
            self.at_node(node, "chmod", |dirfd, name, _| {
                // SAFETY: see at_node; the node is not a symlink, so following is moot.
                unsafe { libc::fchmodat(dirfd, name.as_ptr(), mode as libc::mode_t, 0) }
            })?;
        }
        if attr.atime != SetTime::Keep || attr.mtime != SetTime::Keep {
            let ts = |t: SetTime| match t {
                SetTime::Keep => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_OMIT,
                },
                SetTime::Now => libc::timespec {
                    tv_sec: 0,
                    tv_nsec: libc::UTIME_NOW,
                },
                SetTime::At(s, ns) => libc::timespec {
                    tv_sec: s as libc::time_t,
                    tv_nsec: ns.clamp(0, 999_999_999) as _,
                },
            };
            let times = [ts(attr.atime), ts(attr.mtime)];
            self.at_node(node, "utimes", |dirfd, name, _| {
                // SAFETY: see at_node; `times` holds two timespecs.
                unsafe { libc::utimensat(dirfd, name.as_ptr(), times.as_ptr(), 0) }
            })?;
        }
        Ok(())
    }

    /// Runs a `*at` call on the node itself: through `/proc/self/fd/N` (the held inode) where
    /// there is one, else by name from its parent with AT_SYMLINK_NOFOLLOW where the call
    /// takes it.
    fn at_node(
        &self,
        node: &Node,
        op: &'static str,
        call: impl Fn(RawFd, &CStr, i32) -> i32,
    ) -> Result<()> {
        #[cfg(target_os = "linux")]
        if node.kind == Kind::Symlink && op == "chown" {
            if let Some(fd) = node.raw() {
                // chown of a link itself: AT_EMPTY_PATH on the O_PATH fd.
                return match call(fd, c"", libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW) {
                    0 => Ok(()),
                    _ => Err(FsError::os(op, &node.name)),
                };
            }
        }
        let rc = match (&self.proc_fd, node.raw()) {
            (Some(proc_fd), Some(fd)) if node.kind != Kind::Symlink => {
                let num = CString::new(fd.to_string()).expect("digits have no NUL");
                call(proc_fd.as_raw_fd(), &num, 0)
            }
            _ => match &node.parent {
                Some(parent) => call(self.dir_fd(parent)?, &node.name, libc::AT_SYMLINK_NOFOLLOW),
                None => call(self.dir_fd(node)?, c".", 0),
            },
        };
        if rc != 0 {
            return Err(FsError::os(op, &node.name));
        }
        Ok(())
    }

    /// Statistics of the file system holding the node.
    pub fn statfs(&self, node: &Node) -> Result<FsStat> {
        let fd = match node.raw() {
            Some(fd) => fd,
            None => self.root.raw().ok_or_else(|| FsError::Stale("/".into()))?,
        };
        // SAFETY: `st` is plain data written by fstatvfs on success.
        let st = unsafe {
            let mut st: libc::statvfs = std::mem::zeroed();
            if libc::fstatvfs(fd, &mut st) != 0 {
                return Err(FsError::os("statfs", &node.name));
            }
            st
        };
        #[allow(clippy::unnecessary_cast)]
        Ok(FsStat {
            bsize: st.f_bsize as u64,
            frsize: st.f_frsize as u64,
            blocks: st.f_blocks as u64,
            bfree: st.f_bfree as u64,
            bavail: st.f_bavail as u64,
            files: st.f_files as u64,
            ffree: st.f_ffree as u64,
            namelen: NAME_MAX as u64,
            fsid: st.f_fsid as u64,
        })
    }

    /// Every entry of a directory (without `.` and `..`), with inode and Linux type bits.
    pub fn read_dir(&self, dir: &Node) -> Result<Vec<DirEntry>> {
        let fd = self.open(dir, libc::O_RDONLY)?;
        read_dir_fd(fd, &dir.name)
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    /// Linux `DT_*` value.
    pub dtype: u8,
}

fn read_dir_fd(fd: OwnedFd, name: &CStr) -> Result<Vec<DirEntry>> {
    use std::os::fd::IntoRawFd;
    let raw = fd.into_raw_fd();
    // SAFETY: fdopendir takes ownership of `raw` on success; on failure we still own it.
    let dirp = unsafe { libc::fdopendir(raw) };
    if dirp.is_null() {
        let err = FsError::os("readdir", name);
        drop(owned(raw));
        return Err(err);
    }
    let mut out = Vec::new();
    loop {
        // SAFETY: `dirp` is a valid DIR*; the entry is copied out before the next call.
        let ent = unsafe { libc::readdir(dirp) };
        if ent.is_null() {
            break;
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let (bytes, ino, dtype) = unsafe {
            let e = &*ent;
            (
                CStr::from_ptr(e.d_name.as_ptr()).to_bytes().to_vec(),
                e.d_ino,
                e.d_type,
            )
        };
        if bytes == b"." || bytes == b".." {
            continue;
        }
        #[allow(clippy::unnecessary_cast)]
        out.push(DirEntry {
            name: bytes,
            ino: ino as u64,
            dtype,
        });
    }
    // SAFETY: closes the DIR (and its descriptor) we opened.
    unsafe { libc::closedir(dirp) };
    Ok(out)
}

#[cfg(test)]
#[path = "sandbox_tests.rs"]
mod tests;
