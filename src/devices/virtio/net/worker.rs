//! The network thread: waits in epoll on the back end's descriptor and on the doorbell
//! eventfd, and moves frames under the device lock. vCPU threads only write the eventfd.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VirtioNet, RX_QUEUE, TX_QUEUE};
use crate::devices::bus::lock;
use crate::devices::virtio::pci::VirtioPci;
use crate::net::NetBackend;

const BACKEND: u64 = 0;
const DOORBELL: u64 = 1;
const STOP: u64 = 2;

/// A running network thread, owned by the device manager. Dropping it stops the thread.
pub struct NetWorker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl NetWorker {
    /// Starts the thread for `device`, whose back end reads and writes `backend_fd`, and
    /// routes the device's doorbells to it.
    pub fn spawn<B: NetBackend + 'static>(
        device: Arc<Mutex<VirtioPci<VirtioNet<B>>>>,
        backend_fd: RawFd,
    ) -> io::Result<NetWorker> {
        let doorbell = EventFd::new(EFD_NONBLOCK)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        // Edge-triggered: a frame the guest has no buffer for yet must not spin the thread;
        // the guest's next receive doorbell retries it.
        let edge = EventSet::IN | EventSet::EDGE_TRIGGERED;
        epoll.ctl(
            ControlOperation::Add,
            backend_fd,
            EpollEvent::new(edge, BACKEND),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            doorbell.as_raw_fd(),
            EpollEvent::new(EventSet::IN, DOORBELL),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let ring = doorbell.try_clone()?;
        lock(&device).device_mut().set_waker(Box::new(move || {
            // A full counter already means "wake up": nothing is lost.
            let _ = ring.write(1);
        }));
        let thread = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || run(&epoll, &doorbell, &device))?;
        Ok(NetWorker {
            stop,
            thread: Some(thread),
        })
    }
}

impl crate::devices::DeviceHandle for NetWorker {}

impl Drop for NetWorker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run<B: NetBackend>(epoll: &Epoll, doorbell: &EventFd, device: &Mutex<VirtioPci<VirtioNet<B>>>) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio-net thread: epoll: {e}");
                return;
            }
        };
        let (mut rx, mut tx) = (false, false);
        for event in &events[..count] {
            match event.data() {
                BACKEND => rx = true,
                DOORBELL => {
                    let _ = doorbell.read();
                    // Either queue may have rung: new receive buffers or frames to send.
                    rx = true;
                    tx = true;
                }
                _ => return,
            }
        }
        let mut pci = lock(device);
        if tx {
            pci.service_queue(TX_QUEUE as u16);
        }
        if rx {
            pci.service_queue(RX_QUEUE as u16);
        }
    }
}
