//! 9P2000.L, the protocol of Linux's `mount -t 9p -o trans=virtio,version=9p2000.L`: the wire
//! format ([`wire`]), the built-in server on the sandbox ([`server`]), and the forwarder to an
//! external server over a Unix socket, HyperKit's `virtio-9p,path=SOCKET` ([`forward`]).

pub mod forward;
pub mod server;
pub mod wire;

pub use server::{IdMapping, Options, Server};

#[cfg(test)]
pub(crate) mod tests;
