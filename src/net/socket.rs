//! Frames over a Unix socket, to a network daemon: `virtio-net,socket=PATH` speaks QEMU's
//! stream framing (each frame behind its length as 4 big-endian bytes: passt, gvproxy's
//! `-listen-qemu`), `virtio-net,dgram=PATH` sends one frame per datagram (socket_vmnet,
//! gvproxy's `-listen-vfkit`). Both descriptors are non-blocking: the network thread waits in
//! poll/epoll, never in a read. Whatever the daemon sends is checked like a guest's frames.
//!
//! A datagram peer can only answer a socket with a name. Ours is `local=LPATH` when given;
//! otherwise an abstract name the kernel picks (Linux), or
//! `$TMPDIR/xhyve-<pid>-<n>.sock` elsewhere (removed when the back end is dropped).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::NetBackend;

/// The largest frame a daemon may send us: a 64 KiB IP packet behind an Ethernet header.
pub const MAX_SOCKET_FRAME: usize = 65536 + 18;
/// How long a send waits for room to finish a half-written stream record. After that the
/// rest stays queued and goes first at the next send: a record must be finished, or the
/// framing is lost for good.
const STREAM_WRITE_PATIENCE: Duration = Duration::from_secs(2);
/// Socket buffers big enough for bursts of full-size frames.
const SOCKET_BUFFER: libc::c_int = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot connect to {path}: {err}")]
    Connect { path: PathBuf, err: io::Error },
    #[error("cannot bind {path}: {err}")]
    Bind { path: PathBuf, err: io::Error },
    #[error("socket set-up: {0}")]
    Setup(io::Error),
}

/// QEMU's stream framing over a connected Unix stream socket.
#[derive(Debug)]
pub struct StreamSocket {
    stream: UnixStream,
    /// Bytes received and not yet returned as frames; `start..end` is live.
    inbox: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes of an oversized frame still to throw away.
    skip: usize,
    /// One record (length + frame) being written; `record[written..]` is still to go.
    record: Vec<u8>,
    written: usize,
    patience: Duration,
}

impl StreamSocket {
    pub fn connect(path: &Path) -> Result<StreamSocket, SocketError> {
        let stream = UnixStream::connect(path).map_err(|err| SocketError::Connect {
            path: path.into(),
            err,
        })?;
        StreamSocket::from_stream(stream).map_err(SocketError::Setup)
    }

    pub fn from_stream(stream: UnixStream) -> io::Result<StreamSocket> {
        stream.set_nonblocking(true)?;
        set_buffers(stream.as_raw_fd());
        Ok(StreamSocket {
            stream,
            inbox: vec![0; 4 * (4 + MAX_SOCKET_FRAME)],
            start: 0,
            end: 0,
            skip: 0,
            record: Vec::with_capacity(4 + MAX_SOCKET_FRAME),
            written: 0,
            patience: STREAM_WRITE_PATIENCE,
        })
    }

    /// Writes what is left of the current record without waiting; true once it is all out.
    fn write_pending(&mut self) -> io::Result<bool> {
        while self.written < self.record.len() {
            match self.stream.write(&self.record[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// A complete frame waiting in the inbox: its bounds.
    fn next_frame(&mut self) -> Option<(usize, usize)> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(self.end - self.start);
                self.start += n;
                self.skip -= n;
                if self.skip > 0 {
                    return None;
                }
            }
            let live = &self.inbox[self.start..self.end];
            if live.len() < 4 {
                return None;
            }
            let len = u32::from_be_bytes([live[0], live[1], live[2], live[3]]) as usize;
            if len > MAX_SOCKET_FRAME {
                // A frame no guest can take: drop it, keep the framing.
                log::debug!("virtio-net socket: dropping a {len}-byte frame");
                self.start += 4;
                self.skip = len;
                continue;
            }
            if live.len() < 4 + len {
                return None;
            }
            let at = self.start + 4;
            self.start = at + len;
            return Some((at, len));
        }
    }

    /// Reads what the socket has into the inbox; `Ok(false)` when nothing came.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.inbox.len() - self.end < 4 + MAX_SOCKET_FRAME {
            self.inbox.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        match self.stream.read(&mut self.inbox[self.end..]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the daemon closed the socket",
            )),
            Ok(n) => {
                self.end += n;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl NetBackend for StreamSocket {
    /// A frame the daemon has no room for is dropped whole, as a full queue on a wire would
    /// drop it; a record once started is always finished, here or at the next send, so the
    /// daemon never sees a torn record.
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let len = u32::try_from(frame.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
        if !self.write_pending()? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "the daemon is still reading the last frame",
            ));
        }
        self.record.clear();
        self.record.extend_from_slice(&len.to_be_bytes());
        self.record.extend_from_slice(frame);
        self.written = 0;
        while !self.write_pending()? {
            if self.written == 0 {
                self.record.clear();
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the daemon's socket is full",
                ));
            }
            if !wait_writable(self.stream.as_raw_fd(), self.patience)? {
                // The rest goes out first at the next send.
                return Ok(());
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some((at, len)) = self.next_frame() {
                let n = len.min(buf.len());
                buf[..n].copy_from_slice(&self.inbox[at..at + n]);
                return Ok(n);
            }
            if !self.fill()? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
        }
    }
}

impl AsRawFd for StreamSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

/// One frame per datagram over a Unix datagram socket.
#[derive(Debug)]
pub struct DgramSocket {
    socket: UnixDatagram,
    /// Our own socket's file, removed on drop (only when we created it).
    created: Option<PathBuf>,
}

impl DgramSocket {
    /// Binds our end (`local`, or a default name) and connects it to the daemon at `path`.
    pub fn connect(path: &Path, local: Option<&Path>) -> Result<DgramSocket, SocketError> {
        let (socket, created) = match local {
            Some(local) => (bind_path(local)?, Some(local.to_path_buf())),
            None => default_bound()?,
        };
        let me = DgramSocket { socket, created };
        me.socket
            .connect(path)
            .map_err(|err| SocketError::Connect {
                path: path.into(),
                err,
            })?;
        me.socket
            .set_nonblocking(true)
            .map_err(SocketError::Setup)?;
        set_buffers(me.socket.as_raw_fd());
        Ok(me)
    }

    /// One end of a connected pair (the built-in network's link to its stack thread).
    pub fn from_socket(socket: UnixDatagram) -> io::Result<DgramSocket> {
        socket.set_nonblocking(true)?;
        set_buffers(socket.as_raw_fd());
        Ok(DgramSocket {
            socket,
            created: None,
        })
    }

    pub fn socket(&self) -> &UnixDatagram {
        &self.socket
    }
}

fn bind_path(local: &Path) -> Result<UnixDatagram, SocketError> {
    UnixDatagram::bind(local).map_err(|err| SocketError::Bind {
        path: local.into(),
        err,
    })
}

#[cfg(target_os = "linux")]
fn default_bound() -> Result<(UnixDatagram, Option<PathBuf>), SocketError> {
    let socket = UnixDatagram::unbound().map_err(SocketError::Setup)?;
    // SAFETY: a sockaddr_un holding only the family asks Linux to autobind the socket to a
    // unique abstract name; the length covers exactly that field.
    let rc = unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sa_family_t>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(SocketError::Setup(io::Error::last_os_error()));
    }
    Ok((socket, None))
}

#[cfg(not(target_os = "linux"))]
fn default_bound() -> Result<(UnixDatagram, Option<PathBuf>), SocketError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("xhyve-{}-{n}.sock", std::process::id()));
    // A file left by an earlier process with our pid is stale.
    let _ = std::fs::remove_file(&path);
    Ok((bind_path(&path)?, Some(path)))
}

impl Drop for DgramSocket {
    fn drop(&mut self) {
        if let Some(path) = &self.created {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl NetBackend for DgramSocket {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.socket.send(frame) {
            Ok(_) => Ok(()),
            // The peer's queue is full: the frame is lost, as on a wire.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A datagram longer than `buf` is truncated by the kernel, as the trait allows.
        self.socket.recv(buf)
    }
}

impl AsRawFd for DgramSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

fn set_buffers(fd: RawFd) {
    let size: libc::c_int = SOCKET_BUFFER;
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: `fd` is an open socket; the value is a live c_int of the size passed.
        // Failure only leaves the default size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                std::ptr::addr_of!(size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Waits until `fd` can take more bytes; false after `patience`.
fn wait_writable(fd: RawFd, patience: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = patience.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one live pollfd, count 1.
    match unsafe { libc::poll(&mut pollfd, 1, ms) } {
        rc if rc < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(true)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(marker: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| marker ^ i as u8).collect()
    }

    fn recv_all(backend: &mut impl NetBackend) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; MAX_SOCKET_FRAME];
        let mut got = Vec::new();
        loop {
            match backend.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn stream_frames_are_length_prefixed_both_ways() {
        let (ours, mut daemon) = UnixStream::pair().unwrap();
        let mut backend = StreamSocket::from_stream(ours).unwrap();
        backend.send(&frame(1, 60)).unwrap();
        let mut record = [0u8; 64];
        daemon.read_exact(&mut record).unwrap();
        assert_eq!(record[..4], 60u32.to_be_bytes());
        assert_eq!(record[4..], frame(1, 60)[..]);

        // Frames split at awkward places, an oversized one, and a zero-length one.
        let mut bytes = Vec::new();
        for f in [frame(2, 1514), frame(3, 42)] {
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&f);
        }
        bytes.extend_from_slice(&((MAX_SOCKET_FRAME + 1) as u32).to_be_bytes());
        bytes.extend(std::iter::repeat_n(0xEE, MAX_SOCKET_FRAME + 1));
        bytes.extend_from_slice(&0u32.to_be_bytes());
        bytes.extend_from_slice(&9u32.to_be_bytes());
        bytes.extend_from_slice(&frame(4, 9));
        let mut got = Vec::new();
        for piece in bytes.chunks(1000) {
            daemon.write_all(piece).unwrap();
            got.extend(recv_all(&mut backend));
        }
        assert_eq!(got, vec![frame(2, 1514), frame(3, 42), vec![], frame(4, 9)]);
        assert_eq!(recv_all(&mut backend), Vec::<Vec<u8>>::new());

        drop(daemon);
        let mut buf = [0u8; 16];
        assert_eq!(
            backend.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn a_daemon_that_stalls_mid_record_never_sees_a_torn_record() {
        let (ours, mut daemon) = UnixStream::pair().unwrap();
        let mut backend = StreamSocket::from_stream(ours).unwrap();
        backend.patience = Duration::from_millis(10);
        let mut sent = Vec::new();
        let mut dropped = 0;
        // Far more than the socket buffers hold, while the daemon reads nothing.
        for i in 0..2000 {
            let f = frame(i as u8, 1514);
            match backend.send(&f) {
                Ok(()) => sent.push(f),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dropped += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(dropped > 0, "the buffers never filled");
        // The daemon wakes up; a last frame after it finishes the torn record first.
        daemon.set_nonblocking(true).unwrap();
        let mut bytes = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut drain = |bytes: &mut Vec<u8>| loop {
            match daemon.read(&mut chunk) {
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        };
        drain(&mut bytes);
        let last = frame(0xAB, 60);
        backend.send(&last).unwrap();
        sent.push(last);
        drain(&mut bytes);
        let mut got = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            got.push(bytes[at + 4..at + 4 + len].to_vec());
            at += 4 + len;
        }
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "every record whole and in order");
    }

    #[test]
    fn a_stream_frame_longer_than_the_buffer_is_truncated_and_framing_kept() {
        let (ours, mut daemon) = UnixStream::pair().unwrap();
        let mut backend = StreamSocket::from_stream(ours).unwrap();
        for f in [frame(5, 100), frame(6, 10)] {
            daemon.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
            daemon.write_all(&f).unwrap();
        }
        let mut small = [0u8; 50];
        assert_eq!(backend.recv(&mut small).unwrap(), 50);
        assert_eq!(small[..], frame(5, 100)[..50]);
        assert_eq!(backend.recv(&mut small).unwrap(), 10);
        assert_eq!(small[..10], frame(6, 10)[..]);
    }

    #[test]
    fn dgram_frames_are_datagrams() {
        let dir = std::env::temp_dir().join(format!("xhyve-dgram-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let daemon_path = dir.join("daemon.sock");
        let local = dir.join("me.sock");
        let _ = std::fs::remove_file(&daemon_path);
        let daemon = UnixDatagram::bind(&daemon_path).unwrap();
        let mut backend = DgramSocket::connect(&daemon_path, Some(&local)).unwrap();
        backend.send(&frame(7, 1514)).unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, from) = daemon.recv_from(&mut buf).unwrap();
        assert_eq!(buf[..n], frame(7, 1514)[..]);
        assert_eq!(from.as_pathname(), Some(local.as_path()));
        daemon.send_to(&frame(8, 60), &local).unwrap();
        assert_eq!(recv_all(&mut backend), vec![frame(8, 60)]);
        drop(backend);
        assert!(!local.exists(), "our socket file is removed");
        let _ = std::fs::remove_dir_all(&dir);

        // Without local=, the daemon can still answer (an autobound name on Linux).
        let daemon_path =
            std::env::temp_dir().join(format!("xhyve-dgram-test-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&daemon_path);
        let daemon = UnixDatagram::bind(&daemon_path).unwrap();
        let mut backend = DgramSocket::connect(&daemon_path, None).unwrap();
        backend.send(&frame(9, 10)).unwrap();
        let (n, from) = daemon.recv_from(&mut buf).unwrap();
        assert_eq!(n, 10);
        daemon.send_to_addr(&frame(10, 20), &from).unwrap();
        assert_eq!(recv_all(&mut backend), vec![frame(10, 20)]);
        let _ = std::fs::remove_file(&daemon_path);
        assert!(matches!(
            DgramSocket::connect(&daemon_path, None),
            Err(SocketError::Connect { .. })
        ));
    }
}
