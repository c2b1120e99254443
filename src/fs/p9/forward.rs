//! HyperKit's `virtio-9p,path=SOCKET,tag=TAG` (or `port=N`): no server of our own, every 9P
//! message goes as-is to an external server on a Unix socket (or 127.0.0.1:N) and its reply
//! comes back. As in HyperKit the connection is made at the first request, retrying for up to
//! 10 s so the server may start after the VM; unlike HyperKit a lost server is an error reply
//! to the guest (EIO) and a reconnect at the next request, not an exit of the whole VMM.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::server::{msg, MAX_MSIZE};
use super::wire::{Writer, HEADER};
use crate::fs::linux_abi::errno;

/// Where the external server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Unix(PathBuf),
    /// A TCP port on 127.0.0.1 (HyperKit's `port=N`).
    Tcp(u16),
}

/// Why a message could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot connect to the 9P server at {target:?}: {err}")]
    Connect { target: Target, err: std::io::Error },
    #[error("9P server connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("9P server sent a reply of {0} bytes (at most {MAX_MSIZE})")]
    ReplyTooBig(u32),
    #[error("request of {0} bytes is shorter than a 9P header")]
    ShortRequest(usize),
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn io(&mut self) -> &mut dyn ReadWrite {
        match self {
            Stream::Unix(s) => s,
            Stream::Tcp(s) => s,
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Forwards 9P messages to an external server, one at a time.
pub struct Forwarder {
    target: Target,
    stream: Option<Stream>,
    attempts: u32,
    pause: Duration,
}

impl Forwarder {
    /// HyperKit's patience: 200 attempts 50 ms apart.
    pub fn new(target: Target) -> Forwarder {
        Forwarder::with_retry(target, 200, Duration::from_millis(50))
    }

    pub fn with_retry(target: Target, attempts: u32, pause: Duration) -> Forwarder {
        Forwarder {
            target,
            stream: None,
            attempts: attempts.max(1),
            pause,
        }
    }

    fn connect(&mut self) -> Result<&mut Stream, ForwardError> {
        if self.stream.is_none() {
            let mut last = None;
            for i in 0..self.attempts {
                if i > 0 {
                    std::thread::sleep(self.pause);
                }
                let r = match &self.target {
                    Target::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
                    Target::Tcp(port) => {
                        TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).map(|s| {
                            let _ = s.set_nodelay(true);
                            Stream::Tcp(s)
                        })
                    }
                };
                match r {
                    Ok(s) => {
                        self.stream = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if self.stream.is_none() {
                let err =
                    last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
                return Err(ForwardError::Connect {
                    target: self.target.clone(),
                    err,
                });
            }
        }
        Ok(self.stream.as_mut().expect("connected above"))
    }

    /// Sends one request and appends its reply to `out`. Replies to other tags (requests the
    /// guest flushed) are skipped. On failure the guest gets an Rlerror(EIO) for its tag.
    pub fn handle(&mut self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ForwardError> {
        let start = out.len();
        let r = self.exchange(req, out);
        if r.is_err() {
            self.stream = None;
            out.truncate(start);
            let tag = req
                .get(5..7)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .unwrap_or(u16::MAX);
            let mut w = Writer::new(out, msg::RLERROR, tag);
            w.u32(errno::EIO as u32);
            w.finish();
        }
        r
    }

    fn exchange(&mut self, req: &[u8], out: &mut Vec<u8>) -> Result<(), ForwardError> {
        if req.len() < HEADER {
            return Err(ForwardError::ShortRequest(req.len()));
        }
        let tag = [req[5], req[6]];
        let s = self.connect()?.io();
        s.write_all(req)?;
        loop {
            let mut hdr = [0u8; HEADER];
            s.read_exact(&mut hdr)?;
            let size = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            if (size as usize) < HEADER || size > MAX_MSIZE {
                return Err(ForwardError::ReplyTooBig(size));
            }
            let at = out.len();
            out.extend_from_slice(&hdr);
            out.resize(at + size as usize, 0);
            s.read_exact(&mut out[at + HEADER..])?;
            if hdr[5..7] == tag {
                return Ok(());
            }
            out.truncate(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::fs::p9::wire::{split, Reader};
    use crate::fs::p9::{Options, Server};
    use crate::fs::sandbox::Share;

    /// An external 9P server: our own, behind a Unix socket, reading whole messages.
    fn serve(listener: UnixListener, share: std::path::PathBuf) {
        let (mut conn, _) = listener.accept().unwrap();
        let mut srv = Server::new(Share::new(&share, false).unwrap(), Options::default());
        loop {
            let mut hdr = [0u8; 4];
            if conn.read_exact(&mut hdr).is_err() {
                return;
            }
            let size = u32::from_le_bytes(hdr) as usize;
            let mut msg = hdr.to_vec();
            msg.resize(size, 0);
            conn.read_exact(&mut msg[4..]).unwrap();
            // A stale reply first, for a tag nobody waits for: the forwarder must skip it.
            let mut out = Vec::new();
            let mut w = Writer::new(&mut out, msg::RLERROR, 0x7777);
            w.u32(5);
            w.finish();
            srv.handle(&msg, &mut out);
            conn.write_all(&out).unwrap();
        }
    }

    #[test]
    fn forwards_to_an_external_server_over_a_unix_socket() {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-9pfwd-").unwrap();
        let sock = tmp.as_path().join("9p.sock");
        let share = tmp.as_path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(share.join("hello"), b"world").unwrap();
        // The server starts after the first request is made: the forwarder waits for it.
        let (sock2, share2) = (sock.clone(), share.clone());
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(120));
            serve(UnixListener::bind(&sock2).unwrap(), share2);
        });
        let mut f =
            Forwarder::with_retry(Target::Unix(sock.clone()), 100, Duration::from_millis(20));
        let mut call = |ty: u8, tag: u16, body: &dyn Fn(&mut Writer)| {
            let mut m = Vec::new();
            let mut w = Writer::new(&mut m, ty, tag);
            body(&mut w);
            w.finish();
            let mut out = Vec::new();
            f.handle(&m, &mut out).unwrap();
            let (rty, rtag, b) = split(&out).unwrap();
            assert_eq!((rty, rtag), (ty + 1, tag));
            b.to_vec()
        };
        call(100, 1, &|w| {
            w.u32(65536).str(b"9P2000.L");
        });
        call(104, 2, &|w| {
            w.u32(1).u32(!0).str(b"").str(b"").u32(0);
        });
        call(110, 3, &|w| {
            w.u32(1).u32(2).u16(1).str(b"hello");
        });
        call(12, 4, &|w| {
            w.u32(2).u32(0);
        });
        let b = call(116, 5, &|w| {
            w.u32(2).u64(0).u32(100);
        });
        let mut r = Reader::new(&b);
        assert_eq!(r.u32().unwrap(), 5);
        assert_eq!(r.rest(), b"world");
        drop(f);
        t.join().unwrap();
    }

    #[test]
    fn a_missing_server_is_an_eio_reply_not_an_exit() {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-9pfwd-").unwrap();
        let mut f = Forwarder::with_retry(
            Target::Unix(tmp.as_path().join("none")),
            2,
            Duration::from_millis(1),
        );
        let mut m = Vec::new();
        let mut w = Writer::new(&mut m, 100, 42);
        w.u32(8192).str(b"9P2000.L");
        w.finish();
        let mut out = Vec::new();
        assert!(matches!(
            f.handle(&m, &mut out),
            Err(ForwardError::Connect { .. })
        ));
        let (ty, tag, body) = split(&out).unwrap();
        assert_eq!(
            (ty, tag, Reader::new(body).u32().unwrap()),
            (msg::RLERROR, 42, errno::EIO as u32)
        );
    }
}
