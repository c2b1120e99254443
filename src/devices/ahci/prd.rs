//! The command header (command list entry) and the physical region descriptor table.
//!
//! Both are guest memory the guest controls completely: the table length, every address
//! and every byte count. Walking it is bounded by the transfer length and by the entry
//! count (at most 65535), and every access goes through vm-memory.

use crate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

/// Size of one command header in the command list.
pub const COMMAND_HEADER_LEN: u64 = 32;
/// Offset of the ATAPI command in a command table.
pub const ACMD_OFFSET: u64 = 0x40;
/// Offset of the PRD table in a command table.
pub const PRDT_OFFSET: u64 = 0x80;
const PRD_LEN: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrdError {
    #[error("AHCI structure at {0:#x} is outside guest memory")]
    OutsideMemory(u64),
    #[error("PRD table describes {have} bytes, the command needs {need}")]
    TooShort { have: u64, need: u64 },
}

/// One command list entry (AHCI 1.3 4.2.2), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandHeader {
    /// Command FIS length in bytes (CFL is in dwords).
    pub fis_len: usize,
    pub atapi: bool,
    pub write: bool,
    pub prdt_entries: u16,
    /// Command table base (128-byte aligned; the low bits are reserved and ignored).
    pub table: u64,
}

impl CommandHeader {
    /// Decodes a 32-byte command header.
    pub fn parse(bytes: &[u8; 32]) -> Self {
        let dw0 = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let ctba = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let ctbau = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        CommandHeader {
            fis_len: (dw0 & 0x1F) as usize * 4,
            atapi: dw0 & 1 << 5 != 0,
            write: dw0 & 1 << 6 != 0,
            prdt_entries: (dw0 >> 16) as u16,
            table: (u64::from(ctbau) << 32 | u64::from(ctba)) & !0x7F,
        }
    }

    /// Reads the header of `slot` from the command list at `list_base`.
    pub fn read(mem: &GuestMemory, list_base: u64, slot: u8) -> Result<Self, PrdError> {
        let addr = list_base
            .checked_add(u64::from(slot & 31) * COMMAND_HEADER_LEN)
            .ok_or(PrdError::OutsideMemory(list_base))?;
        let mut bytes = [0u8; 32];
        mem.read_slice(&mut bytes, GuestAddress(addr))
            .map_err(|_| PrdError::OutsideMemory(addr))?;
        Ok(Self::parse(&bytes))
    }

    /// Writes the byte count transferred (PRDBC, dword 1) back into the header.
    pub fn write_byte_count(
        mem: &GuestMemory,
        list_base: u64,
        slot: u8,
        count: u32,
    ) -> Result<(), PrdError> {
        let addr = list_base
            .checked_add(u64::from(slot & 31) * COMMAND_HEADER_LEN + 4)
            .ok_or(PrdError::OutsideMemory(list_base))?;
        mem.write_obj(count, GuestAddress(addr))
            .map_err(|_| PrdError::OutsideMemory(addr))
    }
}

/// The PRD table of one command.
#[derive(Debug, Clone, Copy)]
pub struct PrdTable {
    pub base: u64,
    pub entries: u16,
}

impl PrdTable {
    pub fn of(header: &CommandHeader) -> Self {
        PrdTable {
            base: header.table.saturating_add(PRDT_OFFSET),
            entries: header.prdt_entries,
        }
    }

    /// Reads entry `index`: (data address, byte count).
    fn entry(&self, mem: &GuestMemory, index: u16) -> Result<(u64, u64), PrdError> {
        let addr = self
            .base
            .checked_add(u64::from(index) * PRD_LEN)
            .ok_or(PrdError::OutsideMemory(self.base))?;
        let mut e = [0u8; 16];
        mem.read_slice(&mut e, GuestAddress(addr))
            .map_err(|_| PrdError::OutsideMemory(addr))?;
        let dba = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let dbau = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let dbc = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
        // Bit 0 of the address is reserved (word alignment); DBC holds the count minus one.
        let data = (u64::from(dbau) << 32 | u64::from(dba)) & !1;
        Ok((data, u64::from(dbc & 0x3F_FFFF) + 1))
    }

    /// Total bytes the table describes, without reading past `limit`.
    pub fn capacity(&self, mem: &GuestMemory, limit: u64) -> Result<u64, PrdError> {
        let mut total = 0u64;
        for index in 0..self.entries {
            if total >= limit {
                break;
            }
            total += self.entry(mem, index)?.1;
        }
        Ok(total.min(limit))
    }

    /// Calls `f` on the guest-memory slices covering the first `len` bytes of the table, in
    /// order. Fails, having done nothing, if the table is shorter than `len`.
    pub fn for_each_slice(
        &self,
        mem: &GuestMemory,
        len: u64,
        mut f: impl FnMut(&VolatileSlice<'_>) -> Result<(), PrdError>,
    ) -> Result<(), PrdError> {
        let have = self.capacity(mem, len)?;
        if have < len {
            return Err(PrdError::TooShort { have, need: len });
        }
        let mut remaining = len;
        for index in 0..self.entries {
            if remaining == 0 {
                break;
            }
            let (addr, count) = self.entry(mem, index)?;
            let piece = count.min(remaining);
            for slice in mem.get_slices(GuestAddress(addr), piece as usize) {
                f(&slice.map_err(|_| PrdError::OutsideMemory(addr))?)?;
            }
            remaining -= piece;
        }
        Ok(())
    }

    /// Copies `data` into the buffers the table describes (as far as they reach).
    /// Returns the bytes copied.
    pub fn copy_to_guest(&self, mem: &GuestMemory, data: &[u8]) -> Result<u32, PrdError> {
        let len = self.capacity(mem, data.len() as u64)?;
        let mut at = 0usize;
        self.for_each_slice(mem, len, |slice| {
            let end = at + slice.len();
            slice.copy_from(&data[at..end]);
            at = end;
            Ok(())
        })?;
        Ok(len as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn prd(mem: &GuestMemory, base: u64, index: u64, addr: u64, len: u32) {
        let at = base + PRDT_OFFSET + index * 16;
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len - 1, GuestAddress(at + 12)).unwrap();
    }

    #[test]
    fn header_fields_decode() {
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&(5u32 | 1 << 5 | 1 << 6 | 3 << 16).to_le_bytes());
        h[8..12].copy_from_slice(&0x1234_5680u32.to_le_bytes());
        h[12..16].copy_from_slice(&1u32.to_le_bytes());
        let hdr = CommandHeader::parse(&h);
        assert_eq!(hdr.fis_len, 20);
        assert!(hdr.atapi && hdr.write);
        assert_eq!(hdr.prdt_entries, 3);
        assert_eq!(hdr.table, 0x1_1234_5680);
    }

    #[test]
    fn copies_across_entries_and_stops_at_their_end() {
        let mem = memory();
        prd(&mem, 0x1000, 0, 0x4000, 6);
        prd(&mem, 0x1000, 1, 0x5000, 4);
        let table = PrdTable {
            base: 0x1080,
            entries: 2,
        };
        assert_eq!(table.capacity(&mem, 100).unwrap(), 10);
        assert_eq!(table.copy_to_guest(&mem, b"0123456789abc").unwrap(), 10);
        let mut got = [0u8; 6];
        mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
        assert_eq!(&got, b"012345");
        mem.read_slice(&mut got[..4], GuestAddress(0x5000)).unwrap();
        assert_eq!(&got[..4], b"6789");
        assert!(matches!(
            table.for_each_slice(&mem, 11, |_| Ok(())),
            Err(PrdError::TooShort { have: 10, need: 11 })
        ));
    }

    #[test]
    fn tables_and_buffers_outside_memory_are_errors() {
        let mem = memory();
        let table = PrdTable {
            base: 0xFFFF0,
            entries: 2,
        };
        assert!(matches!(
            table.capacity(&mem, 10),
            Err(PrdError::OutsideMemory(_))
        ));
        prd(&mem, 0x1000, 0, 0xFFFF0, 64);
        let table = PrdTable {
            base: 0x1080,
            entries: 1,
        };
        assert!(matches!(
            table.copy_to_guest(&mem, &[1; 64]),
            Err(PrdError::OutsideMemory(_))
        ));
        let table = PrdTable {
            base: u64::MAX - 8,
            entries: 65535,
        };
        assert!(table.capacity(&mem, 512).is_err());
        assert!(CommandHeader::read(&mem, u64::MAX - 16, 31).is_err());
    }
}
