//! Shared folders: the confinement layer every file server stands on ([`sandbox`]), the
//! Linux ABI values both protocols carry ([`linux_abi`]), and the protocol servers, which
//! work on byte buffers and know nothing of virtqueues.

pub mod linux_abi;
pub mod p9;
pub mod sandbox;
