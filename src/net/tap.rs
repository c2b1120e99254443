//! Linux tap interfaces (`virtio-tap,tapN`): Ethernet frames in and out of the host kernel.
//!
//! Opening `/dev/net/tun` with `TUNSETIFF` attaches to an existing (persistent) tap of that
//! name, or creates one that lives as long as xhyve keeps it open (creating needs
//! CAP_NET_ADMIN). The descriptor is non-blocking: the network thread waits in epoll, never
//! in a read or write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{valid_interface_name, NetBackend};

const TUN_DEVICE: &str = "/dev/net/tun";
/// IFNAMSIZ, counting the terminating NUL.
const IFNAMSIZ: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name \"{0}\": 1-15 letters, digits, '-', '_' or '.'")]
    BadName(String),
    #[error("cannot open {TUN_DEVICE}: {0}")]
    Open(io::Error),
    #[error("cannot attach tap \"{name}\": {err} (creating a tap needs root or CAP_NET_ADMIN; or create it first with `ip tuntap add {name} mode tap`)")]
    Attach { name: String, err: io::Error },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) the tap interface `name`, without packet information headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_interface_name(name) {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::Open)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open tun descriptor and `req` a live, properly laid out ifreq
        // that the kernel reads and writes within its 40 bytes.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
        if rc != 0 {
            return Err(TapError::Attach {
                name: name.into(),
                err: io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // The interface is down or its queue is full: the frame is lost, as on a wire.
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kernel_limits() {
        assert!(valid_interface_name("tap0"));
        assert!(valid_interface_name("xh-tap_1.2"));
        assert!(valid_interface_name("a23456789012345"));
        assert!(!valid_interface_name("a234567890123456"));
        assert!(!valid_interface_name(""));
        assert!(!valid_interface_name("tap/0"));
        assert!(!valid_interface_name("tap 0"));
        assert_eq!(
            Tap::open("bad/name").unwrap_err().to_string(),
            "invalid tap name \"bad/name\": 1-15 letters, digits, '-', '_' or '.'"
        );
    }

    #[test]
    fn ifreq_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
