//! virtio-vsock (`-s N,virtio-sock,guest_cid=C,path=DIR[,guest_forwards=P1;P2]`, device
//! ID 19) with HyperKit's host side: the [`Muxer`] maps guest streams to Unix sockets in DIR.
//!
//! The device thread serves the TX queue (packets into the muxer) and the RX queue (packets
//! out of it). Host sockets wake it through a back-end notifier rung by a small poller thread,
//! which waits with poll(2) on what the muxer says can make progress
//! ([`Muxer::poll_interest`]): data the guest has no credit or no buffers for is not waited
//! on, so neither thread spins.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::Queue;

use super::pci::{VirtioPci, VirtioPciError, VirtioPciResources};
use super::queue_worker::{Backend, QueueWorker, VirtioQueues};
use super::vsock_queue::{self, DEVICE_TYPE_VSOCK, RX_QUEUE, TX_QUEUE};
use super::{ActivateError, Activation, QueueError, VirtioDevice};
use crate::devices::bus::lock;
use crate::devices::event_loop::Notifier;
use crate::devices::{BuiltDevice, DeviceHandle};
use crate::memory::GuestMemory;
use crate::vsock::{Muxer, VsockConfig, VsockError};

/// HyperKit's ring sizes: 256 for RX and TX, a small unused event queue.
const QUEUE_SIZES: [u16; 3] = [256, 256, 4];
/// PCI class "network, other", as HyperKit presents it.
const PCI_CLASS: (u8, u8, u8) = (0x02, 0x80, 0x00);
/// Longest the poller sleeps between looks at a changed interest set.
const POLL_TIMEOUT_MS: i32 = 100;

/// Why the device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VsockDeviceError {
    #[error("virtio-sock: {0}")]
    Muxer(#[from] VsockError),
    #[error(transparent)]
    Pci(#[from] VirtioPciError),
    #[error("virtio-sock: cannot start the host socket poller: {0}")]
    Thread(std::io::Error),
}

/// What the device thread does with the queues.
pub struct VsockQueues {
    muxer: Arc<Mutex<Muxer>>,
    wake: Arc<Notifier>,
    /// Bumped each time the RX side ran, so the poller knows its wake-up was seen.
    served: Arc<AtomicU64>,
    buf: Vec<u8>,
}

impl VirtioQueues for VsockQueues {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut muxer = lock(&self.muxer);
        match index {
            TX_QUEUE => {
                let used = vsock_queue::process_tx(queue, memory, &mut muxer, &mut self.buf)?;
                muxer.poll_host();
                if muxer.has_rx() {
                    // Answers wait for the RX queue: serve it through the back end.
                    self.wake.notify();
                }
                Ok(used)
            }
            RX_QUEUE => {
                self.wake.drain();
                muxer.poll_host();
                let used = vsock_queue::fill_rx(queue, memory, &mut muxer)?;
                // Reading may have freed room for more host data.
                muxer.poll_host();
                let more = vsock_queue::fill_rx(queue, memory, &mut muxer)?;
                self.served.fetch_add(1, Ordering::Release);
                Ok(used || more)
            }
            // The event queue: buffers are kept, never used.
            _ => Ok(false),
        }
    }

    fn backend(&self) -> Option<(Backend, usize)> {
        Some((Backend::Notifier(self.wake.clone()), RX_QUEUE))
    }
}

/// The device.
pub struct VirtioVsock {
    guest_cid: u64,
    worker: QueueWorker<VsockQueues>,
    /// The muxer the worker serves, kept to drop its connections at a reset.
    muxer: Arc<Mutex<Muxer>>,
    stop: Arc<AtomicBool>,
}

impl Drop for VirtioVsock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Waits on the muxer's sockets and rings the device when one can make progress.
fn poller(
    muxer: Arc<Mutex<Muxer>>,
    wake: Arc<Notifier>,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Acquire) {
        let interest: Vec<(RawFd, i16)> = lock(&muxer).poll_interest();
        let mut fds: Vec<libc::pollfd> = interest
            .iter()
            .map(|&(fd, events)| libc::pollfd {
                fd,
                events,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the length passed; the descriptors may
        // close meanwhile (poll then reports POLLNVAL, which only wakes us).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, POLL_TIMEOUT_MS) };
        if n > 0 {
            let seen = served.load(Ordering::Acquire);
            wake.notify();
            // Let the device thread act before looking again (bounded: a paused device).
            for _ in 0..100 {
                if served.load(Ordering::Acquire) != seen || stop.load(Ordering::Acquire) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl VirtioVsock {
    /// The muxer on DIR, its poller thread, and the queues' work for the device thread.
    fn parts(config: &VsockConfig) -> Result<(VsockQueues, Arc<AtomicBool>), VsockDeviceError> {
        let muxer = Arc::new(Mutex::new(Muxer::new(config.clone())?));
        let wake = Notifier::new().map_err(VirtioPciError::Notifier)?;
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (muxer, wake, served, stop) =
                (muxer.clone(), wake.clone(), served.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vsock-poll".into())
                .spawn(move || poller(muxer, wake, served, stop))
                .map_err(VsockDeviceError::Thread)?;
        }
        Ok((
            VsockQueues {
                muxer,
                wake,
                served,
                buf: Vec::new(),
            },
            stop,
        ))
    }

    /// `-s N,virtio-sock,...`: binds the sockets in DIR and starts the poller.
    pub fn build(
        config: &VsockConfig,
        transport: VirtioPciResources,
    ) -> Result<BuiltDevice, VsockDeviceError> {
        let (queues, stop) = Self::parts(config)?;
        let muxer = queues.muxer.clone();
        let worker = QueueWorker::new("virtio-sock", queues).map_err(VirtioPciError::Notifier)?;
        let device = VirtioVsock {
            guest_cid: config.guest_cid,
            worker,
            muxer,
            stop,
        };
        let handle = device.worker.handle();
        let function = VirtioPci::new(device, transport)?;
        Ok(BuiltDevice {
            function: Arc::new(Mutex::new(function)),
            handle: Some(handle),
        })
    }
}

impl VirtioDevice for VirtioVsock {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_VSOCK
    }
    fn pci_class(&self) -> (u8, u8, u8) {
        PCI_CLASS
    }
    fn device_features(&self) -> u64 {
        // No feature bits: stream sockets only, as HyperKit.
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn config_size(&self) -> u64 {
        8
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = vsock_queue::config(self.guest_cid);
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| cfg.get(at))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker.activate(activation)
    }
    fn reset(&mut self) {
        self.worker.reset();
        lock(&self.muxer).reset();
    }
    fn handle(&self) -> Option<Box<dyn DeviceHandle>> {
        Some(self.worker.handle())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::devices::virtio::pci::test_ring::Ring;
    use crate::devices::virtio::{ActiveQueue, VirtioInterrupt};
    use crate::vsock::packet::{op, Header, HEADER_LEN, HOST_CID, TYPE_STREAM};

    struct Count(AtomicU64);
    impl VirtioInterrupt for Count {
        fn signal_used_queue(&self, _index: usize) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn queue_error(&self, why: &QueueError) {
            panic!("queue error: {why}");
        }
    }

    /// The whole device on its own threads: a guest REQUEST on TX gets a RESPONSE on RX, and
    /// host data arrives on RX through the poller without any guest doorbell.
    #[test]
    fn device_threads_carry_a_connection() {
        let tmp = TempDir::new_with_prefix("/tmp/xvd-").unwrap();
        let svc = UnixListener::bind(tmp.as_path().join("00000002.00000050")).unwrap();
        let config = VsockConfig {
            guest_cid: 3,
            dir: tmp.as_path().into(),
            guest_forwards: vec![],
        };
        let (queues, stop) = VirtioVsock::parts(&config).unwrap();
        let mut worker = QueueWorker::new("virtio-sock-test", queues).unwrap();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut rx = Ring::new(&mem, 0x1000, 16);
        let mut tx = Ring::new(&mem, 0x4000, 16);
        let ev = Ring::new(&mem, 0x7000, 4);
        for i in 0..8u64 {
            rx.add_chain(&mem, &[(0x100000 + i * 0x1000, 0x1000, 2)]);
        }
        let mut req = Vec::new();
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 4000,
            dst_port: 0x50,
            ty: TYPE_STREAM,
            op: op::REQUEST,
            buf_alloc: 1 << 16,
            ..Default::default()
        }
        .write(&mut req);
        mem.write_slice(&req, GuestAddress(0x200000)).unwrap();
        tx.add_chain(&mem, &[(0x200000, req.len() as u32, 0)]);
        let notifiers: Vec<Arc<Notifier>> = (0..3).map(|_| Notifier::new().unwrap()).collect();
        let queues = [rx.queue(), tx.queue(), ev.queue()]
            .into_iter()
            .zip(&notifiers)
            .map(|(q, n)| ActiveQueue {
                queue: Arc::new(Mutex::new(q)),
                notifier: n.clone(),
            })
            .collect();
        let irq = Arc::new(Count(AtomicU64::new(0)));
        worker
            .activate(Activation {
                memory: mem.clone(),
                queues,
                interrupt: irq.clone(),
                features: 0,
            })
            .unwrap();
        notifiers[TX_QUEUE].notify();
        let wait_used = |n: usize| {
            let start = Instant::now();
            while rx.used(&mem).len() < n {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "RX got {:?}",
                    rx.used(&mem)
                );
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        wait_used(1);
        let mut h = [0u8; HEADER_LEN];
        mem.read_slice(&mut h, GuestAddress(0x100000)).unwrap();
        assert_eq!(Header::parse(&h).unwrap().op, op::RESPONSE);
        let (mut host, _) = svc.accept().unwrap();
        host.write_all(b"from the host").unwrap();
        wait_used(2);
        let mut p = [0u8; HEADER_LEN + 13];
        mem.read_slice(&mut p, GuestAddress(0x101000)).unwrap();
        let (h, d) = Header::parse_packet(&p).unwrap();
        assert_eq!((h.op, d), (op::RW, &b"from the host"[..]));
        assert!(irq.0.load(Ordering::Relaxed) >= 2);
        worker.reset();
        stop.store(true, Ordering::Release);
        drop(host);
    }
}
