use std::collections::VecDeque;

use vm_memory::GuestAddress;

use super::*;
use crate::devices::virtio::pci::test_ring::Ring;

const WRITE: u16 = 2;
const NEXT: u16 = 1;
const MAC: MacAddr = MacAddr([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);

/// Frames waiting for the guest, and frames the guest sent.
#[derive(Default)]
struct FakeNet {
    inbox: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

impl NetBackend for FakeNet {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.sent.push(frame.to_vec());
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.inbox.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
}

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

fn net() -> NetQueues<FakeNet> {
    NetQueues::new(FakeNet::default(), MAC)
}

fn frame(marker: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| marker ^ i as u8).collect()
}

fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn config_space_has_the_mac_link_up_and_mtu() {
    let n = VirtioNet::new(FakeNet::default(), MAC, None).unwrap();
    assert_eq!(n.device_features(), F_MAC | F_STATUS | F_MTU);
    assert_eq!(n.config_size(), 12);
    let mut config = [0xAAu8; 12];
    n.read_config(0, &mut config);
    assert_eq!(
        config,
        [0x02, 0x11, 0x22, 0x33, 0x44, 0x55, 1, 0, 1, 0, 0xDC, 0x05]
    );
    let mut word = [0u8; 2];
    n.read_config(6, &mut word);
    assert_eq!(u16::from_le_bytes(word), 1);
    // Where Linux reads it (offsetof(struct virtio_net_config, mtu)): the MTU its receive
    // buffers (1518 bytes with the Ethernet and VLAN headers, no MRG_RXBUF) can hold.
    n.read_config(10, &mut word);
    assert_eq!(u16::from_le_bytes(word), 1500);
    n.read_config(11, &mut word);
    assert_eq!(word, [0x05, 0], "past the end reads zero");
    n.read_config(u64::MAX, &mut word);
    assert_eq!(word, [0, 0]);
}

#[test]
fn transmit_strips_the_header_for_legacy_and_modern_drivers() {
    for (features, header) in [(0, 10usize), (F_VERSION_1, 12)] {
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 16);
        let payload = frame(0x5A, 60);
        mem.write_slice(&[0u8; 12], GuestAddress(0x10000)).unwrap();
        mem.write_slice(&payload, GuestAddress(0x10000 + header as u64))
            .unwrap();
        // Header and the first bytes in one buffer, the rest in a second.
        let split = header as u32 + 20;
        mem.write_slice(&payload[20..], GuestAddress(0x20000))
            .unwrap();
        ring.add_chain(&mem, &[(0x10000, split, NEXT), (0x20000, 40, 0)]);
        let mut queue = ring.queue();
        let mut n = net();
        n.set_features(features);
        assert!(n.process_queue(TX_QUEUE, &mut queue, &mem).unwrap());
        assert_eq!(n.backend_mut().sent, vec![payload]);
        assert_eq!(ring.used(&mem), vec![(0, 0)]);
        assert_eq!(n.stats().tx_frames, 1);
    }
}

#[test]
fn receive_prepends_a_header_and_spreads_over_buffers() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0x1000, 16);
    ring.add_chain(&mem, &[(0x10000, 12, WRITE | NEXT), (0x20000, 1514, WRITE)]);
    let mut queue = ring.queue();
    let mut n = net();
    n.set_features(F_VERSION_1);
    // No frame yet: the buffer stays with the device for later.
    assert!(!n.process_queue(RX_QUEUE, &mut queue, &mem).unwrap());
    assert!(ring.used(&mem).is_empty());
    let payload = frame(0xC3, 98);
    n.backend_mut().inbox.push_back(payload.clone());
    assert!(n.process_queue(RX_QUEUE, &mut queue, &mem).unwrap());
    assert_eq!(ring.used(&mem), vec![(0, 12 + 98)]);
    assert_eq!(
        read(&mem, 0x10000, 12),
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
    );
    assert_eq!(read(&mem, 0x20000, 98), payload);
    assert_eq!(n.stats().rx_frames, 1);
}

#[test]
fn frames_wait_on_the_host_while_the_guest_has_no_buffers() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0x1000, 16);
    let mut queue = ring.queue();
    let mut n = net();
    n.backend_mut().inbox.push_back(frame(1, 60));
    n.backend_mut().inbox.push_back(frame(2, 60));
    assert!(!n.process_queue(RX_QUEUE, &mut queue, &mem).unwrap());
    assert_eq!(n.backend_mut().inbox.len(), 2, "nothing consumed");
    ring.add_chain(&mem, &[(0x10000, 2048, WRITE)]);
    assert!(n.process_queue(RX_QUEUE, &mut queue, &mem).unwrap());
    assert_eq!(n.backend_mut().inbox.len(), 1);
    // Legacy header: 10 bytes, then the first frame.
    assert_eq!(ring.used(&mem), vec![(0, 70)]);
    assert_eq!(read(&mem, 0x10000 + 10, 60), frame(1, 60));
}

#[test]
fn small_receive_buffers_truncate_and_huge_transmits_drop() {
    let mem = memory();
    let mut ring = Ring::new(&mem, 0x1000, 16);
    ring.add_chain(&mem, &[(0x10000, 30, WRITE)]);
    let mut queue = ring.queue();
    let mut n = net();
    n.backend_mut().inbox.push_back(frame(3, 100));
    assert!(n.process_queue(RX_QUEUE, &mut queue, &mem).unwrap());
    assert_eq!(ring.used(&mem), vec![(0, 30)]);
    assert_eq!(n.stats().rx_truncated, 1);

    let mut ring = Ring::new(&mem, 0x1000, 16);
    // Two 64 KiB buffers: more than any frame.
    ring.add_chain(&mem, &[(0x10000, 0x10000, NEXT), (0x20000, 0x10000, 0)]);
    let mut queue = ring.queue();
    assert!(n.process_queue(TX_QUEUE, &mut queue, &mem).unwrap());
    assert_eq!(ring.used(&mem), vec![(0, 0)], "returned to the guest");
    assert!(n.backend_mut().sent.is_empty());
    assert_eq!(n.stats().tx_dropped, 1);
}

#[test]
fn bad_buffers_are_errors_not_crashes() {
    let mem = memory();
    for (queue_index, bad) in [
        (TX_QUEUE, (0xF_FFF0, 0x100, 0)),
        (TX_QUEUE, (u64::MAX - 8, 0x100, 0)),
        (RX_QUEUE, (0x8000_0000, 2048, WRITE)),
        (RX_QUEUE, (0x10000, 2048, 0)),
    ] {
        let mut ring = Ring::new(&mem, 0x1000, 16);
        ring.add_chain(&mem, &[bad]);
        let mut queue = ring.queue();
        let mut n = net();
        n.backend_mut().inbox.push_back(frame(4, 60));
        assert!(
            n.process_queue(queue_index, &mut queue, &mem).is_err(),
            "{bad:x?}"
        );
    }
}

/// Polls `done` for up to 10 s (the network threads move frames asynchronously).
#[cfg(target_os = "linux")]
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    use std::time::{Duration, Instant};
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
#[cfg(target_os = "linux")]
mod thread {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::devices::bus::lock;
    use crate::devices::irq::test_util::RecordingLine;
    use crate::devices::pci::msix::tests::RecordingMsi;
    use crate::devices::pci::PciDevice;
    use crate::devices::virtio::pci::{VirtioPci, VirtioPciResources, MODERN_BAR};
    use crate::devices::virtio::queue_worker::Backend;
    use crate::devices::virtio::STATUS_DRIVER;
    use crate::devices::virtio::{STATUS_ACKNOWLEDGE, STATUS_DRIVER_OK, STATUS_FEATURES_OK};

    /// A datagram socket keeps frame boundaries, like a tap.
    struct Datagrams(UnixDatagram);
    impl NetBackend for Datagrams {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.0.send(frame).map(|_| ())
        }
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
    }

    fn w(dev: &Mutex<VirtioPci<VirtioNet<Datagrams>>>, offset: u64, value: u32, len: usize) {
        lock(dev).write_bar(MODERN_BAR, offset, &value.to_le_bytes()[..len]);
    }

    #[test]
    fn the_thread_moves_frames_both_ways_and_raises_intx() {
        let mem = memory();
        let (host, device_end) = UnixDatagram::pair().unwrap();
        device_end.set_nonblocking(true).unwrap();
        let fd = device_end.as_raw_fd();
        let line = Arc::new(RecordingLine {
            gsi: 18,
            ..Default::default()
        });
        let pci = VirtioPci::new(
            VirtioNet::new(Datagrams(device_end), MAC, Some(Backend::Fd(fd))).unwrap(),
            VirtioPciResources {
                memory: mem.clone(),
                msi: Arc::new(RecordingMsi::default()),
                intx: line.clone(),
                single_msi: false,
            },
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(pci));

        let mut rx = Ring::new(&mem, 0x1000, 16);
        let mut tx = Ring::new(&mem, 0x8000, 16);
        w(&dev, 0x14, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        w(&dev, 0x08, 1, 4);
        w(&dev, 0x0C, 1, 4); // VERSION_1
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&dev, 0x14, u32::from(s), 1);
        for (index, ring) in [(0u32, &rx), (1, &tx)] {
            w(&dev, 0x16, index, 2);
            w(&dev, 0x18, u32::from(ring.size), 2);
            w(&dev, 0x20, ring.desc as u32, 4);
            w(&dev, 0x28, ring.avail as u32, 4);
            w(&dev, 0x30, ring.used as u32, 4);
            w(&dev, 0x1C, 1, 2);
        }
        w(&dev, 0x14, u32::from(s | STATUS_DRIVER_OK), 1);

        // Host to guest: the frame arrives before the guest posts a buffer.
        let inbound = frame(0x77, 64);
        host.send(&inbound).unwrap();
        rx.add_chain(&mem, &[(0x20000, 2048, WRITE)]);
        w(&dev, 0x3000, 0, 2); // receive doorbell
        wait_for("receive", || !rx.used(&mem).is_empty());
        assert_eq!(rx.used(&mem), vec![(0, 12 + 64)]);
        assert_eq!(read(&mem, 0x20000 + 12, 64), inbound);
        wait_for("INTx", || !line.levels.lock().unwrap().is_empty());

        // A second frame with a buffer already waiting: the back end's readiness moves it.
        rx.add_chain(&mem, &[(0x30000, 2048, WRITE)]);
        w(&dev, 0x3000, 0, 2);
        host.send(&frame(0x66, 80)).unwrap();
        wait_for("second receive", || rx.used(&mem).len() == 2);
        assert_eq!(read(&mem, 0x30000 + 12, 80), frame(0x66, 80));

        // Guest to host.
        let outbound = frame(0x99, 60);
        mem.write_slice(&[0u8; 12], GuestAddress(0x40000)).unwrap();
        mem.write_slice(&outbound, GuestAddress(0x4000C)).unwrap();
        tx.add_chain(&mem, &[(0x40000, 72, 0)]);
        w(&dev, 0x3004, 1, 2); // transmit doorbell
        let mut got = [0u8; 2048];
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &outbound[..]);
        wait_for("transmit used", || tx.used(&mem).len() == 1);
        // A reset stops the thread and gives the device its state back.
        w(&dev, 0x14, 0, 1);
        assert_eq!(lock(&dev).device().stats().map(|s| s.tx_frames), Some(1));
    }
}
