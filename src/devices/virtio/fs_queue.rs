//! Request/reply virtqueues, as virtio-9p and virtio-fs use them: each chain carries one
//! request in its device-readable buffers, followed by device-writable room for the reply.
//! A [`RequestServer`] (the 9P server, the 9P socket forwarder, the FUSE server) turns one
//! request into one reply; [`RequestQueue`] moves the bytes between guest memory and it.
//!
//! Never trusted: the chain's shape (a readable buffer after a writable one stops the device),
//! its addresses (outside RAM stops the device), the request's size (cut at the server's
//! limit: the server then sees a size field that does not match and answers with an error)
//! and the reply's room (a reply is cut to the buffers given; the used length says how much).

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::QueueError;
use crate::fs::{fuse, p9};

/// One request in, at most one reply out.
pub trait RequestServer: Send + 'static {
    /// The largest request worth reading (bytes).
    fn max_request(&self) -> usize;
    /// Serves `req`, appending the reply to `reply`. False: the request takes no reply.
    fn serve(&mut self, req: &[u8], reply: &mut Vec<u8>) -> bool;
}

impl RequestServer for p9::Server {
    fn max_request(&self) -> usize {
        self.msize() as usize
    }
    fn serve(&mut self, req: &[u8], reply: &mut Vec<u8>) -> bool {
        self.handle(req, reply);
        true
    }
}

impl RequestServer for p9::forward::Forwarder {
    fn max_request(&self) -> usize {
        p9::server::MAX_MSIZE as usize
    }
    fn serve(&mut self, req: &[u8], reply: &mut Vec<u8>) -> bool {
        if let Err(e) = self.handle(req, reply) {
            log::warn!("virtio-9p: {e}");
        }
        true
    }
}

impl RequestServer for fuse::Server {
    fn max_request(&self) -> usize {
        fuse::abi::IN_HEADER + 64 + fuse::server::MAX_WRITE as usize
    }
    fn serve(&mut self, req: &[u8], reply: &mut Vec<u8>) -> bool {
        self.handle(req, reply)
    }
}

/// Serves a request/reply queue with one server, reusing its buffers between chains.
pub struct RequestQueue<S: RequestServer> {
    pub server: S,
    req: Vec<u8>,
    reply: Vec<u8>,
    writable: Vec<(GuestAddress, u32)>,
}

impl<S: RequestServer> RequestQueue<S> {
    pub fn new(server: S) -> Self {
        RequestQueue {
            server,
            req: Vec::new(),
            reply: Vec::new(),
            writable: Vec::new(),
        }
    }

    /// Serves the queue's available chains: one pass over the ring, plus one more if buffers
    /// arrived while notifications were off. Returns whether any chain was used.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        for _pass in 0..2 {
            for _ in 0..queue.size() {
                let Some(chain) = queue.iter(mem)?.next() else {
                    break;
                };
                let head = chain.head_index();
                self.req.clear();
                self.writable.clear();
                let limit = self.server.max_request();
                for desc in chain {
                    let (addr, len) = (desc.addr(), desc.len());
                    let outside = || QueueError::OutsideRam {
                        addr: addr.0,
                        len: u64::from(len),
                    };
                    if desc.is_write_only() {
                        self.writable.push((addr, len));
                        continue;
                    }
                    if !self.writable.is_empty() {
                        return Err(QueueError::NotWritable { head });
                    }
                    // Past the limit the request is cut, and the server answers with an error.
                    let take = (len as usize).min(limit.saturating_sub(self.req.len()));
                    let at = self.req.len();
                    self.req.resize(at + take, 0);
                    mem.read_slice(&mut self.req[at..], addr)
                        .map_err(|_| outside())?;
                }
                self.reply.clear();
                let mut written = 0u32;
                if self.server.serve(&self.req, &mut self.reply) {
                    let mut rest = &self.reply[..];
                    for &(addr, len) in &self.writable {
                        if rest.is_empty() {
                            break;
                        }
                        let n = rest.len().min(len as usize);
                        mem.write_slice(&rest[..n], addr)
                            .map_err(|_| QueueError::OutsideRam {
                                addr: addr.0,
                                len: u64::from(len),
                            })?;
                        rest = &rest[n..];
                        written += n as u32;
                    }
                    if !rest.is_empty() {
                        log::debug!(
                            "virtio request queue: reply of {} bytes cut to {written}",
                            self.reply.len()
                        );
                    }
                }
                queue.add_used(mem, head, written)?;
                used = true;
            }
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::devices::virtio::pci::test_ring::Ring;
    use crate::fs::p9::wire::{split, Reader, Writer};
    use crate::fs::sandbox::Share;
    use crate::memory::GuestMemory as Mem;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    fn memory() -> Mem {
        Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn p9_msg(ty: u8, tag: u16, f: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut m = Vec::new();
        let mut w = Writer::new(&mut m, ty, tag);
        f(&mut w);
        w.finish();
        m
    }

    fn reply_at(mem: &Mem, addr: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn a_9p_session_over_an_in_memory_virtqueue() {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-vq9p-").unwrap();
        std::fs::write(tmp.as_path().join("hello"), b"hello from the host").unwrap();
        let mem = memory();
        let mut ring = Ring::new(&mem, 0x1000, 32);
        let mut q = RequestQueue::new(p9::Server::new(
            Share::new(tmp.as_path(), false).unwrap(),
            Default::default(),
        ));
        // Requests split across two readable buffers; replies across two writable ones.
        let msgs = [
            p9_msg(100, 0xffff, |w| {
                w.u32(512 * 1024).str(b"9P2000.L");
            }),
            p9_msg(104, 1, |w| {
                w.u32(0).u32(!0).str(b"").str(b"").u32(0);
            }),
            p9_msg(110, 2, |w| {
                w.u32(0).u32(1).u16(1).str(b"hello");
            }),
            p9_msg(12, 3, |w| {
                w.u32(1).u32(0);
            }),
            p9_msg(116, 4, |w| {
                w.u32(1).u64(6).u32(100);
            }),
        ];
        let mut replies = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let base = 0x100000 + i as u64 * 0x10000;
            mem.write_slice(m, GuestAddress(base)).unwrap();
            let cut = (m.len() / 2) as u32;
            ring.add_chain(
                &mem,
                &[
                    (base, cut, NEXT),
                    (base + u64::from(cut), m.len() as u32 - cut, NEXT),
                    (base + 0x8000, 9, WRITE | NEXT),
                    (base + 0x9000, 4096, WRITE),
                ],
            );
            replies.push(base);
        }
        let mut queue = ring.queue();
        assert!(q.process(&mut queue, &mem).unwrap());
        let used = ring.used(&mem);
        assert_eq!(used.len(), 5);
        let (_, len) = used[4];
        // The Rread reply, reassembled from its two buffers.
        let mut r = reply_at(&mem, replies[4] + 0x8000, 9);
        r.extend(reply_at(&mem, replies[4] + 0x9000, len - 9));
        let (ty, tag, body) = split(&r).unwrap();
        assert_eq!((ty, tag), (117, 4));
        let mut rd = Reader::new(body);
        assert_eq!(rd.u32().unwrap(), 13);
        assert_eq!(rd.rest(), b"from the host");
        assert!(!q.process(&mut queue, &mem).unwrap(), "nothing new");
    }

    #[test]
    fn bad_chains_stop_the_device_and_short_room_cuts_the_reply() {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-vq9p-").unwrap();
        let mem = memory();
        let mk = || {
            RequestQueue::new(p9::Server::new(
                Share::new(tmp.as_path(), false).unwrap(),
                Default::default(),
            ))
        };
        let v = p9_msg(100, 1, |w| {
            w.u32(8192).str(b"9P2000.L");
        });
        mem.write_slice(&v, GuestAddress(0x100000)).unwrap();
        // Readable after writable.
        let mut ring = Ring::new(&mem, 0x1000, 8);
        ring.add_chain(
            &mem,
            &[
                (0x100000, v.len() as u32, NEXT),
                (0x200000, 64, WRITE | NEXT),
                (0x100000, 4, 0),
            ],
        );
        assert!(matches!(
            mk().process(&mut ring.queue(), &mem),
            Err(QueueError::NotWritable { .. })
        ));
        // A request outside RAM.
        let mut ring = Ring::new(&mem, 0x1000, 8);
        ring.add_chain(&mem, &[(0x3FF_FFF0, 0x100, NEXT), (0x200000, 64, WRITE)]);
        assert!(matches!(
            mk().process(&mut ring.queue(), &mem),
            Err(QueueError::OutsideRam { .. })
        ));
        // Room for 10 bytes of a 21-byte Rversion: 10 written, the device goes on.
        let mut ring = Ring::new(&mem, 0x1000, 8);
        ring.add_chain(
            &mem,
            &[(0x100000, v.len() as u32, NEXT), (0x200000, 10, WRITE)],
        );
        ring.add_chain(
            &mem,
            &[(0x100000, v.len() as u32, NEXT), (0x210000, 64, WRITE)],
        );
        let mut q = mk();
        assert!(q.process(&mut ring.queue(), &mem).unwrap());
        assert_eq!(ring.used(&mem), vec![(0, 10), (2, 21)]);
    }

    #[test]
    fn fuse_forget_is_used_with_no_reply() {
        let tmp = TempDir::new_with_prefix("/tmp/xhyve-vqfs-").unwrap();
        let mem = memory();
        let mut q = RequestQueue::new(fuse::Server::new(
            Share::new(tmp.as_path(), false).unwrap(),
            Default::default(),
        ));
        let mut init = vec![0u8; 40];
        init[0..4].copy_from_slice(&56u32.to_le_bytes());
        init[4..8].copy_from_slice(&fuse::abi::op::INIT.to_le_bytes());
        init[8..16].copy_from_slice(&7u64.to_le_bytes());
        for v in [7u32, 31, 65536, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        let mut forget = vec![0u8; 40];
        forget[0..4].copy_from_slice(&48u32.to_le_bytes());
        forget[4..8].copy_from_slice(&fuse::abi::op::FORGET.to_le_bytes());
        forget[16..24].copy_from_slice(&5u64.to_le_bytes());
        forget.extend_from_slice(&1u64.to_le_bytes());
        mem.write_slice(&init, GuestAddress(0x100000)).unwrap();
        mem.write_slice(&forget, GuestAddress(0x110000)).unwrap();
        let mut ring = Ring::new(&mem, 0x1000, 8);
        ring.add_chain(
            &mem,
            &[(0x100000, init.len() as u32, NEXT), (0x200000, 256, WRITE)],
        );
        ring.add_chain(&mem, &[(0x110000, forget.len() as u32, 0)]);
        assert!(q.process(&mut ring.queue(), &mem).unwrap());
        assert_eq!(ring.used(&mem), vec![(0, 80), (2, 0)]);
        let r = reply_at(&mem, 0x200000, 16);
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 7);
    }
}
