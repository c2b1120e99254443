//! Guest vsock streams as host Unix sockets, with HyperKit's naming (`pci_virtio_sock.c`), so
//! Docker for Mac-style tools find them where they expect. In the directory DIR given by
//! `path=DIR`, every name is `CID.PORT` in 8-digit lower-case hex:
//!
//! - **guest -> host**: a guest `connect(CID 2, port P)` makes the VMM connect to the Unix
//!   socket `DIR/00000002.PPPPPPPP`, which a host service listens on. None there: RST.
//! - **host -> guest, forwarded ports**: for each P in `guest_forwards=P1;P2`, the VMM listens
//!   on `DIR/GGGGGGGG.PPPPPPPP` (G = guest_cid), with a symlink `DIR/guest.PPPPPPPP` to it;
//!   each connection there becomes a guest connection to port P.
//! - **host -> guest, any port**: the VMM listens on `DIR/connect`; a client connects, writes
//!   the 18 bytes `GGGGGGGG.PPPPPPPP\n`, and from then on the stream is a connection to guest
//!   port P.
//!
//! Flow control is virtio's credit scheme: each side advertises `buf_alloc` (what it can hold)
//! and `fwd_cnt` (what it has passed on); the VMM never sends the guest more than
//! `peer_buf_alloc - (sent - peer_fwd_cnt)`, and a guest that sends more than our credit is
//! reset. Everything is non-blocking and driven by [`Muxer::handle_guest`] (the TX queue),
//! [`Muxer::poll_host`] (host sockets ready) and [`Muxer::next_rx`] (RX buffers available).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::packet::{
    op, Header, PacketError, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// What the VMM can buffer per connection (guest -> host bytes not yet written).
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Largest payload of one RW packet to the guest (Linux's default RX buffer is 4 KiB; the
/// device clips to the buffers it has, so this is only an upper bound).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Bound on live connections (HyperKit: 1024).
pub const MAX_CONNS: usize = 1024;
/// Packets queued for the guest before the muxer stops reading host sockets.
const RX_QUEUE_MAX: usize = 1024;
/// First local port for host-initiated connections.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// Why the device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest_cid {0} is reserved (must be 3 to 2^32-2)")]
    BadCid(u64),
    #[error("socket path {0:?} is too long for a Unix socket")]
    PathTooLong(PathBuf),
    #[error("listen on {path:?}: {err}")]
    Listen { path: PathBuf, err: std::io::Error },
    #[error("bad packet from the guest: {0}")]
    Packet(#[from] PacketError),
}

/// `-s N,virtio-sock,guest_cid=C,path=DIR[,guest_forwards=P1;P2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub dir: PathBuf,
    pub guest_forwards: Vec<u32>,
}

/// `CID.PORT` as HyperKit names it.
pub fn socket_name(cid: u64, port: u32) -> String {
    format!("{cid:08x}.{port:08x}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    host_port: u32,
    guest_port: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// We sent REQUEST to the guest and wait for RESPONSE.
    Connecting,
    Connected,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest bytes written to the host socket.
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_told: u32,
    /// Guest bytes received but not yet written to the host socket.
    pending: Vec<u8>,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The guest will send no more (SHUTDOWN_SEND seen).
    guest_done_sending: bool,
    /// The guest will receive no more, or the host side reached EOF.
    host_done_sending: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, peer_buf_alloc: u32, peer_fwd_cnt: u32) -> Conn {
        Conn {
            stream,
            state,
            fwd_cnt: 0,
            fwd_told: 0,
            pending: Vec::new(),
            tx_cnt: 0,
            peer_buf_alloc,
            peer_fwd_cnt,
            guest_done_sending: false,
            host_done_sending: false,
        }
    }

    /// What the guest can still take.
    fn peer_free(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host connection to `DIR/connect` that has not yet said which port it wants.
struct Handshake {
    stream: UnixStream,
    got: Vec<u8>,
}

/// The vsock connection multiplexer for one guest.
pub struct Muxer {
    cfg: VsockConfig,
    connect: UnixListener,
    forwards: Vec<(u32, UnixListener)>,
    handshakes: Vec<Handshake>,
    conns: HashMap<Key, Conn>,
    rx: VecDeque<Vec<u8>>,
    next_host_port: u32,
}

fn listen(path: &Path) -> Result<UnixListener, VsockError> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|err| VsockError::Listen {
        path: path.into(),
        err,
    })?;
    l.set_nonblocking(true).map_err(|err| VsockError::Listen {
        path: path.into(),
        err,
    })?;
    Ok(l)
}

impl Muxer {
    pub fn new(cfg: VsockConfig) -> Result<Muxer, VsockError> {
        if cfg.guest_cid <= HOST_CID || cfg.guest_cid >= u32::MAX as u64 {
            return Err(VsockError::BadCid(cfg.guest_cid));
        }
        // sun_path holds 104 bytes on macOS (108 on Linux): DIR plus "/CID.PORT" must fit.
        if cfg.dir.as_os_str().len() + "/00000000.00000000".len() >= 104 {
            return Err(VsockError::PathTooLong(cfg.dir.clone()));
        }
        let connect = listen(&cfg.dir.join("connect"))?;
        let mut forwards = Vec::new();
        for &port in &cfg.guest_forwards {
            let name = socket_name(cfg.guest_cid, port);
            let l = listen(&cfg.dir.join(&name))?;
            let link = cfg.dir.join(format!("guest.{port:08x}"));
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&name, &link).map_err(|err| VsockError::Listen {
                path: link.clone(),
                err,
            })?;
            forwards.push((port, l));
        }
        Ok(Muxer {
            cfg,
            connect,
            forwards,
            handshakes: Vec::new(),
            conns: HashMap::new(),
            rx: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
        })
    }

    /// Descriptors the device's event loop should wait on for readability.
    pub fn fds(&self) -> Vec<RawFd> {
        let mut v = vec![self.connect.as_raw_fd()];
        v.extend(self.forwards.iter().map(|(_, l)| l.as_raw_fd()));
        v.extend(self.handshakes.iter().map(|h| h.stream.as_raw_fd()));
        v.extend(self.conns.values().map(|c| c.stream.as_raw_fd()));
        v
    }

    /// What to wait for on which descriptor (poll(2) events) for the muxer to make progress:
    /// listeners and handshakes to read; connections to write while guest data waits; and
    /// connections to read only while nothing waits for the guest and it has credit left, so
    /// a waiter never spins on data it cannot move.
    pub fn poll_interest(&self) -> Vec<(RawFd, i16)> {
        let mut v = vec![(self.connect.as_raw_fd(), libc::POLLIN)];
        v.extend(
            self.forwards
                .iter()
                .map(|(_, l)| (l.as_raw_fd(), libc::POLLIN)),
        );
        v.extend(
            self.handshakes
                .iter()
                .map(|h| (h.stream.as_raw_fd(), libc::POLLIN)),
        );
        for c in self.conns.values() {
            let mut ev = 0;
            if !c.pending.is_empty() {
                ev |= libc::POLLOUT;
            }
            if self.rx.is_empty()
                && c.state == State::Connected
                && !c.host_done_sending
                && c.peer_free() > 0
            {
                ev |= libc::POLLIN;
            }
            if ev != 0 {
                v.push((c.stream.as_raw_fd(), ev));
            }
        }
        v
    }

    /// Drops every connection and queued packet (the driver reset the device: the guest's
    /// sockets are gone). Host peers see their streams close; the listeners stay.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.handshakes.clear();
        self.rx.clear();
    }

    /// Live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Whether packets wait for the guest's RX queue.
    pub fn has_rx(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The next packet for the guest (header and payload), if any, in at most `room` bytes:
    /// a longer RW payload is split, the rest stays first in line.
    pub fn next_rx_within(&mut self, room: usize) -> Option<Vec<u8>> {
        let front = self.rx.front_mut()?;
        if front.len() <= room {
            return self.rx.pop_front();
        }
        let take = room.checked_sub(HEADER_LEN).filter(|&n| n > 0)?;
        let mut h = Header::parse(front).ok()?;
        if h.op != op::RW {
            return None;
        }
        let mut head = Vec::with_capacity(HEADER_LEN + take);
        h.len = take as u32;
        h.write(&mut head);
        head.extend_from_slice(&front[HEADER_LEN..HEADER_LEN + take]);
        let rest = front.len() - HEADER_LEN - take;
        h.len = rest as u32;
        let mut tail = Vec::with_capacity(HEADER_LEN + rest);
        h.write(&mut tail);
        tail.extend_from_slice(&front[HEADER_LEN + take..]);
        *front = tail;
        Some(head)
    }

    /// The next packet for the guest, whole.
    pub fn next_rx(&mut self) -> Option<Vec<u8>> {
        self.rx.pop_front()
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: usize) -> Header {
        let (fwd_cnt, buf_alloc) = self
            .conns
            .get(&key)
            .map(|c| (c.fwd_cnt, BUF_ALLOC))
            .unwrap_or((0, 0));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cfg.guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len: len as u32,
            ty: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn send(&mut self, key: Key, op: u16, flags: u32, payload: &[u8]) {
        let h = self.header(key, op, flags, payload.len());
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_told = c.fwd_cnt;
        }
        let mut p = Vec::with_capacity(HEADER_LEN + payload.len());
        h.write(&mut p);
        p.extend_from_slice(payload);
        self.rx.push_back(p);
    }

    fn rst(&mut self, key: Key) {
        self.conns.remove(&key);
        self.send(key, op::RST, 0, &[]);
    }

    /// One packet from the guest's TX queue.
    pub fn handle_guest(&mut self, pkt: &[u8]) -> Result<(), VsockError> {
        let (h, data) = Header::parse_packet(pkt)?;
        let key = Key {
            host_port: h.dst_port,
            guest_port: h.src_port,
        };
        if h.src_cid != self.cfg.guest_cid || h.dst_cid != HOST_CID || h.ty != TYPE_STREAM {
            // Not ours to answer as a connection; say no (never to an RST).
            if h.op != op::RST {
                let mut p = Vec::new();
                Header {
                    src_cid: h.dst_cid,
                    dst_cid: h.src_cid,
                    src_port: h.dst_port,
                    dst_port: h.src_port,
                    ty: h.ty,
                    op: op::RST,
                    ..Default::default()
                }
                .write(&mut p);
                self.rx.push_back(p);
            }
            return Ok(());
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            op::REQUEST => {
                if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
                    self.rst(key);
                    return Ok(());
                }
                let path = self.cfg.dir.join(socket_name(HOST_CID, h.dst_port));
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                    Ok(s) => {
                        self.conns
                            .insert(key, Conn::new(s, State::Connected, h.buf_alloc, h.fwd_cnt));
                        self.send(key, op::RESPONSE, 0, &[]);
                    }
                    Err(e) => {
                        log::debug!("vsock: guest port {} -> {path:?}: {e}", h.src_port);
                        self.rst(key);
                    }
                }
            }
            op::RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if c.state == State::Connecting => c.state = State::Connected,
                _ => self.rst(key),
            },
            op::RST => {
                self.conns.remove(&key);
            }
            op::SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.rst(key);
                    return Ok(());
                };
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_done_sending = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 {
                    c.host_done_sending = true;
                }
                // Both directions done: the connection ends (RST), but only once what the
                // guest sent has reached the host socket (flush ends it then).
                self.flush(key);
            }
            op::RW => {
                let Some(c) = self.conns.get_mut(&key) else {
                    self.rst(key);
                    return Ok(());
                };
                if c.state != State::Connected || c.guest_done_sending {
                    self.rst(key);
                    return Ok(());
                }
                // The guest may have at most our credit in flight.
                if c.pending.len() + data.len() > BUF_ALLOC as usize {
                    log::debug!("vsock: guest port {} overran its credit", h.src_port);
                    self.rst(key);
                    return Ok(());
                }
                c.pending.extend_from_slice(data);
                self.flush(key);
            }
            op::CREDIT_UPDATE => {
                if !self.conns.contains_key(&key) {
                    self.rst(key);
                }
            }
            op::CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.send(key, op::CREDIT_UPDATE, 0, &[]);
                } else {
                    self.rst(key);
                }
            }
            _ => self.rst(key),
        }
        Ok(())
    }

    /// Writes what the guest sent to the host socket, as far as it takes it, and tells the
    /// guest about the freed credit once half the buffer has moved on.
    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.pending.is_empty() {
            match c.stream.write(&c.pending) {
                Ok(0) => break,
                Ok(n) => {
                    c.pending.drain(..n);
                    c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("vsock: host socket for guest port {}: {e}", key.guest_port);
                    return self.rst(key);
                }
            }
        }
        if c.pending.is_empty() && c.guest_done_sending {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            if c.host_done_sending {
                return self.rst(key);
            }
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 2 {
            self.send(key, op::CREDIT_UPDATE, 0, &[]);
        }
    }

    /// Accepts host connections, finishes `connect` handshakes, writes pending guest data and
    /// reads host data into RW packets as far as the guest's credit allows.
    pub fn poll_host(&mut self) {
        loop {
            match self.connect.accept() {
                Ok((s, _)) if s.set_nonblocking(true).is_ok() => self.handshakes.push(Handshake {
                    stream: s,
                    got: Vec::new(),
                }),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let mut accepted = Vec::new();
        for (port, l) in &self.forwards {
            while let Ok((s, _)) = l.accept() {
                accepted.push((s, *port));
            }
        }
        for (s, port) in accepted {
            self.open_to_guest(s, port);
        }
        self.progress_handshakes();
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.flush(key);
            self.read_host(key);
        }
    }

    fn progress_handshakes(&mut self) {
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.handshakes.len() {
            let h = &mut self.handshakes[i];
            let mut buf = [0u8; 18];
            let want = 18 - h.got.len();
            match h.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.handshakes.swap_remove(i);
                    continue;
                }
                Ok(n) => h.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.handshakes.swap_remove(i);
                    continue;
                }
            }
            if h.got.len() == 18 {
                let h = self.handshakes.swap_remove(i);
                match parse_connect_line(&h.got) {
                    Some((cid, port)) if cid == self.cfg.guest_cid => done.push((h.stream, port)),
                    other => log::debug!("vsock: bad connect request {other:?}"),
                }
                continue;
            }
            i += 1;
        }
        for (s, port) in done {
            self.open_to_guest(s, port);
        }
    }

    fn open_to_guest(&mut self, s: UnixStream, guest_port: u32) {
        if self.conns.len() >= MAX_CONNS || s.set_nonblocking(true).is_err() {
            return;
        }
        let mut host_port = self.next_host_port;
        while self.conns.contains_key(&Key {
            host_port,
            guest_port,
        }) {
            host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        }
        self.next_host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
        let key = Key {
            host_port,
            guest_port,
        };
        self.conns
            .insert(key, Conn::new(s, State::Connecting, 0, 0));
        self.send(key, op::REQUEST, 0, &[]);
    }

    fn read_host(&mut self, key: Key) {
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            if self.rx.len() >= RX_QUEUE_MAX {
                return;
            }
            let Some(c) = self.conns.get_mut(&key) else {
                return;
            };
            if c.state != State::Connected || c.host_done_sending {
                return;
            }
            let room = (c.peer_free() as usize).min(MAX_PAYLOAD);
            if room == 0 {
                return;
            }
            match c.stream.read(&mut buf[..room]) {
                Ok(0) => {
                    // Host EOF: the guest will get no more from us.
                    c.host_done_sending = true;
                    let both = c.guest_done_sending;
                    self.send(
                        key,
                        op::SHUTDOWN,
                        SHUTDOWN_SEND | if both { SHUTDOWN_RCV } else { 0 },
                        &[],
                    );
                    return;
                }
                Ok(n) => {
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    self.send(key, op::RW, 0, &buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return self.rst(key),
            }
        }
    }
}

/// `GGGGGGGG.PPPPPPPP\n` -> (cid, port).
fn parse_connect_line(b: &[u8]) -> Option<(u64, u32)> {
    let s = std::str::from_utf8(b).ok()?.strip_suffix('\n')?;
    let (cid, port) = s.split_once('.')?;
    if cid.len() != 8 || port.len() != 8 {
        return None;
    }
    Some((
        u64::from_str_radix(cid, 16).ok()?,
        u32::from_str_radix(port, 16).ok()?,
    ))
}

#[cfg(test)]
#[path = "muxer_tests.rs"]
mod tests;
