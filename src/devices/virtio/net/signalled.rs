//! The network thread for back ends that announce frames with a callback rather than a
//! pollable descriptor (macOS vmnet calls a block on its own queue). The back end's callback
//! and the device's doorbell both set one [`Wakeup`]; the thread sleeps on it and moves
//! frames under the device lock. Portable: tested on Linux with an in-memory back end.

use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{VirtioNet, RX_QUEUE, TX_QUEUE};
use crate::devices::bus::lock;
use crate::devices::virtio::pci::VirtioPci;
use crate::net::NetBackend;

#[derive(Default)]
struct WakeState {
    pending: bool,
    stop: bool,
}

/// A level-triggered wake flag: any number of `wake` calls before the thread looks count as
/// one, and none is lost between the thread's last pass and its next wait.
#[derive(Default)]
pub struct Wakeup {
    state: Mutex<WakeState>,
    changed: Condvar,
}

impl Wakeup {
    pub fn new() -> Arc<Wakeup> {
        Arc::new(Wakeup::default())
    }

    /// Never blocks for longer than the thread holds the flag's lock (a few instructions),
    /// and never allocates: safe from a vCPU's doorbell and from vmnet's queue.
    pub fn wake(&self) {
        lock(&self.state).pending = true;
        self.changed.notify_one();
    }

    fn stop(&self) {
        lock(&self.state).stop = true;
        self.changed.notify_one();
    }

    /// Waits for a wake; false once asked to stop.
    fn wait(&self) -> bool {
        let mut state = lock(&self.state);
        while !state.pending && !state.stop {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.pending = false;
        !state.stop
    }
}

/// A running network thread, owned by the device manager. Dropping it stops the thread.
pub struct SignalledWorker {
    wakeup: Arc<Wakeup>,
    thread: Option<JoinHandle<()>>,
}

impl SignalledWorker {
    /// Starts the thread for `device` and routes the device's doorbells to `wakeup`, which
    /// the back end's own "frames waiting" callback must also call.
    pub fn spawn<B: NetBackend + 'static>(
        device: Arc<Mutex<VirtioPci<VirtioNet<B>>>>,
        wakeup: Arc<Wakeup>,
    ) -> io::Result<SignalledWorker> {
        let doorbell = wakeup.clone();
        lock(&device)
            .device_mut()
            .set_waker(Box::new(move || doorbell.wake()));
        let waiter = wakeup.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-net".into())
            .spawn(move || {
                while waiter.wait() {
                    // Either queue may have work: new receive buffers, frames from the host,
                    // or frames to send. Transmit first, so replies can come back at once.
                    let mut pci = lock(&device);
                    pci.service_queue(TX_QUEUE as u16);
                    pci.service_queue(RX_QUEUE as u16);
                }
            })?;
        Ok(SignalledWorker {
            wakeup,
            thread: Some(thread),
        })
    }
}

impl crate::devices::DeviceHandle for SignalledWorker {}

impl Drop for SignalledWorker {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.wakeup.stop();
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::irq::test_util::RecordingLine;
    use crate::devices::pci::msix::tests::RecordingMsi;
    use crate::devices::pci::PciDevice;
    use crate::devices::virtio::net::tests::wait_for;
    use crate::devices::virtio::pci::test_ring::Ring;
    use crate::devices::virtio::pci::{VirtioPciResources, MODERN_BAR};
    use crate::devices::virtio::{
        STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    };
    use crate::memory::GuestMemory;
    use crate::net::MacAddr;

    const WRITE: u16 = 2;

    /// A host side like vmnet's: frames queue up, and the host calls the packet callback.
    #[derive(Default)]
    struct Host {
        inbox: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    struct SharedHost(Arc<Mutex<Host>>);

    impl NetBackend for SharedHost {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            lock(&self.0).sent.push(frame.to_vec());
            Ok(())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = lock(&self.0)
                .inbox
                .pop_front()
                .ok_or(io::ErrorKind::WouldBlock)?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
    }

    fn frame(marker: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| marker ^ i as u8).collect()
    }

    #[test]
    fn wakes_before_the_wait_are_not_lost_and_stop_ends_the_wait() {
        let wakeup = Wakeup::new();
        wakeup.wake();
        wakeup.wake();
        assert!(wakeup.wait(), "a wake before the wait counts");
        let waker = wakeup.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            waker.stop();
        });
        assert!(!wakeup.wait(), "stop ends the wait");
        thread.join().unwrap();
    }

    #[test]
    fn the_callback_and_the_doorbells_move_frames_both_ways() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let host = Arc::new(Mutex::new(Host::default()));
        let line = Arc::new(RecordingLine {
            gsi: 18,
            ..Default::default()
        });
        let pci = VirtioPci::new(
            VirtioNet::new(SharedHost(host.clone()), MacAddr([2, 0, 0, 0, 0, 1])),
            VirtioPciResources {
                memory: mem.clone(),
                msi: Arc::new(RecordingMsi::default()),
                intx: line.clone(),
                single_msi: false,
            },
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(pci));
        let wakeup = Wakeup::new();
        let worker = SignalledWorker::spawn(dev.clone(), wakeup.clone()).unwrap();
        let w = |offset: u64, value: u32, len: usize| {
            lock(&dev).write_bar(MODERN_BAR, offset, &value.to_le_bytes()[..len]);
        };

        let mut rx = Ring::new(&mem, 0x1000, 16);
        let mut tx = Ring::new(&mem, 0x8000, 16);
        w(0x14, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(0x08, 1, 4);
        w(0x0C, 1, 4); // VERSION_1
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(0x14, u32::from(s), 1);
        for (index, ring) in [(0u32, &rx), (1, &tx)] {
            w(0x16, index, 2);
            w(0x18, u32::from(ring.size), 2);
            w(0x20, ring.desc as u32, 4);
            w(0x28, ring.avail as u32, 4);
            w(0x30, ring.used as u32, 4);
            w(0x1C, 1, 2);
        }
        w(0x14, u32::from(s | STATUS_DRIVER_OK), 1);

        // The guest posts a buffer first; the host's callback then delivers the frame.
        rx.add_chain(&mem, &[(0x20000, 2048, WRITE)]);
        w(0x3000, 0, 2);
        lock(&host).inbox.push_back(frame(0x77, 64));
        wakeup.wake(); // what vmnet's "packets available" block does
        wait_for("receive", || !rx.used(&mem).is_empty());
        assert_eq!(rx.used(&mem), vec![(0, 12 + 64)]);
        let mut got = vec![0u8; 64];
        mem.read_slice(&mut got, GuestAddress(0x20000 + 12))
            .unwrap();
        assert_eq!(got, frame(0x77, 64));
        wait_for("INTx", || !line.levels.lock().unwrap().is_empty());

        // A frame with no buffer waits on the host until the guest's doorbell.
        lock(&host).inbox.push_back(frame(0x66, 80));
        wakeup.wake();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(lock(&host).inbox.len(), 1, "kept for a later buffer");
        rx.add_chain(&mem, &[(0x30000, 2048, WRITE)]);
        w(0x3000, 0, 2);
        wait_for("second receive", || rx.used(&mem).len() == 2);

        // Guest to host through the transmit doorbell alone.
        mem.write_slice(&[0u8; 12], GuestAddress(0x40000)).unwrap();
        mem.write_slice(&frame(0x99, 60), GuestAddress(0x4000C))
            .unwrap();
        tx.add_chain(&mem, &[(0x40000, 72, 0)]);
        w(0x3004, 1, 2);
        wait_for("transmit", || !lock(&host).sent.is_empty());
        assert_eq!(lock(&host).sent, vec![frame(0x99, 60)]);
        drop(worker);
        assert_eq!(lock(&dev).device().stats().tx_frames, 1);
    }
}
