//! virtio-vsock's queues (virtio 1.2, 5.10) over the [`Muxer`]: TX chains carry one packet
//! each from the guest (header and payload in device-readable buffers); RX chains are empty
//! device-writable buffers the device fills with one packet each, split to fit; the event
//! queue is never used (no transport resets are sent).

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::QueueError;
use crate::vsock::packet::HEADER_LEN;
use crate::vsock::Muxer;

pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The virtio device ID of a socket device.
pub const DEVICE_TYPE_VSOCK: u16 = 19;
/// Most bytes read from one TX chain: Linux sends at most 64 KiB of payload per packet.
const MAX_TX_PACKET: usize = HEADER_LEN + 64 * 1024;

/// The device's `guest_cid` configuration field.
pub fn config(guest_cid: u64) -> [u8; 8] {
    guest_cid.to_le_bytes()
}

/// Reads the guest's packets and hands them to the muxer. Returns whether a chain was used.
pub fn process_tx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    muxer: &mut Muxer,
    buf: &mut Vec<u8>,
) -> Result<bool, QueueError> {
    let mut used = false;
    for _pass in 0..2 {
        for _ in 0..queue.size() {
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            buf.clear();
            for desc in chain {
                if desc.is_write_only() {
                    continue;
                }
                let (addr, len) = (desc.addr(), desc.len());
                let take = (len as usize).min(MAX_TX_PACKET - buf.len());
                let at = buf.len();
                buf.resize(at + take, 0);
                mem.read_slice(&mut buf[at..], addr)
                    .map_err(|_| QueueError::OutsideRam {
                        addr: addr.0,
                        len: u64::from(len),
                    })?;
            }
            if let Err(e) = muxer.handle_guest(buf) {
                log::debug!("virtio-vsock: {e}");
            }
            queue.add_used(mem, head, 0)?;
            used = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(used)
}

/// Moves packets waiting in the muxer into the guest's RX buffers. Returns whether a chain
/// was used.
pub fn fill_rx<M: GuestMemory>(
    queue: &mut Queue,
    mem: &M,
    muxer: &mut Muxer,
) -> Result<bool, QueueError> {
    let mut used = false;
    let mut room: Vec<(GuestAddress, u32)> = Vec::new();
    while muxer.has_rx() {
        let Some(chain) = queue.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        room.clear();
        for desc in chain {
            if !desc.is_write_only() {
                return Err(QueueError::NotWritable { head });
            }
            room.push((desc.addr(), desc.len()));
        }
        let total: usize = room.iter().map(|&(_, l)| l as usize).sum();
        let mut written = 0u32;
        if let Some(pkt) = muxer.next_rx_within(total) {
            let mut rest = &pkt[..];
            for &(addr, len) in &room {
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
        }
        queue.add_used(mem, head, written)?;
        used = true;
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::devices::virtio::pci::test_ring::Ring;
    use crate::memory::GuestMemory as Mem;
    use crate::vsock::packet::{op, Header, HOST_CID, TYPE_STREAM};
    use crate::vsock::VsockConfig;

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    #[test]
    fn guest_to_host_echo_through_in_memory_queues() {
        let tmp = TempDir::new_with_prefix("/tmp/xvq-").unwrap();
        let svc = UnixListener::bind(tmp.as_path().join("00000002.00000007")).unwrap();
        let mut mux = Muxer::new(VsockConfig {
            guest_cid: 3,
            dir: tmp.as_path().into(),
            guest_forwards: vec![],
        })
        .unwrap();
        let mem = Mem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mut tx = Ring::new(&mem, 0x1000, 16);
        let mut rx = Ring::new(&mem, 0x8000, 16);
        let pkt = |op: u16, data: &[u8]| {
            let mut p = Vec::new();
            Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: 1000,
                dst_port: 7,
                len: data.len() as u32,
                ty: TYPE_STREAM,
                op,
                buf_alloc: 1 << 16,
                ..Default::default()
            }
            .write(&mut p);
            p.extend_from_slice(data);
            p
        };
        let (req, rw) = (pkt(op::REQUEST, &[]), pkt(op::RW, b"echo me"));
        mem.write_slice(&req, GuestAddress(0x100000)).unwrap();
        mem.write_slice(&rw, GuestAddress(0x110000)).unwrap();
        // The RW packet's header and payload in separate buffers, as Linux sends them.
        tx.add_chain(&mem, &[(0x100000, req.len() as u32, 0)]);
        tx.add_chain(
            &mem,
            &[
                (0x110000, HEADER_LEN as u32, NEXT),
                (0x110000 + HEADER_LEN as u64, 7, 0),
            ],
        );
        for i in 0..4u64 {
            rx.add_chain(
                &mem,
                &[
                    (0x200000 + i * 0x1000, HEADER_LEN as u32, WRITE | NEXT),
                    (0x200000 + i * 0x1000 + 0x100, 4, WRITE),
                ],
            );
        }
        let (mut txq, mut rxq) = (tx.queue(), rx.queue());
        let mut buf = Vec::new();
        assert!(process_tx(&mut txq, &mem, &mut mux, &mut buf).unwrap());
        let (mut host, _) = svc.accept().unwrap();
        let mut got = [0u8; 7];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"echo me");
        host.write_all(b"echoed").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        mux.poll_host();
        assert!(fill_rx(&mut rxq, &mem, &mut mux).unwrap());
        // RESPONSE, then "echoed" split over two 4-byte payload buffers.
        let used = rx.used(&mem);
        assert_eq!(
            used,
            vec![
                (0, HEADER_LEN as u32),
                (2, HEADER_LEN as u32 + 4),
                (4, HEADER_LEN as u32 + 2)
            ]
        );
        let mut h = [0u8; HEADER_LEN];
        mem.read_slice(&mut h, GuestAddress(0x200000)).unwrap();
        assert_eq!(Header::parse(&h).unwrap().op, op::RESPONSE);
        let mut data = Vec::new();
        for i in 1..3u64 {
            let mut d = vec![0u8; if i == 1 { 4 } else { 2 }];
            mem.read_slice(&mut d, GuestAddress(0x200000 + i * 0x1000 + 0x100))
                .unwrap();
            data.extend(d);
        }
        assert_eq!(data, b"echoed");
    }
}
