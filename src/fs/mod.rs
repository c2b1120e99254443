//! Shared folders: the confinement layer every file server stands on ([`sandbox`]), the
//! Linux ABI values both protocols carry ([`linux_abi`]), and the protocol servers, which
//! work on byte buffers and know nothing of virtqueues.

pub mod fuse;
pub mod fuzz;
pub mod linux_abi;
pub mod options;
pub mod p9;
pub mod sandbox;

/// How file owners look to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdMapping {
    /// Owners are the host's; new files get the guest's uid/gid when the VMM runs as root
    /// (otherwise they belong to the VMM's user).
    Passthrough,
    /// Every file appears owned by this uid/gid; ownership changes are accepted and ignored.
    Squash { uid: u32, gid: u32 },
}
