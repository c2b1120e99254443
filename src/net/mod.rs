//! Network back ends for the virtio-net device: tap interfaces on Linux, vmnet on macOS, the
//! built-in user-mode network (libslirp), network daemons over Unix sockets, and the MAC
//! address rule.

pub mod dhcp;
pub mod mac;
pub mod options;
pub mod packet;
pub mod slirp;
pub mod socket;
#[cfg(target_os = "linux")]
pub mod tap;
/// Compiled everywhere: its portable helpers are tested on Linux; the framework calls are
/// macOS-only inside.
pub mod vmnet;

pub use mac::{derive_mac, MacAddr, MacError};
pub use options::{NetOptions, NetOptionsError, TapOptions};

/// Whether `name` can name a host network interface: the kernel's 15-byte limit, and only
/// characters that need no quoting in scripts.
pub fn valid_interface_name(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A source and sink of Ethernet frames (without any virtio header).
pub trait NetBackend: Send {
    /// Sends one frame. A full host queue drops it, as a cable would.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()>;
    /// Receives one frame into `buf`, returning its length, or `WouldBlock` when none waits.
    /// A frame longer than `buf` is truncated.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
}
