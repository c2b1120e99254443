//! virtio-rnd (`-s N,virtio-rnd`): an entropy source fed from the host's `getentropy`.
//!
//! Requests are served on the device's thread ([`QueueWorker`]), bounded so a guest cannot
//! hog it: at most [`BYTES_PER_CHAIN`] bytes per buffer chain and one pass over the queue
//! per notification.
//!
//! The smallest virtio device, and the pattern for new ones: a [`VirtioDevice`] that
//! describes itself and hands activation to a [`QueueWorker`], and a [`VirtioQueues`] that
//! serves one queue's buffers.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::pci::{VirtioPci, VirtioPciError, VirtioPciResources};
use super::queue_worker::{QueueWorker, VirtioQueues};
use super::{ActivateError, Activation, QueueError, VirtioDevice};
use crate::devices::{BuiltDevice, DeviceHandle};
use crate::memory::GuestMemory;

const DEVICE_TYPE_ENTROPY: u16 = 4;
/// bhyve's ring size for virtio-rnd.
pub const QUEUE_SIZE: u16 = 64;
/// Most bytes served per chain; virtio-rng drivers accept short answers.
pub const BYTES_PER_CHAIN: u32 = 4096;
/// `getentropy` serves at most 256 bytes per call.
const ENTROPY_CHUNK: usize = 256;

/// PCI class 0x10 (encryption/decryption controller), subclass 0x80 (other).
const PCI_CLASS_CRYPTO: (u8, u8, u8) = (0x10, 0x80, 0x00);

/// The device: no configuration, one queue, served by its worker.
pub struct VirtioRnd {
    worker: QueueWorker<EntropyQueue>,
}

/// What the device's thread does with the queue.
pub struct EntropyQueue;

impl VirtioRnd {
    pub fn new() -> std::io::Result<Self> {
        Ok(VirtioRnd {
            worker: QueueWorker::new("virtio-rnd", EntropyQueue)?,
        })
    }

    /// `-s N,virtio-rnd`: the PCI function and its pause handle.
    pub fn build(transport: VirtioPciResources) -> Result<BuiltDevice, VirtioPciError> {
        let rnd = VirtioRnd::new().map_err(VirtioPciError::Notifier)?;
        let handle = rnd.worker.handle();
        let function = VirtioPci::new(rnd, transport)?;
        Ok(BuiltDevice {
            function: std::sync::Arc::new(std::sync::Mutex::new(function)),
            handle: Some(handle),
        })
    }
}

/// Fills `len` bytes of guest memory at `addr` with host entropy.
fn fill_with_entropy(memory: &GuestMemory, addr: GuestAddress, len: u32) -> Result<(), QueueError> {
    let outside = || QueueError::OutsideRam {
        addr: addr.0,
        len: u64::from(len),
    };
    let mut buf = [0u8; ENTROPY_CHUNK];
    let mut done = 0usize;
    let total = len as usize;
    while done < total {
        let n = (total - done).min(ENTROPY_CHUNK);
        // SAFETY: `buf` is a valid, writable buffer of at least `n` (<= 256) bytes.
        let rc = unsafe { libc::getentropy(buf.as_mut_ptr().cast(), n) };
        if rc != 0 {
            return Err(QueueError::Entropy(std::io::Error::last_os_error()));
        }
        let at = addr.checked_add(done as u64).ok_or_else(outside)?;
        memory.write_slice(&buf[..n], at).map_err(|_| outside())?;
        done += n;
    }
    Ok(())
}

impl VirtioDevice for VirtioRnd {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE_ENTROPY
    }

    fn pci_class(&self) -> (u8, u8, u8) {
        PCI_CLASS_CRYPTO
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker.activate(activation)
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn handle(&self) -> Option<Box<dyn DeviceHandle>> {
        Some(self.worker.handle())
    }
}

impl VirtioQueues for EntropyQueue {
    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        // Bounded work per doorbell: one pass over the ring, plus one more if buffers arrived
        // while the driver's notifications were off.
        for _pass in 0..2 {
            for _ in 0..queue.size() {
                let Some(chain) = queue.iter(memory)?.next() else {
                    break;
                };
                let head = chain.head_index();
                let mut written = 0u32;
                for desc in chain {
                    if !desc.is_write_only() {
                        return Err(QueueError::NotWritable { head });
                    }
                    let len = desc.len().min(BYTES_PER_CHAIN - written);
                    fill_with_entropy(memory, desc.addr(), len)?;
                    written += len;
                    if written == BYTES_PER_CHAIN {
                        break;
                    }
                }
                queue.add_used(memory, head, written)?;
                used = true;
            }
            // With event index this publishes where the driver must ring next; without it, a
            // driver that negotiated event index would stop ringing after its first request.
            if !queue.enable_notification(memory)? {
                break;
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::pci::test_ring::Ring;

    const WRITE: u16 = 2;
    const NEXT: u16 = 1;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn fills_writable_buffers_with_entropy() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 16);
        ring.add_chain(&mem, &[(0x10000, 64, WRITE | NEXT), (0x20000, 32, WRITE)]);
        let mut queue = ring.queue();
        let mut rnd = EntropyQueue;
        assert!(rnd.process_queue(0, &mut queue, &mem).unwrap());
        assert_eq!(ring.used(&mem), vec![(0, 96)]);
        let mut a = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        assert!(a.iter().any(|&b| b != a[0]), "64 equal bytes: not entropy");
        assert!(
            !rnd.process_queue(0, &mut queue, &mem).unwrap(),
            "nothing new"
        );
    }

    #[test]
    fn tells_an_event_index_driver_where_to_ring_next() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 16);
        ring.add_chain(&mem, &[(0x10000, 16, WRITE)]);
        ring.add_chain(&mem, &[(0x11000, 16, WRITE)]);
        let mut queue = ring.queue();
        queue.set_event_idx(true);
        assert!(EntropyQueue.process_queue(0, &mut queue, &mem).unwrap());
        // avail_event sits after the used ring's entries.
        let avail_event: u16 = mem
            .read_obj(GuestAddress(ring.used + 4 + 8 * u64::from(ring.size)))
            .unwrap();
        assert_eq!(avail_event, 2, "the driver must ring for its third buffer");
    }

    #[test]
    fn huge_buffers_get_a_bounded_answer_and_zero_lengths_none() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 16);
        ring.add_chain(&mem, &[(0x10000, 0x8_0000, WRITE)]);
        ring.add_chain(&mem, &[(0x10000, 0, WRITE)]);
        let mut queue = ring.queue();
        assert!(EntropyQueue.process_queue(0, &mut queue, &mem).unwrap());
        assert_eq!(ring.used(&mem), vec![(0, BYTES_PER_CHAIN), (1, 0)]);
    }

    #[test]
    fn bad_buffers_are_errors_not_crashes() {
        let mem = memory();
        for bad in [
            (0xF_FFF0, 0x100, WRITE),     // runs off the end of RAM
            (u64::MAX - 8, 0x100, WRITE), // wraps
            (0x8000_0000, 16, WRITE),     // not RAM at all
            (0x10000, 16, 0),             // device-readable
        ] {
            let mut ring = Ring::new(&mem, 0x1000, 16);
            ring.add_chain(&mem, &[bad]);
            let mut queue = ring.queue();
            assert!(
                EntropyQueue.process_queue(0, &mut queue, &mem).is_err(),
                "{bad:x?}"
            );
        }
    }

    #[test]
    fn descriptor_loops_end() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 4);
        // Descriptor 0 chains to itself forever.
        ring.write_desc(&mem, 0, (0x10000, 8, WRITE | NEXT), 0);
        ring.publish(&mem, 0);
        let mut queue = ring.queue();
        assert!(EntropyQueue.process_queue(0, &mut queue, &mem).unwrap());
        let used = ring.used(&mem);
        assert_eq!(used.len(), 1);
        assert!(
            used[0].1 <= 4 * 8,
            "the walk stops after queue-size descriptors"
        );
    }

    #[test]
    fn indirect_descriptors_are_followed() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 4);
        // An indirect table of two writable descriptors at 0x30000.
        for (i, (addr, len)) in [(0x10000u64, 16u32), (0x20000, 8)].iter().enumerate() {
            let flags = WRITE | if i == 0 { NEXT } else { 0 };
            let entry = 0x30000 + 16 * i as u64;
            mem.write_obj(*addr, GuestAddress(entry)).unwrap();
            mem.write_obj(*len, GuestAddress(entry + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(entry + 12)).unwrap();
            mem.write_obj(1u16, GuestAddress(entry + 14)).unwrap();
        }
        ring.write_desc(&mem, 0, (0x30000, 32, 4), 0);
        ring.publish(&mem, 0);
        let mut queue = ring.queue();
        assert!(EntropyQueue.process_queue(0, &mut queue, &mem).unwrap());
        assert_eq!(ring.used(&mem), vec![(0, 24)]);
    }

    #[test]
    fn bogus_avail_index_is_an_error() {
        let mem = memory();
        let ring = Ring::new(&mem, 0x1000, 4);
        mem.write_obj(100u16, GuestAddress(ring.avail + 2)).unwrap();
        let mut queue = ring.queue();
        assert!(EntropyQueue.process_queue(0, &mut queue, &mem).is_err());
    }
}
