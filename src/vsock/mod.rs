//! virtio-vsock with HyperKit's host side: guest streams become Unix sockets in a directory
//! (naming documented in [`muxer`]). [`packet`] is the wire header; [`muxer`] the connection
//! state machine and credit accounting, independent of virtqueues.

pub mod fuzz;
pub mod muxer;
pub mod packet;

pub use muxer::{Muxer, VsockConfig, VsockError};
