//! A type-0 configuration space: bytes plus masks that say which bits the guest may change.

/// Size of PCI Express configuration space (what ECAM reaches).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of conventional configuration space (what ports 0xCF8/0xCFC reach).
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION_ID: usize = 0x08;
const PROG_IF: usize = 0x09;
const SUBCLASS: usize = 0x0A;
const CLASS_CODE: usize = 0x0B;
const CACHE_LINE_SIZE: usize = 0x0C;
const LATENCY_TIMER: usize = 0x0D;
const HEADER_TYPE: usize = 0x0E;
const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
const SUBSYSTEM_ID: usize = 0x2E;
const INTERRUPT_LINE: usize = 0x3C;

const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
/// I/O space, memory space, bus master, parity error response, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;
/// Master data parity error, target/master aborts, SERR#, parity error: write 1 to clear.
const STATUS_WRITE_1_TO_CLEAR: u16 = 0xF900;

/// The identity of a function, as its header presents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIds {
    pub vendor: u16,
    pub device: u16,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub revision: u8,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// One function's configuration space.
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bits the guest can set and clear.
    writable: [u8; CONFIG_SPACE_SIZE],
    /// Bits a guest write of 1 clears.
    write_1_to_clear: [u8; CONFIG_SPACE_SIZE],
}

impl ConfigSpace {
    /// A type-0 header with `ids`, everything else zero and read-only except the command
    /// register, the status error bits, cache line size, latency timer and interrupt line.
    pub fn new(ids: PciIds) -> Self {
        let mut cs = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            write_1_to_clear: [0; CONFIG_SPACE_SIZE],
        };
        cs.set_u16(VENDOR_ID, ids.vendor);
        cs.set_u16(DEVICE_ID, ids.device);
        cs.bytes[REVISION_ID] = ids.revision;
        cs.bytes[PROG_IF] = ids.prog_if;
        cs.bytes[SUBCLASS] = ids.subclass;
        cs.bytes[CLASS_CODE] = ids.class;
        cs.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor);
        cs.set_u16(SUBSYSTEM_ID, ids.subsystem);
        cs.writable[COMMAND..COMMAND + 2].copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        cs.write_1_to_clear[STATUS..STATUS + 2]
            .copy_from_slice(&STATUS_WRITE_1_TO_CLEAR.to_le_bytes());
        for reg in [CACHE_LINE_SIZE, LATENCY_TIMER, INTERRUPT_LINE] {
            cs.writable[reg] = 0xFF;
        }
        cs
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    /// Sets or clears the header type's multi-function bit.
    pub fn set_multifunction(&mut self, multi: bool) {
        if multi {
            self.bytes[HEADER_TYPE] |= HEADER_TYPE_MULTIFUNCTION;
        } else {
            self.bytes[HEADER_TYPE] &= !HEADER_TYPE_MULTIFUNCTION;
        }
    }

    /// Device-side write: any byte, regardless of the guest's masks.
    pub fn init(&mut self, offset: usize, value: &[u8]) {
        if let Some(dst) = offset
            .checked_add(value.len())
            .and_then(|end| self.bytes.get_mut(offset..end))
        {
            dst.copy_from_slice(value);
        }
    }

    /// Makes `mask` writable by the guest at `offset` (device setup).
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) {
        if let Some(dst) = offset
            .checked_add(mask.len())
            .and_then(|end| self.writable.get_mut(offset..end))
        {
            dst.copy_from_slice(mask);
        }
    }

    /// Guest read; bytes past the end of the space read as all ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        for (i, out) in data.iter_mut().enumerate() {
            *out = self.bytes.get(start + i).copied().unwrap_or(0xFF);
        }
    }

    /// Guest write: only writable bits change; write-1-to-clear bits clear where 1 is written.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let start = usize::from(offset);
        for (i, &value) in data.iter().enumerate() {
            let at = start + i;
            let (Some(byte), Some(&mask), Some(&w1c)) = (
                self.bytes.get(at),
                self.writable.get(at),
                self.write_1_to_clear.get(at),
            ) else {
                return;
            };
            let updated = ((byte & !mask) | (value & mask)) & !(value & w1c);
            self.bytes[at] = updated;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space() -> ConfigSpace {
        ConfigSpace::new(PciIds {
            vendor: 0x1234,
            device: 0x5678,
            class: 0x06,
            subclass: 0x00,
            prog_if: 0x00,
            revision: 0x01,
            subsystem_vendor: 0,
            subsystem: 0,
        })
    }

    fn read32(cs: &ConfigSpace, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        cs.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn ids_are_read_only() {
        let mut cs = space();
        cs.write(0, &[0xFF; 4]);
        cs.write(8, &[0xFF; 4]);
        assert_eq!(read32(&cs, 0), 0x5678_1234);
        assert_eq!(read32(&cs, 8), 0x0600_0001);
    }

    #[test]
    fn command_keeps_only_writable_bits() {
        let mut cs = space();
        cs.write(4, &[0xFF, 0xFF]);
        assert_eq!(read32(&cs, 4) & 0xFFFF, 0x0547);
        cs.write(4, &[0x00]);
        assert_eq!(read32(&cs, 4) & 0xFFFF, 0x0500);
    }

    #[test]
    fn status_error_bits_clear_on_write_of_one() {
        let mut cs = space();
        cs.init(6, &[0x10, 0xF9]);
        cs.write(6, &[0x00, 0x08]);
        assert_eq!(read32(&cs, 4) >> 16, 0xF110);
        cs.write(6, &[0xFF, 0xFF]);
        assert_eq!(
            read32(&cs, 4) >> 16,
            0x0010,
            "capability-list bit is read-only"
        );
    }

    #[test]
    fn interrupt_line_is_writable_and_pin_is_not() {
        let mut cs = space();
        cs.write(0x3C, &[0x0B, 0x04]);
        assert_eq!(read32(&cs, 0x3C) & 0xFFFF, 0x000B);
    }

    #[test]
    fn reads_past_the_end_are_all_ones() {
        let cs = space();
        let mut d = [0u8; 4];
        cs.read(4094, &mut d);
        assert_eq!(d, [0, 0, 0xFF, 0xFF]);
    }
}
