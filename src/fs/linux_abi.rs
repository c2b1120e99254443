//! The guest's file-system ABI is Linux's whatever the host is: 9P2000.L and FUSE carry Linux
//! errno values, Linux `O_*` open flags and Linux mode bits. On a Linux host they are the
//! host's own; on macOS several differ, so every value crossing the boundary goes through here.

/// Linux errno values the servers send.
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const ENXIO: i32 = 6;
    pub const E2BIG: i32 = 7;
    pub const EBADF: i32 = 9;
    pub const EAGAIN: i32 = 11;
    pub const ENOMEM: i32 = 12;
    pub const EACCES: i32 = 13;
    pub const EFAULT: i32 = 14;
    pub const EBUSY: i32 = 16;
    pub const EEXIST: i32 = 17;
    pub const EXDEV: i32 = 18;
    pub const ENODEV: i32 = 19;
    pub const ENOTDIR: i32 = 20;
    pub const EISDIR: i32 = 21;
    pub const EINVAL: i32 = 22;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const ESPIPE: i32 = 29;
    pub const EROFS: i32 = 30;
    pub const EMLINK: i32 = 31;
    pub const ERANGE: i32 = 34;
    pub const ENAMETOOLONG: i32 = 36;
    pub const ENOSYS: i32 = 38;
    pub const ENOTEMPTY: i32 = 39;
    pub const ELOOP: i32 = 40;
    pub const ENODATA: i32 = 61;
    pub const EOPNOTSUPP: i32 = 95;
    pub const EDQUOT: i32 = 122;
    pub const ESTALE: i32 = 116;
    pub const ENOTSUP: i32 = EOPNOTSUPP;
}

/// Linux open(2) flags as the guest sends them (x86 values).
pub mod oflag {
    pub const O_ACCMODE: u32 = 0o3;
    pub const O_RDONLY: u32 = 0;
    pub const O_WRONLY: u32 = 0o1;
    pub const O_RDWR: u32 = 0o2;
    pub const O_CREAT: u32 = 0o100;
    pub const O_EXCL: u32 = 0o200;
    pub const O_NOCTTY: u32 = 0o400;
    pub const O_TRUNC: u32 = 0o1000;
    pub const O_APPEND: u32 = 0o2000;
    pub const O_NONBLOCK: u32 = 0o4000;
    pub const O_DSYNC: u32 = 0o10000;
    pub const O_DIRECT: u32 = 0o40000;
    pub const O_LARGEFILE: u32 = 0o100000;
    pub const O_DIRECTORY: u32 = 0o200000;
    pub const O_NOFOLLOW: u32 = 0o400000;
    pub const O_NOATIME: u32 = 0o1000000;
    pub const O_CLOEXEC: u32 = 0o2000000;
    pub const O_SYNC: u32 = 0o4010000;
    pub const O_PATH: u32 = 0o10000000;
}

/// Linux file type bits of `st_mode`.
pub mod mode {
    pub const S_IFMT: u32 = 0o170000;
    pub const S_IFSOCK: u32 = 0o140000;
    pub const S_IFLNK: u32 = 0o120000;
    pub const S_IFREG: u32 = 0o100000;
    pub const S_IFBLK: u32 = 0o060000;
    pub const S_IFDIR: u32 = 0o040000;
    pub const S_IFCHR: u32 = 0o020000;
    pub const S_IFIFO: u32 = 0o010000;
}

/// A host errno as the Linux value the guest understands. Unknown values become EIO rather
/// than a number that means something else in the guest.
pub fn to_linux_errno(host: i32) -> i32 {
    #[cfg(target_os = "linux")]
    {
        host
    }
    #[cfg(not(target_os = "linux"))]
    {
        use errno::*;
        // The values 1..=34 are the same on BSD-derived hosts except EAGAIN (35 there).
        match host {
            1..=34 if host != 11 => host,
            libc::EAGAIN => EAGAIN,
            libc::ENAMETOOLONG => ENAMETOOLONG,
            libc::ENOSYS => ENOSYS,
            libc::ENOTEMPTY => ENOTEMPTY,
            libc::ELOOP => ELOOP,
            libc::ENOATTR => ENODATA,
            libc::EOPNOTSUPP => EOPNOTSUPP,
            libc::ENOTSUP => EOPNOTSUPP,
            libc::EDQUOT => EDQUOT,
            libc::ESTALE => ESTALE,
            _ => EIO,
        }
    }
}

/// The access mode and the flags a guest may ask for, as host `open(2)` flags. Everything that
/// changes how a name resolves (O_CREAT, O_PATH, O_NOFOLLOW, O_DIRECTORY) or touches the
/// host's terminal state is dropped here: the sandbox decides those itself.
pub fn host_open_flags(linux: u32) -> i32 {
    use oflag::*;
    let mut host = match linux & O_ACCMODE {
        O_WRONLY => libc::O_WRONLY,
        O_RDWR => libc::O_RDWR,
        _ => libc::O_RDONLY,
    };
    if linux & O_TRUNC != 0 {
        host |= libc::O_TRUNC;
    }
    if linux & O_APPEND != 0 {
        host |= libc::O_APPEND;
    }
    // 9P2000.L's P9_DOTL_SYNC is the one bit 0o4000000 (Linux's O_SYNC adds O_DSYNC to it).
    if linux & (O_SYNC & !O_DSYNC) != 0 {
        host |= libc::O_SYNC;
    } else if linux & O_DSYNC != 0 {
        host |= libc::O_DSYNC;
    }
    host
}

/// Whether Linux open flags ask to change the file (write access or truncation).
pub fn wants_write(linux: u32) -> bool {
    use oflag::*;
    linux & O_ACCMODE != O_RDONLY || linux & O_TRUNC != 0
}

/// A host `st_mode` as Linux mode bits (the permission bits are the same everywhere; the
/// type bits are too on every host we build for, but say so in one place).
pub fn linux_mode(host_mode: u32) -> u32 {
    host_mode
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_keep_access_and_drop_resolution_flags() {
        use oflag::*;
        assert_eq!(
            host_open_flags(O_RDWR | O_TRUNC) & libc::O_ACCMODE,
            libc::O_RDWR
        );
        assert_ne!(host_open_flags(O_RDWR | O_TRUNC) & libc::O_TRUNC, 0);
        let dangerous = O_CREAT | O_NOFOLLOW | O_PATH | O_DIRECTORY | O_NOCTTY | O_EXCL;
        assert_eq!(host_open_flags(dangerous), libc::O_RDONLY);
        assert!(wants_write(O_WRONLY));
        assert!(wants_write(O_RDONLY | O_TRUNC));
        assert!(!wants_write(O_RDONLY | O_DIRECTORY));
        assert_ne!(host_open_flags(0o4000000) & libc::O_SYNC, 0, "P9_DOTL_SYNC");
        assert_ne!(host_open_flags(O_SYNC) & libc::O_SYNC, 0);
        assert_eq!(host_open_flags(O_DSYNC) & libc::O_SYNC & !libc::O_DSYNC, 0);
    }

    #[test]
    fn errno_values_round_trip_on_this_host() {
        assert_eq!(to_linux_errno(libc::ENOTEMPTY), errno::ENOTEMPTY);
        assert_eq!(to_linux_errno(libc::ELOOP), errno::ELOOP);
        assert_eq!(to_linux_errno(libc::EROFS), errno::EROFS);
    }
}
