//! virtio-blk requests: parse one descriptor chain and execute it against a disk.
//!
//! The transport walks the virtqueue and hands over the chain as a list of guest buffers;
//! this module never trusts it. Every guest address goes through vm-memory (bounds-checked),
//! lengths are summed in u64, sector arithmetic is checked, and every failure becomes a
//! status byte for the guest, never a panic. A chain with nowhere to put the status byte is
//! the only request the guest gets no answer for ([`RequestError`]).
//!
//! Layout (virtio 1.x 5.2.6): device-readable `{type: u32, reserved: u32, sector: u64}`
//! header, then data (readable for OUT/DISCARD/WRITE_ZEROES, writable for IN/GET_ID), then
//! one writable status byte. Header and data may be split across buffers in any way.

use crate::block::serial::virtio_blk_id;
use crate::block::{check_range, BlockBackend, BlockError};
use crate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Feature bits this device offers (besides the transport's own).
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;

/// virtio-blk always counts in 512-byte sectors, whatever the disk's logical sector size.
pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;
/// Discard / write-zeroes segments accepted per request (advertised in the config space).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Sectors per discard / write-zeroes segment (advertised): 2 GiB - 512.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR_SIZE as u32;
/// Size of the virtio_blk_config structure this device exposes.
pub const CONFIG_SPACE_LEN: usize = 60;

/// One buffer of a descriptor chain, as the transport found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBuffer {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// What the transport puts in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub status: u8,
    /// Bytes written into device-writable buffers, the status byte included.
    pub written: u32,
}

/// A chain the device cannot answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("virtio-blk request has no writable status byte")]
    NoStatusByte,
    #[error("virtio-blk status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
}

/// Feature bits for a disk (the `RO` bit when it is read-only).
pub fn device_features(disk: &dyn BlockBackend) -> u64 {
    let mut features = [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | 1 << bit);
    if disk.is_read_only() {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    features
}

/// The virtio_blk_config bytes (little-endian) for a disk on a queue of `queue_size`.
pub fn config_space(disk: &dyn BlockBackend, queue_size: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut c = [0u8; CONFIG_SPACE_LEN];
    let logical = disk.logical_sector_size();
    let physical = disk.physical_sector_size().max(logical);
    let put32 = |c: &mut [u8; CONFIG_SPACE_LEN], at: usize, v: u32| {
        c[at..at + 4].copy_from_slice(&v.to_le_bytes())
    };
    c[0..8].copy_from_slice(&(disk.size() / SECTOR_SIZE).to_le_bytes());
    // Two descriptors of every chain carry the header and status (Linux relies on this).
    put32(&mut c, 12, u32::from(queue_size.saturating_sub(2).max(1)));
    put32(&mut c, 20, logical);
    c[24] = (physical / logical).trailing_zeros() as u8;
    c[26..28].copy_from_slice(&1u16.to_le_bytes());
    put32(&mut c, 36, MAX_DISCARD_SECTORS);
    put32(&mut c, 40, MAX_DISCARD_SEGMENTS);
    put32(&mut c, 44, logical / SECTOR_SIZE as u32);
    put32(&mut c, 48, MAX_DISCARD_SECTORS);
    put32(&mut c, 52, MAX_DISCARD_SEGMENTS);
    c[56] = 1;
    c
}

/// Parses and executes one request; returns what goes in the used ring.
pub fn execute(
    mem: &GuestMemory,
    chain: &[GuestBuffer],
    disk: &dyn BlockBackend,
) -> Result<Completion, RequestError> {
    let status_buffer = match chain.last() {
        Some(b) if b.writable && b.len > 0 => *b,
        _ => return Err(RequestError::NoStatusByte),
    };
    let status_addr = status_buffer
        .addr
        .checked_add(u64::from(status_buffer.len) - 1)
        .ok_or(RequestError::StatusOutsideMemory(status_buffer.addr))?;
    let chain = Chain::new(chain);
    let (status, data_written) = match chain {
        Some(chain) => run(mem, &chain, disk),
        None => (VIRTIO_BLK_S_IOERR, 0),
    };
    mem.write_obj(status, GuestAddress(status_addr))
        .map_err(|_| RequestError::StatusOutsideMemory(status_addr))?;
    Ok(Completion {
        status,
        written: u32::try_from(data_written + 1).unwrap_or(u32::MAX),
    })
}

/// A chain split into its readable and writable parts, the status byte set aside.
struct Chain<'a> {
    readable: &'a [GuestBuffer],
    writable: &'a [GuestBuffer],
    readable_len: u64,
    /// Writable bytes before the status byte.
    writable_len: u64,
}

impl<'a> Chain<'a> {
    /// `None` if a readable buffer follows a writable one (not a valid chain).
    fn new(chain: &'a [GuestBuffer]) -> Option<Self> {
        let split = chain.iter().position(|b| b.writable).unwrap_or(chain.len());
        let (readable, writable) = chain.split_at(split);
        if writable.iter().any(|b| !b.writable) {
            return None;
        }
        let total = |bufs: &[GuestBuffer]| bufs.iter().map(|b| u64::from(b.len)).sum::<u64>();
        Some(Chain {
            readable,
            writable,
            readable_len: total(readable),
            writable_len: total(writable) - 1,
        })
    }
}

/// Calls `f(address, len)` for each piece of the byte range `[skip, skip+len)` of `bufs`.
fn for_each_piece(
    bufs: &[GuestBuffer],
    mut skip: u64,
    mut len: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), ()>,
) -> Result<(), ()> {
    for b in bufs {
        if len == 0 {
            break;
        }
        let blen = u64::from(b.len);
        if skip >= blen {
            skip -= blen;
            continue;
        }
        let piece = (blen - skip).min(len);
        let addr = b.addr.checked_add(skip).ok_or(())?;
        f(addr, piece)?;
        len -= piece;
        skip = 0;
    }
    if len == 0 {
        Ok(())
    } else {
        Err(())
    }
}

/// Copies `out.len()` bytes from offset `skip` of the readable part.
fn read_bytes(mem: &GuestMemory, chain: &Chain, skip: u64, out: &mut [u8]) -> Result<(), ()> {
    let mut at = 0usize;
    for_each_piece(chain.readable, skip, out.len() as u64, |addr, len| {
        let end = at + len as usize;
        mem.read_slice(&mut out[at..end], GuestAddress(addr))
            .map_err(|_| ())?;
        at = end;
        Ok(())
    })
}

/// Runs `op` on each guest-memory slice covering `[addr, addr+len)`, advancing the disk
/// offset as it goes.
fn transfer(
    mem: &GuestMemory,
    addr: u64,
    len: u64,
    offset: &mut u64,
    op: &mut dyn FnMut(u64, &vm_memory::VolatileSlice<'_>) -> Result<(), BlockError>,
) -> Result<(), ()> {
    let len = usize::try_from(len).map_err(|_| ())?;
    for slice in mem.get_slices(GuestAddress(addr), len) {
        let slice = slice.map_err(|_| ())?;
        op(*offset, &slice).map_err(|_| ())?;
        *offset += slice.len() as u64;
    }
    Ok(())
}

/// Returns the status and the number of data bytes written to the guest.
fn run(mem: &GuestMemory, chain: &Chain, disk: &dyn BlockBackend) -> (u8, u64) {
    let mut header = [0u8; HEADER_LEN as usize];
    if read_bytes(mem, chain, 0, &mut header).is_err() {
        return (VIRTIO_BLK_S_IOERR, 0);
    }
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let readable_data = chain.readable_len - HEADER_LEN;
    let io_error = (VIRTIO_BLK_S_IOERR, 0);

    match request_type {
        VIRTIO_BLK_T_IN => {
            let len = chain.writable_len;
            let Some(mut offset) = data_offset(sector, len) else {
                return io_error;
            };
            if check_range(offset, len, disk.size()).is_err() {
                return io_error;
            }
            let mut read = |at: u64, s: &vm_memory::VolatileSlice<'_>| disk.read_to(at, s);
            let ok = for_each_piece(chain.writable, 0, len, |addr, n| {
                transfer(mem, addr, n, &mut offset, &mut read)
            });
            match ok {
                Ok(()) => (VIRTIO_BLK_S_OK, len),
                Err(()) => io_error,
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = readable_data;
            let Some(mut offset) = data_offset(sector, len) else {
                return io_error;
            };
            if disk.is_read_only() || check_range(offset, len, disk.size()).is_err() {
                return io_error;
            }
            let mut write = |at: u64, s: &vm_memory::VolatileSlice<'_>| disk.write_from(at, s);
            let ok = for_each_piece(chain.readable, HEADER_LEN, len, |addr, n| {
                transfer(mem, addr, n, &mut offset, &mut write)
            });
            match ok {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(()) => io_error,
            }
        }
        VIRTIO_BLK_T_FLUSH => match disk.flush() {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(_) => io_error,
        },
        VIRTIO_BLK_T_GET_ID => {
            let id = virtio_blk_id(disk.serial());
            let len = chain.writable_len.min(id.len() as u64);
            let mut at = 0usize;
            let ok = for_each_piece(chain.writable, 0, len, |addr, n| {
                let end = at + n as usize;
                mem.write_slice(&id[at..end], GuestAddress(addr))
                    .map_err(|_| ())?;
                at = end;
                Ok(())
            });
            match ok {
                Ok(()) => (VIRTIO_BLK_S_OK, len),
                Err(()) => io_error,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (
            discard_or_zero(mem, chain, disk, request_type, readable_data),
            0,
        ),
        _ => (VIRTIO_BLK_S_UNSUPP, 0),
    }
}

/// Byte offset of `sector`, if the data length is whole sectors and nothing overflows.
fn data_offset(sector: u64, len: u64) -> Option<u64> {
    if len % SECTOR_SIZE != 0 {
        return None;
    }
    sector.checked_mul(SECTOR_SIZE)
}

fn discard_or_zero(
    mem: &GuestMemory,
    chain: &Chain,
    disk: &dyn BlockBackend,
    request_type: u32,
    data_len: u64,
) -> u8 {
    const UNMAP: u32 = 1;
    if data_len == 0
        || data_len % SEGMENT_LEN != 0
        || data_len / SEGMENT_LEN > u64::from(MAX_DISCARD_SEGMENTS)
        || disk.is_read_only()
    {
        return VIRTIO_BLK_S_IOERR;
    }
    let alignment = u64::from(disk.logical_sector_size());
    // Check every segment before acting on any, so a bad request changes nothing.
    for pass in 0..2 {
        for index in 0..data_len / SEGMENT_LEN {
            let mut segment = [0u8; SEGMENT_LEN as usize];
            if read_bytes(mem, chain, HEADER_LEN + index * SEGMENT_LEN, &mut segment).is_err() {
                return VIRTIO_BLK_S_IOERR;
            }
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&segment[0..8]);
            let sector = u64::from_le_bytes(sector);
            let sectors = u32::from_le_bytes([segment[8], segment[9], segment[10], segment[11]]);
            let flags = u32::from_le_bytes([segment[12], segment[13], segment[14], segment[15]]);
            let allowed_flags = if request_type == VIRTIO_BLK_T_WRITE_ZEROES {
                UNMAP
            } else {
                0
            };
            if flags & !allowed_flags != 0 {
                return VIRTIO_BLK_S_UNSUPP;
            }
            let (Some(offset), Some(len)) = (
                sector.checked_mul(SECTOR_SIZE),
                u64::from(sectors).checked_mul(SECTOR_SIZE),
            ) else {
                return VIRTIO_BLK_S_IOERR;
            };
            if sectors > MAX_DISCARD_SECTORS
                || check_range(offset, len, disk.size()).is_err()
                || (request_type == VIRTIO_BLK_T_DISCARD && offset % alignment != 0)
            {
                return VIRTIO_BLK_S_IOERR;
            }
            if pass == 1 {
                let result = if request_type == VIRTIO_BLK_T_DISCARD {
                    disk.discard(offset, len)
                } else {
                    disk.write_zeroes(offset, len)
                };
                if result.is_err() {
                    return VIRTIO_BLK_S_IOERR;
                }
            }
        }
    }
    VIRTIO_BLK_S_OK
}

/// Fuzz entry point: `data` describes a chain and fills guest memory; the request runs on
/// an in-memory disk. Must never panic. Layout: byte 0 = number of buffers (0-15), then
/// 7 bytes per buffer (address u16 LE, length u32 LE, flags u8; bit 0 = writable), the rest
/// is copied to guest address 0 of a 64 KiB guest.
pub fn fuzz_request(data: &[u8]) {
    use crate::block::MemDisk;
    const MEM: usize = 64 * 1024;
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), MEM)]) else {
        return;
    };
    let Some((&count, mut rest)) = data.split_first() else {
        return;
    };
    let mut chain = [GuestBuffer {
        addr: 0,
        len: 0,
        writable: false,
    }; 15];
    let count = usize::from(count % 16).min(rest.len() / 7);
    for slot in chain.iter_mut().take(count) {
        let (entry, tail) = rest.split_at(7);
        rest = tail;
        // Addresses may run past the end of RAM: that is what is being tested.
        slot.addr = u64::from(u16::from_le_bytes([entry[0], entry[1]])) * 2;
        slot.len = u32::from_le_bytes([entry[2], entry[3], entry[4], entry[5]]);
        slot.writable = entry[6] & 1 != 0;
    }
    let len = rest.len().min(MEM);
    let _ = mem.write_slice(&rest[..len], GuestAddress(0));
    let disk = MemDisk::new(32 * 1024, 512, data.len() % 2 == 0);
    let _ = execute(&mem, &chain[..count], &disk);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::test_util::TempImage;
    use crate::block::{BlockOptions, MemDisk, RawImage};
    use std::os::unix::fs::MetadataExt;

    const HEADER: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemory, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
        mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
    }

    fn rd(addr: u64, len: u32) -> GuestBuffer {
        GuestBuffer {
            addr,
            len,
            writable: false,
        }
    }

    fn wr(addr: u64, len: u32) -> GuestBuffer {
        GuestBuffer {
            addr,
            len,
            writable: true,
        }
    }

    fn status(mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn run(mem: &GuestMemory, chain: &[GuestBuffer], disk: &dyn BlockBackend) -> Completion {
        let c = execute(mem, chain, disk).unwrap();
        assert_eq!(c.status, status(mem), "status byte in memory differs");
        c
    }

    #[test]
    fn write_then_read_across_split_buffers() {
        let mem = memory();
        let disk = MemDisk::new(64 * 1024, 512, false);
        let data: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 3);
        let c = run(
            &mem,
            &[
                rd(HEADER, 16),
                rd(DATA, 100),
                rd(DATA + 100, 924),
                wr(STATUS, 1),
            ],
            &disk,
        );
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 1
            }
        );
        assert_eq!(&disk.contents()[1536..2560], &data[..]);

        header(&mem, VIRTIO_BLK_T_IN, 3);
        let back = 0x5000;
        let c = run(
            &mem,
            &[
                rd(HEADER, 16),
                wr(back, 1000),
                wr(back + 1000, 24),
                wr(STATUS, 1),
            ],
            &disk,
        );
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 1025
            }
        );
        let mut got = vec![0u8; 1024];
        mem.read_slice(&mut got, GuestAddress(back)).unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn header_split_and_status_sharing_a_buffer() {
        let mem = memory();
        let disk = MemDisk::from_bytes(vec![7u8; 4096], 512, false);
        header(&mem, VIRTIO_BLK_T_IN, 1);
        // Header in two pieces; data and status in one writable buffer of 513 bytes.
        let c = run(
            &mem,
            &[rd(HEADER, 5), rd(HEADER + 5, 11), wr(STATUS - 512, 513)],
            &disk,
        );
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 513
            }
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS - 1)).unwrap(), 7);
    }

    #[test]
    fn out_of_range_and_partial_sectors_are_io_errors() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, false);
        for (t, sector, len) in [
            (VIRTIO_BLK_T_IN, 8, 512),
            (VIRTIO_BLK_T_IN, 7, 1024),
            (VIRTIO_BLK_T_IN, u64::MAX / 256, 512),
            (VIRTIO_BLK_T_IN, 0, 100),
            (VIRTIO_BLK_T_OUT, 8, 512),
            (VIRTIO_BLK_T_OUT, 0, 511),
        ] {
            header(&mem, t, sector);
            let data = if t == VIRTIO_BLK_T_IN {
                wr(DATA, len)
            } else {
                rd(DATA, len)
            };
            let c = run(&mem, &[rd(HEADER, 16), data, wr(STATUS, 1)], &disk);
            assert_eq!(
                c.status, VIRTIO_BLK_S_IOERR,
                "type {t} sector {sector} len {len}"
            );
        }
        assert!(disk.contents().iter().all(|&b| b == 0));
    }

    #[test]
    fn buffers_outside_guest_memory_are_io_errors() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let c = run(
            &mem,
            &[rd(HEADER, 16), wr(0x10_0000 - 256, 512), wr(STATUS, 1)],
            &disk,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        let c = run(&mem, &[rd(u64::MAX - 4, 16), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let c = run(
            &mem,
            &[rd(HEADER, 16), rd(u64::MAX - 100, 512), wr(STATUS, 1)],
            &disk,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn chains_without_a_status_byte_are_refused() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, false);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(execute(&mem, &[], &disk), Err(RequestError::NoStatusByte));
        assert_eq!(
            execute(&mem, &[rd(HEADER, 16)], &disk),
            Err(RequestError::NoStatusByte)
        );
        assert_eq!(
            execute(&mem, &[rd(HEADER, 16), wr(STATUS, 0)], &disk),
            Err(RequestError::NoStatusByte)
        );
        assert_eq!(
            execute(&mem, &[rd(HEADER, 16), wr(0x20_0000, 1)], &disk),
            Err(RequestError::StatusOutsideMemory(0x20_0000))
        );
        assert_eq!(
            execute(&mem, &[rd(HEADER, 16), wr(u64::MAX, 2)], &disk),
            Err(RequestError::StatusOutsideMemory(u64::MAX))
        );
    }

    #[test]
    fn readable_after_writable_and_short_header_are_io_errors() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, false);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let c = run(
            &mem,
            &[rd(HEADER, 16), wr(DATA, 512), rd(DATA, 8), wr(STATUS, 1)],
            &disk,
        );
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        let c = run(&mem, &[rd(HEADER, 15), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        let c = run(&mem, &[rd(HEADER, 16), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn get_id_returns_xhyves_serial() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, false);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let c = run(&mem, &[rd(HEADER, 16), wr(DATA, 20), wr(STATUS, 1)], &disk);
        assert_eq!(
            c,
            Completion {
                status: VIRTIO_BLK_S_OK,
                written: 21
            }
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(id, virtio_blk_id(disk.serial()));
        assert_eq!(&id[..6], b"BHYVE-");
        // A short buffer gets what fits.
        let c = run(&mem, &[rd(HEADER, 16), wr(DATA, 8), wr(STATUS, 1)], &disk);
        assert_eq!(c.written, 9);
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, false);
        header(&mem, 99, 0);
        let c = run(&mem, &[rd(HEADER, 16), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP);
    }

    fn segments(mem: &GuestMemory, segs: &[(u64, u32, u32)]) -> u32 {
        for (i, (sector, n, flags)) in segs.iter().enumerate() {
            let at = DATA + i as u64 * 16;
            mem.write_obj(*sector, GuestAddress(at)).unwrap();
            mem.write_obj(*n, GuestAddress(at + 8)).unwrap();
            mem.write_obj(*flags, GuestAddress(at + 12)).unwrap();
        }
        segs.len() as u32 * 16
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let mem = memory();
        let disk = MemDisk::from_bytes(vec![0xEEu8; 8192], 512, false);
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let len = segments(&mem, &[(1, 2, 1), (10, 1, 0)]);
        let c = run(&mem, &[rd(HEADER, 16), rd(DATA, len), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_OK);
        let d = disk.contents();
        assert!(d[512..1536].iter().all(|&b| b == 0));
        assert!(d[5120..5632].iter().all(|&b| b == 0));
        assert!(d[..512].iter().chain(&d[1536..5120]).all(|&b| b == 0xEE));

        // Unmap is not a discard flag; an out-of-range segment spoils the whole request.
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let len = segments(&mem, &[(0, 1, 1)]);
        let c = run(&mem, &[rd(HEADER, 16), rd(DATA, len), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_UNSUPP);
        let len = segments(&mem, &[(0, 1, 0), (15, 2, 0)]);
        let c = run(&mem, &[rd(HEADER, 16), rd(DATA, len), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            disk.contents()[0],
            0xEE,
            "a refused request changed the disk"
        );
        let c = run(&mem, &[rd(HEADER, 16), rd(DATA, 15), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
        let len = segments(&mem, &[(u64::MAX / 2, 1, 0)]);
        let c = run(&mem, &[rd(HEADER, 16), rd(DATA, len), wr(STATUS, 1)], &disk);
        assert_eq!(c.status, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn read_only_disks_refuse_writes_but_flush_and_read() {
        let mem = memory();
        let disk = MemDisk::new(4096, 512, true);
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&mem, t, 0);
            let len = segments(&mem, &[(0, 1, 0)]);
            let c = run(&mem, &[rd(HEADER, 16), rd(DATA, len), wr(STATUS, 1)], &disk);
            assert_eq!(c.status, VIRTIO_BLK_S_IOERR, "type {t}");
        }
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mem, &[rd(HEADER, 16), wr(STATUS, 1)], &disk).status, 0);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&mem, &[rd(HEADER, 16), wr(DATA, 512), wr(STATUS, 1)], &disk).status,
            0
        );
        assert_ne!(device_features(&disk) & 1 << VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn discard_on_a_raw_image_punches_a_hole() {
        let img = TempImage::new("vblk", 4 << 20);
        let disk = RawImage::open(&BlockOptions::new(&img.path)).unwrap();
        let mem = memory();
        mem.write_slice(&[0x5A; 0x8000], GuestAddress(0x10000))
            .unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 2048);
        for i in 0..32u64 {
            let c = run(
                &mem,
                &[rd(HEADER, 16), rd(0x10000, 0x8000), wr(STATUS, 1)],
                &disk,
            );
            assert_eq!(c.status, 0);
            header(&mem, VIRTIO_BLK_T_OUT, 2048 + (i + 1) * 64);
        }
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&mem, &[rd(HEADER, 16), wr(STATUS, 1)], &disk).status, 0);
        let before = std::fs::metadata(&img.path).unwrap().blocks() * 512;
        assert!(before >= 1 << 20, "{before}");
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let len = segments(&mem, &[(2048, 2048, 0)]);
        assert_eq!(
            run(&mem, &[rd(HEADER, 16), rd(DATA, len), wr(STATUS, 1)], &disk).status,
            0
        );
        let after = std::fs::metadata(&img.path).unwrap().blocks() * 512;
        assert!(after < 64 * 1024, "{before} -> {after}");
    }

    #[test]
    fn config_space_describes_the_disk() {
        let disk = MemDisk::new(1 << 20, 4096, false);
        let c = config_space(&disk, 64);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 62);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(device_features(&disk) & 1 << VIRTIO_BLK_F_RO, 0);
    }

    /// A deterministic mini-fuzz: random chains must never panic or escape memory.
    #[test]
    fn random_requests_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let len = (next() % 300) as usize;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = data.get_mut(8) {
                *b %= 14; // often a valid request type
            }
            fuzz_request(&data);
        }
    }
}
