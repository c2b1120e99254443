//! A back end read by a thread of its own: for hosts without epoll (macOS), where the network
//! thread sleeps on a callback-set flag as it does for vmnet. The reader waits in poll(2)
//! until the descriptor has frames, moves them into a bounded queue and calls `wake`; when
//! the guest falls behind, the queue fills and the reader blocks instead of spinning.
//! Sending goes straight to the back end under its lock.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, TryRecvError};

use super::socket::MAX_SOCKET_FRAME;
use super::NetBackend;

/// Frames held for the guest before the reader stops reading.
const QUEUE_FRAMES: usize = 256;

pub struct Threaded<B> {
    backend: Arc<Mutex<B>>,
    frames: Receiver<Vec<u8>>,
    _reader: JoinHandle<()>,
}

impl<B: NetBackend + AsRawFd + 'static> Threaded<B> {
    /// Starts the reader; `wake` runs after every queued frame (it must not block).
    pub fn spawn(backend: B, wake: Box<dyn Fn() + Send>) -> io::Result<Threaded<B>> {
        let fd = backend.as_raw_fd();
        let backend = Arc::new(Mutex::new(backend));
        let (tx, frames) = bounded(QUEUE_FRAMES);
        let shared = backend.clone();
        let reader = std::thread::Builder::new()
            .name("net-reader".into())
            .spawn(move || {
                let mut buf = vec![0u8; MAX_SOCKET_FRAME];
                loop {
                    if let Err(e) = wait_readable(fd) {
                        log::error!("virtio-net reader: poll: {e}");
                        return;
                    }
                    loop {
                        let got = shared
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .recv(&mut buf);
                        match got {
                            Ok(n) => {
                                // Blocks while the queue is full: the guest sets the pace.
                                if tx.send(buf[..n].to_vec()).is_err() {
                                    return; // the device is gone
                                }
                                wake();
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                log::error!("virtio-net reader: {e}");
                                return;
                            }
                        }
                    }
                }
            })?;
        Ok(Threaded {
            backend,
            frames,
            _reader: reader,
        })
    }
}

impl<B: NetBackend> NetBackend for Threaded<B> {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.backend
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.frames.try_recv() {
            Ok(frame) => {
                let n = frame.len().min(buf.len());
                buf[..n].copy_from_slice(&frame[..n]);
                Ok(n)
            }
            Err(TryRecvError::Empty) => Err(io::ErrorKind::WouldBlock.into()),
            Err(TryRecvError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the back end's reader stopped",
            )),
        }
    }
}

fn wait_readable(fd: RawFd) -> io::Result<()> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one live pollfd, count 1.
        if unsafe { libc::poll(&mut pollfd, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::net::socket::DgramSocket;

    #[test]
    fn frames_are_queued_woken_and_bounded() {
        let (ours, peer) = UnixDatagram::pair().unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        let mut threaded = Threaded::spawn(
            DgramSocket::from_socket(ours).unwrap(),
            Box::new(move || {
                counter.fetch_add(1, Ordering::Relaxed);
            }),
        )
        .unwrap();
        for i in 0..QUEUE_FRAMES + 10 {
            peer.send(&[i as u8; 60]).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while wakes.load(Ordering::Relaxed) < QUEUE_FRAMES && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            wakes.load(Ordering::Relaxed),
            QUEUE_FRAMES,
            "the full queue holds the reader"
        );
        let mut buf = [0u8; 100];
        let mut got = 0;
        while got < QUEUE_FRAMES + 10 && Instant::now() < deadline {
            match threaded.recv(&mut buf) {
                Ok(n) => {
                    assert_eq!((n, buf[0]), (60, got as u8));
                    got += 1;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert_eq!(got, QUEUE_FRAMES + 10);
        threaded.send(b"out").unwrap();
        let mut out = [0u8; 8];
        assert_eq!(peer.recv(&mut out).unwrap(), 3);
    }
}
