//! virtio-blk (`-s N,virtio-blk,PATH[,nocache][,sync|direct][,ro][,sectorsize=L[/P]]`).
//!
//! The doorbell only wakes the device's thread ([`QueueWorker`]); a vCPU never waits for the
//! disk. That thread walks each descriptor chain into a small fixed-size job (no
//! allocation), runs the request ([`virtio_blk_req::execute`]), and completes it under the
//! queue's own lock, never the transport's.
//!
//! A reset stops the thread after the request it is running (between two requests it
//! checks the stop signal), so no request touches guest memory or the used ring once the
//! driver sees the reset done; a pause stops it the same way and leaves the rest queued.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::pci::{VirtioPci, VirtioPciError, VirtioPciResources};
use super::queue_worker::{QueueWorker, VirtioQueues};
use super::{ActivateError, Activation, QueueError, VirtioDevice};
use crate::block::{BlockBackend, BlockError, BlockOptions};
use crate::devices::event_loop::StopSignal;
use crate::devices::virtio_blk_req::{self, GuestBuffer, CONFIG_SPACE_LEN};
use crate::devices::{BuiltDevice, DeviceHandle};
use crate::memory::GuestMemory;

const DEVICE_TYPE_BLOCK: u16 = 2;
/// Ring size, as bhyve's virtio-blk.
pub const QUEUE_SIZE: u16 = 128;
/// Buffers one job carries: the advertised seg_max (queue size - 2) plus header and status.
const MAX_BUFFERS: usize = QUEUE_SIZE as usize;
/// PCI class 0x01 (mass storage), subclass 0x80 (other), as bhyve.
const PCI_CLASS_STORAGE_OTHER: (u8, u8, u8) = (0x01, 0x80, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum VirtioBlkError {
    #[error("virtio-blk: {0}")]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Transport(#[from] VirtioPciError),
    #[error("virtio-blk: cannot create its thread's events: {0}")]
    Worker(std::io::Error),
}

/// One request: its chain's buffers, collected without allocating.
#[derive(Clone, Copy)]
pub struct BlkJob {
    head: u16,
    count: usize,
    buffers: [GuestBuffer; MAX_BUFFERS],
}

impl BlkJob {
    fn new(head: u16) -> Self {
        BlkJob {
            head,
            count: 0,
            buffers: [GuestBuffer {
                addr: 0,
                len: 0,
                writable: false,
            }; MAX_BUFFERS],
        }
    }

    /// Adds a buffer. A chain longer than seg_max allows keeps only its last buffer (the
    /// status byte), so the request fails with IOERR instead of silently losing data.
    fn push(&mut self, buffer: GuestBuffer, overflowed: &mut bool) {
        if *overflowed || self.count == MAX_BUFFERS {
            *overflowed = true;
            self.buffers[0] = buffer;
            self.count = 1;
        } else {
            self.buffers[self.count] = buffer;
            self.count += 1;
        }
    }

    /// The job for the chain at `head`: its buffers in order (the walk the fuzz target runs).
    pub(crate) fn collect(
        head: u16,
        chain: impl IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    ) -> Self {
        let mut job = BlkJob::new(head);
        let mut overflowed = false;
        for desc in chain {
            let buffer = GuestBuffer {
                addr: desc.addr().0,
                len: desc.len(),
                writable: desc.is_write_only(),
            };
            job.push(buffer, &mut overflowed);
        }
        job
    }

    pub(crate) fn head(&self) -> u16 {
        self.head
    }

    pub(crate) fn chain(&self) -> &[GuestBuffer] {
        &self.buffers[..self.count]
    }
}

/// The device: its configuration space, and the worker that serves its queue.
pub struct VirtioBlk {
    disk: Arc<dyn BlockBackend>,
    config: [u8; CONFIG_SPACE_LEN],
    features: u64,
    worker: QueueWorker<BlkQueue>,
}

pub type SharedVirtioBlk = Arc<Mutex<VirtioPci<VirtioBlk>>>;

impl VirtioBlk {
    pub fn new(disk: Arc<dyn BlockBackend>) -> Result<Self, VirtioBlkError> {
        let queue = BlkQueue {
            disk: disk.clone(),
            stop: StopSignal::default(),
        };
        Ok(VirtioBlk {
            config: virtio_blk_req::config_space(disk.as_ref(), QUEUE_SIZE),
            features: virtio_blk_req::device_features(disk.as_ref()),
            disk,
            worker: QueueWorker::new("virtio-blk", queue).map_err(VirtioBlkError::Worker)?,
        })
    }

    pub fn disk(&self) -> &Arc<dyn BlockBackend> {
        &self.disk
    }

    /// Opens the image `options` names and builds the PCI function. A missing or
    /// unreadable image fails here, naming the path.
    pub fn build(
        options: &BlockOptions,
        transport: VirtioPciResources,
    ) -> Result<BuiltDevice, VirtioBlkError> {
        let disk = crate::block::open_image(options)?;
        let device = VirtioBlk::new(disk)?;
        let handle = device.worker.handle();
        Ok(BuiltDevice {
            function: Arc::new(Mutex::new(VirtioPci::new(device, transport)?)),
            handle: Some(handle),
        })
    }

    /// Builds the PCI function on `disk`, with the handle that pauses it.
    pub fn build_on(
        disk: Arc<dyn BlockBackend>,
        transport: VirtioPciResources,
    ) -> Result<(SharedVirtioBlk, Box<dyn DeviceHandle>), VirtioBlkError> {
        let device = VirtioBlk::new(disk)?;
        let handle = device.worker.handle();
        Ok((
            Arc::new(Mutex::new(VirtioPci::new(device, transport)?)),
            handle,
        ))
    }
}

/// What the device's thread runs: the disk's requests.
pub struct BlkQueue {
    disk: Arc<dyn BlockBackend>,
    stop: StopSignal,
}

impl VirtioQueues for BlkQueue {
    fn set_stop_signal(&mut self, stop: StopSignal) {
        self.stop = stop;
    }

    /// Runs up to one ring's worth of requests, each completed as soon as it is done; stops
    /// early (leaving the rest in the ring) when a pause or a reset waits.
    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        let mut budget = queue.size();
        loop {
            while budget > 0 {
                if self.stop.requested() {
                    return Ok(used);
                }
                let Some(chain) = queue.iter(memory)?.next() else {
                    break;
                };
                budget -= 1;
                let job = BlkJob::collect(chain.head_index(), chain);
                let completion = virtio_blk_req::execute(memory, job.chain(), self.disk.as_ref())?;
                queue.add_used(memory, job.head(), completion.written)?;
                used = true;
            }
            if budget == 0 {
                // The ring's worth is done; the loop comes back for the rest at once.
                return Ok(used);
            }
            // With event index, this also tells the driver to ring for the next request.
            if !queue.enable_notification(memory)? {
                return Ok(used);
            }
        }
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_BLOCK
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        PCI_CLASS_STORAGE_OTHER
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn config_size(&self) -> u64 {
        CONFIG_SPACE_LEN as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(bytes) = self.config.get(start..) {
            let n = bytes.len().min(data.len());
            data[..n].copy_from_slice(&bytes[..n]);
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker.activate(activation)
    }

    /// Waits for the thread to finish its running request and stop (no sleep loop: a
    /// join on the thread's exit).
    fn reset(&mut self) {
        self.worker.reset();
    }

    fn handle(&self) -> Option<Box<dyn DeviceHandle>> {
        Some(self.worker.handle())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDisk;
    use crate::devices::bus::lock;
    use crate::devices::irq::test_util::RecordingLine;
    use crate::devices::pci::msix::tests::RecordingMsi;
    use crate::devices::pci::PciDevice;
    use crate::devices::virtio::pci::test_ring::Ring;
    use crate::devices::virtio::pci::{LEGACY_BAR, MODERN_BAR};
    use crate::devices::virtio::{
        STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_NEEDS_RESET,
    };
    use crate::devices::virtio_blk_req::{
        VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress, VolatileSlice};

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const HEADER: u64 = 0x20000;
    const DATA: u64 = 0x21000;
    const STATUS: u64 = 0x22000;

    struct Rig {
        dev: SharedVirtioBlk,
        handle: Box<dyn DeviceHandle>,
        disk: Arc<MemDisk>,
        mem: GuestMemory,
        line: Arc<RecordingLine>,
    }

    fn rig(read_only: bool) -> Rig {
        let disk = Arc::new(MemDisk::new(64 * 1024, 512, read_only));
        rig_on(disk.clone(), disk)
    }

    /// A device on `backend` (whose contents `disk` shows).
    fn rig_on(backend: Arc<dyn BlockBackend>, disk: Arc<MemDisk>) -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let line = Arc::new(RecordingLine {
            gsi: 21,
            ..Default::default()
        });
        let (dev, handle) = VirtioBlk::build_on(
            backend,
            VirtioPciResources {
                memory: mem.clone(),
                msi: Arc::new(RecordingMsi::default()),
                intx: line.clone(),
                single_msi: false,
            },
        )
        .unwrap();
        Rig {
            dev,
            handle,
            disk,
            mem,
            line,
        }
    }

    /// A disk whose reads wait until the test opens the gate.
    struct GatedDisk {
        inner: Arc<MemDisk>,
        open: AtomicBool,
        entered: AtomicU32,
        finished: AtomicU32,
    }

    impl GatedDisk {
        fn new(inner: Arc<MemDisk>) -> Arc<Self> {
            Arc::new(GatedDisk {
                inner,
                open: AtomicBool::new(false),
                entered: AtomicU32::new(0),
                finished: AtomicU32::new(0),
            })
        }
    }

    impl BlockBackend for GatedDisk {
        fn size(&self) -> u64 {
            self.inner.size()
        }
        fn logical_sector_size(&self) -> u32 {
            self.inner.logical_sector_size()
        }
        fn physical_sector_size(&self) -> u32 {
            self.inner.physical_sector_size()
        }
        fn is_read_only(&self) -> bool {
            false
        }
        fn serial(&self) -> &[u8; crate::block::serial::SERIAL_LEN] {
            self.inner.serial()
        }
        fn read_to(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
            self.entered.fetch_add(1, Ordering::SeqCst);
            while !self.open.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let result = self.inner.read_to(offset, buf);
            self.finished.fetch_add(1, Ordering::SeqCst);
            result
        }
        fn write_from(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
            self.inner.write_from(offset, buf)
        }
        fn flush(&self) -> Result<(), BlockError> {
            self.inner.flush()
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.inner.discard(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.inner.write_zeroes(offset, len)
        }
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queues an IN request for sector `n` with its own header and status byte.
    fn add_read(r: &Rig, ring: &mut Ring, n: u64) {
        let header = 0x30000 + 32 * n;
        r.mem
            .write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
            .unwrap();
        r.mem.write_obj(n, GuestAddress(header + 8)).unwrap();
        ring.add_chain(
            &r.mem,
            &[
                (header, 16, NEXT),
                (DATA + 512 * n, 512, NEXT | WRITE),
                (header + 16, 1, WRITE),
            ],
        );
    }

    #[test]
    fn a_pause_in_the_middle_of_io_loses_no_request() {
        let mem_disk = Arc::new(MemDisk::new(64 * 1024, 512, false));
        let gated = GatedDisk::new(mem_disk.clone());
        let mut r = rig_on(gated.clone(), mem_disk);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        for n in 0..5 {
            add_read(&r, &mut ring, n);
        }
        r.io_w(0x10, 0, 2);
        wait_until("the first read", || {
            gated.entered.load(Ordering::SeqCst) == 1
        });
        // Pause while that read runs: the pause returns once it is done, and nothing more
        // runs until the resume.
        let opener = {
            let gated = gated.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                gated.open.store(true, Ordering::SeqCst);
            })
        };
        r.handle.pause();
        assert_eq!(
            gated.finished.load(Ordering::SeqCst),
            1,
            "the pause returned before the running read finished"
        );
        opener.join().unwrap();
        // More requests and a doorbell while paused: they wait.
        for n in 5..8 {
            add_read(&r, &mut ring, n);
        }
        r.io_w(0x10, 0, 2);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(gated.entered.load(Ordering::SeqCst), 1, "ran while paused");
        assert_eq!(ring.used(&r.mem).len(), 1);
        r.handle.resume();
        wait_until("all eight", || ring.used(&r.mem).len() == 8);
        let mut heads: Vec<u32> = ring.used(&r.mem).iter().map(|u| u.0).collect();
        heads.sort();
        assert_eq!(heads, (0..8).map(|n| 3 * n).collect::<Vec<u32>>());
        for n in 0..8u64 {
            let status = r.mem.read_obj::<u8>(GuestAddress(0x30000 + 32 * n + 16));
            assert_eq!(status.unwrap(), VIRTIO_BLK_S_OK, "request {n}");
        }
    }

    #[test]
    fn reset_waits_for_the_running_request_and_runs_no_other() {
        let mem_disk = Arc::new(MemDisk::new(64 * 1024, 512, false));
        let gated = GatedDisk::new(mem_disk.clone());
        let r = rig_on(gated.clone(), mem_disk);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        add_read(&r, &mut ring, 0);
        add_read(&r, &mut ring, 1);
        r.io_w(0x10, 0, 2);
        wait_until("the first read", || {
            gated.entered.load(Ordering::SeqCst) == 1
        });
        let opener = {
            let gated = gated.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                gated.open.store(true, Ordering::SeqCst);
            })
        };
        r.io_w(0x12, 0, 1);
        assert_eq!(
            gated.finished.load(Ordering::SeqCst),
            1,
            "the reset returned before the running read finished"
        );
        opener.join().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            ring.used(&r.mem).len() <= 1,
            "a request ran after the reset"
        );
        assert_eq!(
            gated.entered.load(Ordering::SeqCst),
            1,
            "the queued request ran after the reset"
        );
        let last_level = r.line.levels.lock().unwrap().last().copied();
        assert!(!last_level.unwrap_or(false), "INTx left high by a reset");
    }

    impl Rig {
        fn io_w(&self, offset: u64, value: u32, len: usize) {
            lock(&self.dev).write_bar(LEGACY_BAR, offset, &value.to_le_bytes()[..len]);
        }
        fn io_r(&self, offset: u64, len: usize) -> u32 {
            let mut d = [0u8; 4];
            lock(&self.dev).read_bar(LEGACY_BAR, offset, &mut d[..len]);
            u32::from_le_bytes(d)
        }
        fn mem_r(&self, offset: u64, len: usize) -> u32 {
            let mut d = [0u8; 4];
            lock(&self.dev).read_bar(MODERN_BAR, offset, &mut d[..len]);
            u32::from_le_bytes(d)
        }
        /// Legacy bring-up of the queue on `ring` (page aligned).
        fn legacy_setup(&self, ring: &Ring) {
            self.legacy_setup_with(ring, 0);
        }
        fn legacy_setup_with(&self, ring: &Ring, features: u32) {
            self.io_w(0x12, u32::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
            self.io_w(0x04, features, 4);
            self.io_w(0x0E, 0, 2);
            self.io_w(0x08, (ring.desc >> 12) as u32, 4);
            let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK;
            self.io_w(0x12, u32::from(ok), 1);
        }
        /// Queues header + data + status and rings; waits for the used entry.
        fn request(&self, ring: &mut Ring, kind: u32, sector: u64, data_len: u32) -> (u8, u32) {
            self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
            self.mem
                .write_obj(sector, GuestAddress(HEADER + 8))
                .unwrap();
            self.mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
            let data_flags = if kind == VIRTIO_BLK_T_OUT {
                NEXT
            } else {
                NEXT | WRITE
            };
            let before = ring.used(&self.mem).len();
            let mut chain = vec![(HEADER, 16, NEXT)];
            if data_len > 0 {
                chain.push((DATA, data_len, data_flags));
            }
            chain.push((STATUS, 1, WRITE));
            ring.add_chain(&self.mem, &chain);
            self.io_w(0x10, 0, 2);
            let deadline = Instant::now() + Duration::from_secs(5);
            while ring.used(&self.mem).len() == before {
                assert!(Instant::now() < deadline, "no completion");
                std::thread::sleep(Duration::from_millis(1));
            }
            let used = ring.used(&self.mem)[before];
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), used.1)
        }
    }

    #[test]
    fn config_space_and_features_describe_the_disk() {
        let r = rig(true);
        let features = r.io_r(0x00, 4);
        assert_ne!(features & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(features & 1 << 9, 0, "FLUSH");
        // Legacy config at 0x14 (no MSI-X): capacity in 512-byte sectors, blk_size at 20.
        assert_eq!(r.io_r(0x14, 4), 128);
        assert_eq!(r.io_r(0x18, 4), 0);
        assert_eq!(r.io_r(0x14 + 20, 4), 512);
        assert_eq!(r.io_r(0x14 + 12, 4), u32::from(QUEUE_SIZE) - 2, "seg_max");
        // Modern device config, and reads past its end are zero.
        assert_eq!(r.mem_r(0x2000, 4), 128);
        assert_eq!(r.mem_r(0x2000 + 58, 4), 0);
        let mut d = [0xAAu8; 4];
        lock(&r.dev).device().read_config(u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn requests_complete_from_the_worker_with_intx() {
        let r = rig(false);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        r.mem
            .write_slice(&[0x5A; 1024], GuestAddress(DATA))
            .unwrap();
        assert_eq!(
            r.request(&mut ring, VIRTIO_BLK_T_OUT, 2, 1024),
            (VIRTIO_BLK_S_OK, 1)
        );
        assert_eq!(&r.disk.contents()[1024..2048], &[0x5A; 1024][..]);
        r.mem.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(&mut ring, VIRTIO_BLK_T_IN, 2, 512),
            (VIRTIO_BLK_S_OK, 513)
        );
        let mut back = [0u8; 512];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0x5A; 512]);
        assert_eq!(
            r.request(&mut ring, VIRTIO_BLK_T_GET_ID, 0, 20),
            (VIRTIO_BLK_S_OK, 21)
        );
        assert_eq!(r.line.levels.lock().unwrap().first(), Some(&true));
        assert_eq!(r.io_r(0x13, 1), 1, "ISR queue bit");
    }

    #[test]
    fn with_event_index_the_driver_is_asked_to_ring_for_the_next_request() {
        let r = rig(false);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup_with(&ring, crate::devices::virtio::F_RING_EVENT_IDX as u32);
        let avail_event = GuestAddress(ring.used + 4 + 8 * u64::from(QUEUE_SIZE));
        for n in 1..=3u16 {
            r.request(&mut ring, VIRTIO_BLK_T_IN, 0, 512);
            // A driver only rings when it moves its index past avail_event: it must track
            // what the device has taken, or the driver would stop ringing.
            assert_eq!(r.mem.read_obj::<u16>(avail_event).unwrap(), n);
        }
    }

    #[test]
    fn read_only_disk_rejects_writes() {
        let r = rig(true);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        r.mem.write_slice(&[1; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(
            r.request(&mut ring, VIRTIO_BLK_T_OUT, 0, 512).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(r.disk.contents(), vec![0; 64 * 1024]);
    }

    #[test]
    fn requests_over_many_doorbells_and_ring_wraps_all_complete() {
        let r = rig(false);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        const BATCH: u64 = 32;
        for i in 0..3 * u64::from(QUEUE_SIZE) {
            let header = 0x40000 + 32 * (i % BATCH);
            r.mem
                .write_obj(VIRTIO_BLK_T_IN, GuestAddress(header))
                .unwrap();
            r.mem.write_obj(i % 128, GuestAddress(header + 8)).unwrap();
            let descs = [
                (header, 16, NEXT),
                (DATA, 512, NEXT | WRITE),
                (header + 16, 1, WRITE),
            ];
            let base = ((i % BATCH) * 3) as u16;
            for (k, d) in descs.iter().enumerate() {
                ring.write_desc(&r.mem, base + k as u16, *d, base + k as u16 + 1);
            }
            ring.publish(&r.mem, base);
            if (i + 1) % BATCH == 0 {
                r.io_w(0x10, 0, 2);
                let deadline = Instant::now() + Duration::from_secs(5);
                while (ring.used(&r.mem).len() as u64) < i + 1 {
                    assert!(Instant::now() < deadline, "stalled at {i}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        let used = ring.used(&r.mem);
        assert_eq!(used.len(), 3 * usize::from(QUEUE_SIZE));
        assert!(used.iter().all(|&(_, len)| len == 513));
    }

    #[test]
    fn a_chain_without_status_needs_reset_and_a_reset_restarts_the_device() {
        let r = rig(false);
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        ring.add_chain(&r.mem, &[(HEADER, 16, 0)]);
        r.io_w(0x10, 0, 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&r.dev).status() & STATUS_NEEDS_RESET == 0 {
            assert!(Instant::now() < deadline, "no needs-reset");
            std::thread::sleep(Duration::from_millis(1));
        }
        r.io_w(0x12, 0, 1);
        assert_eq!(lock(&r.dev).status(), 0);
        // After the reset the device works again.
        let mut ring = Ring::new(&r.mem, 0x4000, QUEUE_SIZE);
        r.legacy_setup(&ring);
        assert_eq!(
            r.request(&mut ring, VIRTIO_BLK_T_IN, 0, 512),
            (VIRTIO_BLK_S_OK, 513)
        );
    }

    #[test]
    fn a_missing_image_is_an_error_naming_it() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let err = VirtioBlk::build(
            &BlockOptions::parse("/nonexistent/xhyve-disk.img,ro").unwrap(),
            VirtioPciResources {
                memory: mem,
                msi: Arc::new(RecordingMsi::default()),
                intx: Arc::new(RecordingLine::default()),
                single_msi: false,
            },
        )
        .err()
        .unwrap();
        assert!(
            err.to_string().contains("\"/nonexistent/xhyve-disk.img\""),
            "{err}"
        );
    }

    #[test]
    fn overlong_chains_keep_only_the_status_buffer() {
        let mut job = BlkJob::new(7);
        let mut overflowed = false;
        for i in 0..=MAX_BUFFERS as u64 {
            job.push(
                GuestBuffer {
                    addr: i,
                    len: 1,
                    writable: true,
                },
                &mut overflowed,
            );
        }
        assert!(overflowed);
        assert_eq!(job.chain().len(), 1);
        assert_eq!(job.chain()[0].addr, MAX_BUFFERS as u64);
    }
}
