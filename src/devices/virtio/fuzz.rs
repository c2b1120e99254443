//! Fuzz entry point for the virtqueue walk every virtio device runs on a doorbell: a ring the
//! guest configured any way it likes, over guest memory it filled any way it likes.
//!
//! The devices are the real ones (virtio-rnd, virtio-net over an in-memory back end, and
//! virtio-blk's chain collection followed by request execution on an in-memory disk), so a
//! panic or an out-of-bounds host access under the fuzzer's sanitizer is a bug a guest could
//! trigger. Guest memory is reached only through vm-memory, which bounds-checks every access:
//! ring addresses are deliberately allowed to point past the end of RAM.

use std::collections::VecDeque;
use std::io;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::blk::BlkJob;
use super::net::{NetQueues, QUEUE_SIZE as NET_QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use super::queue_worker::VirtioQueues;
use super::rnd::{EntropyQueue, QUEUE_SIZE as RND_QUEUE_SIZE};
use super::QueueError;
use crate::block::MemDisk;
use crate::devices::virtio_blk_req;
use crate::memory::GuestMemory;
use crate::net::{MacAddr, NetBackend};

/// Guest RAM of the fuzzed machine; ring addresses reach up to 1 MiB, well past it.
const MEMORY_SIZE: usize = 64 * 1024;
/// Input bytes before the memory image (see [`fuzz_virtqueue`]).
const HEADER_LEN: usize = 12;

/// Frames the fuzzed receive queue is offered, then none.
struct ScriptedNet {
    inbox: VecDeque<usize>,
}

impl NetBackend for ScriptedNet {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = self.inbox.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        let n = len.min(buf.len());
        buf[..n].fill(0xA5);
        Ok(n)
    }
}

/// The ring configuration decoded from the input's first [`HEADER_LEN`] bytes.
struct RingSetup {
    device: u8,
    event_idx: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    next_used: u16,
}

impl RingSetup {
    fn decode(header: &[u8; HEADER_LEN]) -> Self {
        let word = |i: usize| u16::from_le_bytes([header[i], header[i + 1]]);
        RingSetup {
            device: header[0] % 4,
            event_idx: header[0] & 0x80 != 0,
            // Sizes 1..=1024 and, one time in 12, a size that is not a power of two.
            size: match header[1] % 12 {
                11 => u16::from(header[1]) | 1,
                exp => 1 << exp,
            },
            // Alignments as the spec requires; addresses up to 1 MiB, past the 64 KiB of RAM.
            desc: u64::from(word(2)) * 16,
            avail: u64::from(word(4)) * 2,
            used: u64::from(word(6)) * 4,
            next_avail: word(8),
            next_used: word(10),
        }
    }

    fn queue(&self, max_size: u16) -> Option<Queue> {
        let mut queue = Queue::new(max_size).ok()?;
        // An invalid size is refused and the queue keeps its maximum, as with a real driver.
        queue.set_size(self.size.min(max_size));
        queue.set_desc_table_address(Some(self.desc as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail as u32), Some(0));
        queue.set_used_ring_address(Some(self.used as u32), Some(0));
        queue.set_next_avail(self.next_avail);
        queue.set_next_used(self.next_used);
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        Some(queue)
    }
}

/// Input: byte 0 picks the device (low 2 bits: rnd, net receive, net transmit, blk) and
/// event index (bit 7); byte 1 the queue size; then u16 LE each: descriptor table / 16,
/// available ring / 2, used ring / 4, next available index, next used index. The rest is
/// copied to guest address 0. Errors are fine (the transport would set NEEDS_RESET); only a
/// panic or a host memory error is a finding.
pub fn fuzz_virtqueue(data: &[u8]) {
    let Some((header, image)) = data.split_first_chunk::<HEADER_LEN>() else {
        return;
    };
    let setup = RingSetup::decode(header);
    let Ok(memory) = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]) else {
        return;
    };
    let len = image.len().min(MEMORY_SIZE);
    let _ = memory.write_slice(&image[..len], GuestAddress(0));
    let _ = match setup.device {
        0 => serve(&mut EntropyQueue, 0, RND_QUEUE_SIZE, &setup, &memory),
        1 | 2 => {
            let inbox = [60, 1514, 0, usize::from(setup.next_used)].into();
            let mut net = NetQueues::new(ScriptedNet { inbox }, MacAddr([2, 0, 0, 0, 0, 1]));
            // Bit 7 of byte 11 lands on MRG_RXBUF: both virtio-net header lengths get fuzzed.
            net.set_features(u64::from(header[11]) << 8);
            let index = if setup.device == 1 {
                RX_QUEUE
            } else {
                TX_QUEUE
            };
            serve(&mut net, index, NET_QUEUE_SIZE, &setup, &memory)
        }
        _ => serve_blk(&setup, &memory),
    };
}

/// What a device's thread does on a doorbell: process, then decide on an interrupt.
fn serve(
    device: &mut dyn VirtioQueues,
    index: usize,
    max_size: u16,
    setup: &RingSetup,
    memory: &GuestMemory,
) -> Result<bool, QueueError> {
    let Some(mut queue) = setup.queue(max_size) else {
        return Ok(false);
    };
    let used = device.process_queue(index, &mut queue, memory)?;
    Ok(used && queue.needs_notification(memory)?)
}

/// virtio-blk's doorbell walk and its I/O thread's work, on one thread: collect each chain
/// as the device does, execute it, and complete it.
fn serve_blk(setup: &RingSetup, memory: &GuestMemory) -> Result<bool, QueueError> {
    let Some(mut queue) = setup.queue(super::blk::QUEUE_SIZE) else {
        return Ok(false);
    };
    let disk = MemDisk::new(32 * 1024, 512, setup.next_avail % 2 == 1);
    for _ in 0..queue.size() {
        let Some(chain) = queue.iter(memory)?.next() else {
            break;
        };
        let job = BlkJob::collect(chain.head_index(), chain);
        let completion = virtio_blk_req::execute(memory, job.chain(), &disk)?;
        queue.add_used(memory, job.head(), completion.written)?;
    }
    Ok(queue.needs_notification(memory)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::pci::test_ring::Ring;

    /// A fixed pseudo-random sequence (xorshift), so the test is repeatable.
    fn noise(seed: &mut u64, out: &mut [u8]) {
        for byte in out {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            *byte = *seed as u8;
        }
    }

    #[test]
    fn random_rings_never_panic() {
        let mut seed = 0x9E37_79B9_7F4A_7C15;
        let mut input = vec![0u8; HEADER_LEN + 4096];
        for round in 0..2000 {
            noise(&mut seed, &mut input);
            // Keep the rings inside RAM half the time so chains are actually walked.
            if round % 2 == 0 {
                input[3] = 0;
                input[5] &= 0x7F;
                input[7] &= 0x3F;
            }
            fuzz_virtqueue(&input);
        }
    }

    /// The input that describes `ring` (device `device`) over `memory`'s contents.
    fn input_for(ring: &Ring, device: u8, memory: &GuestMemory) -> Vec<u8> {
        let mut input = vec![device, ring.size.trailing_zeros() as u8];
        for word in [ring.desc / 16, ring.avail / 2, ring.used / 4, 0, 0] {
            input.extend_from_slice(&(word as u16).to_le_bytes());
        }
        let mut image = vec![0u8; MEMORY_SIZE];
        memory.read_slice(&mut image, GuestAddress(0)).unwrap();
        input.extend_from_slice(&image);
        input
    }

    /// The decoding really builds the ring it describes: an entropy request at the layout
    /// the test ring uses is served, so the random test above exercises real walks.
    #[test]
    fn header_describes_a_working_ring() {
        let memory = GuestMemory::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap();
        let mut ring = Ring::new(&memory, 0, 16);
        ring.add_chain(&memory, &[(0x8000, 32, 2)]);
        let input = input_for(&ring, 0, &memory);
        let header: &[u8; HEADER_LEN] = input[..HEADER_LEN].try_into().unwrap();
        let setup = RingSetup::decode(header);
        assert_eq!(setup.size, 16);
        assert!(serve(&mut EntropyQueue, 0, RND_QUEUE_SIZE, &setup, &memory).is_ok());
        assert_eq!(ring.used(&memory), vec![(0, 32)]);
    }
}
