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
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
const CAPABILITIES_POINTER: usize = 0x34;
const SUBSYSTEM_ID: usize = 0x2E;
const INTERRUPT_LINE: usize = 0x3C;

const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
const STATUS_CAPABILITIES_LIST: u8 = 0x10;
/// Capabilities live after the type-0 header, up to the end of conventional space.
const FIRST_CAPABILITY: usize = 0x40;

/// Command register bits that gate BAR decoding.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Offsets of the registers whose writes change what the function decodes.
pub const DECODE_REGISTERS: std::ops::Range<u16> = 0x04..0x28;

/// Number of BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;

/// What a base address register maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    /// Takes two BAR registers: this one and the next.
    Memory64,
}

/// A BAR the device offers: kind and size (a power of two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSpec {
    pub kind: BarKind,
    pub size: u64,
}

/// A BAR range that the function currently decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedBar {
    pub index: usize,
    pub kind: BarKind,
    pub base: u64,
    pub size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigSpaceError {
    #[error("invalid BAR {index}: {why}")]
    BadBar { index: usize, why: &'static str },
    #[error("capability {id:#x} of {len} bytes does not fit in configuration space")]
    NoRoomForCapability { id: u8, len: usize },
}
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
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    /// Bits the guest can set and clear.
    writable: [u8; CONFIG_SPACE_SIZE],
    /// Bits a guest write of 1 clears.
    write_1_to_clear: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; BAR_COUNT],
    /// Where the next capability goes, and the "next" byte of the last one added.
    next_capability: usize,
    last_capability_link: usize,
}

impl ConfigSpace {
    /// Copies `other`'s register contents (not its write masks or layout): for a mirror of
    /// a function's configuration space kept where another thread reads it.
    pub fn copy_registers_from(&mut self, other: &ConfigSpace) {
        self.bytes = other.bytes;
    }

    /// A type-0 header with `ids`, everything else zero and read-only except the command
    /// register, the status error bits, cache line size, latency timer and interrupt line.
    pub fn new(ids: PciIds) -> Self {
        let mut cs = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
            write_1_to_clear: [0; CONFIG_SPACE_SIZE],
            bars: [None; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_capability_link: CAPABILITIES_POINTER,
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

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    fn u32_at(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bytes[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    /// Declares BAR `index`. Its address bits become guest-writable above the size, so that
    /// writing all ones and reading back yields the size mask; the type bits are read-only.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), ConfigSpaceError> {
        let bad = |why| Err(ConfigSpaceError::BadBar { index, why });
        let last = if spec.kind == BarKind::Memory64 {
            index + 1
        } else {
            index
        };
        if last >= BAR_COUNT {
            return bad("past the last BAR register");
        }
        if self.bars[index].is_some() || self.bars[last].is_some() || self.is_upper_half(index) {
            return bad("already in use");
        }
        if !spec.size.is_power_of_two() {
            return bad("size must be a power of two");
        }
        let (min, max, type_bits): (u64, u64, u32) = match spec.kind {
            BarKind::Io => (4, 256, 0x1),
            BarKind::Memory32 => (16, 1 << 31, 0x0),
            BarKind::Memory64 => (16, 1 << 40, 0x4),
        };
        if spec.size < min || spec.size > max {
            return bad("size out of range for its kind");
        }
        let offset = BAR0 + 4 * index;
        let low_flag_bits = if spec.kind == BarKind::Io { 0x3 } else { 0xF };
        let low_mask = !(spec.size - 1) as u32 & !low_flag_bits;
        self.init(offset, &type_bits.to_le_bytes());
        self.set_writable(offset, &low_mask.to_le_bytes());
        if spec.kind == BarKind::Memory64 {
            let high_mask = !((spec.size - 1) >> 32) as u32;
            self.set_writable(offset + 4, &high_mask.to_le_bytes());
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0 && matches!(self.bars[index - 1], Some(b) if b.kind == BarKind::Memory64)
    }

    /// The BAR declared at `index`, if any.
    pub fn bar(&self, index: usize) -> Option<BarSpec> {
        *self.bars.get(index)?
    }

    /// The address BAR `index` holds now (zero if it is not declared).
    pub fn bar_address(&self, index: usize) -> u64 {
        let Some(spec) = self.bar(index) else {
            return 0;
        };
        let offset = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(offset));
        match spec.kind {
            BarKind::Io => low & !0x3,
            BarKind::Memory32 => low & !0xF,
            BarKind::Memory64 => (u64::from(self.u32_at(offset + 4)) << 32) | (low & !0xF),
        }
    }

    /// Device-side placement of BAR `index` (firmware-style allocation).
    pub fn set_bar_address(&mut self, index: usize, address: u64) {
        let Some(spec) = self.bar(index) else {
            return;
        };
        let offset = BAR0 + 4 * index;
        let keep = if spec.kind == BarKind::Io { 0x3 } else { 0xF };
        let low = (self.u32_at(offset) & keep) | (address as u32 & !keep);
        self.init(offset, &low.to_le_bytes());
        if spec.kind == BarKind::Memory64 {
            self.init(offset + 4, &((address >> 32) as u32).to_le_bytes());
        }
    }

    /// The BAR ranges the function decodes now: declared, enabled by the command register,
    /// and not wrapping past the end of their address space.
    pub fn decoded_bars(&self) -> impl Iterator<Item = DecodedBar> + '_ {
        let command = self.command();
        (0..BAR_COUNT).filter_map(move |index| {
            let spec = self.bar(index)?;
            let enabled = match spec.kind {
                BarKind::Io => command & COMMAND_IO_SPACE != 0,
                BarKind::Memory32 | BarKind::Memory64 => command & COMMAND_MEMORY_SPACE != 0,
            };
            let base = self.bar_address(index);
            let limit = match spec.kind {
                BarKind::Io => 1 << 16,
                BarKind::Memory32 => 1 << 32,
                BarKind::Memory64 => u64::MAX,
            };
            let fits = base.checked_add(spec.size).is_some_and(|end| end <= limit);
            (enabled && fits).then_some(DecodedBar {
                index,
                kind: spec.kind,
                base,
                size: spec.size,
            })
        })
    }

    /// Appends a capability with `id` and `body` (the bytes after the ID and next pointer) to
    /// the capability list. Returns its offset. The body is read-only until `set_writable`.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<u16, ConfigSpaceError> {
        let len = 2 + body.len();
        let offset = self.next_capability;
        let end = offset + len;
        if end > LEGACY_CONFIG_SPACE_SIZE {
            return Err(ConfigSpaceError::NoRoomForCapability { id, len });
        }
        self.bytes[offset] = id;
        self.bytes[offset + 1] = 0;
        self.bytes[offset + 2..end].copy_from_slice(body);
        self.bytes[self.last_capability_link] = offset as u8;
        self.bytes[STATUS] |= STATUS_CAPABILITIES_LIST;
        self.last_capability_link = offset + 1;
        self.next_capability = (end + 3) & !3;
        Ok(offset as u16)
    }

    /// Little-endian u16 at `offset` (device-side read).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian u32 at `offset` (device-side read).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
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
    fn bar_sizing_reads_back_the_size_mask() {
        let mut cs = space();
        let io = BarSpec {
            kind: BarKind::Io,
            size: 0x40,
        };
        let mem32 = BarSpec {
            kind: BarKind::Memory32,
            size: 0x1000,
        };
        let mem64 = BarSpec {
            kind: BarKind::Memory64,
            size: 0x2_0000_0000,
        };
        cs.add_bar(0, io).unwrap();
        cs.add_bar(1, mem32).unwrap();
        cs.add_bar(2, mem64).unwrap();
        for bar in 0..6u16 {
            cs.write(0x10 + 4 * bar, &[0xFF; 4]);
        }
        assert_eq!(read32(&cs, 0x10), 0xFFFF_FFC1);
        assert_eq!(read32(&cs, 0x14), 0xFFFF_F000);
        assert_eq!(read32(&cs, 0x18), 0x0000_0004);
        assert_eq!(read32(&cs, 0x1C), 0xFFFF_FFFE);
        assert_eq!(read32(&cs, 0x20), 0, "undeclared BARs stay zero");
        cs.write(0x10, &0x2003u32.to_le_bytes());
        assert_eq!(cs.bar_address(0), 0x2000, "low bits are not address bits");
        assert_eq!(read32(&cs, 0x10), 0x2001);
        cs.write(0x1C, &0x0000_0012u32.to_le_bytes());
        cs.write(0x18, &0u32.to_le_bytes());
        assert_eq!(cs.bar_address(2), 0x12_0000_0000);
    }

    #[test]
    fn bar_declarations_are_checked() {
        let mut cs = space();
        let spec = |kind, size| BarSpec { kind, size };
        assert!(cs.add_bar(5, spec(BarKind::Memory64, 0x1000)).is_err());
        assert!(cs.add_bar(6, spec(BarKind::Io, 4)).is_err());
        assert!(cs.add_bar(0, spec(BarKind::Io, 0x30)).is_err());
        assert!(cs.add_bar(0, spec(BarKind::Io, 0x200)).is_err());
        assert!(cs.add_bar(0, spec(BarKind::Memory32, 8)).is_err());
        cs.add_bar(0, spec(BarKind::Memory64, 0x1000)).unwrap();
        assert!(
            cs.add_bar(1, spec(BarKind::Io, 4)).is_err(),
            "upper half of BAR 0"
        );
        assert!(cs.add_bar(0, spec(BarKind::Io, 4)).is_err());
    }

    #[test]
    fn command_register_gates_decoding() {
        let mut cs = space();
        cs.add_bar(
            0,
            BarSpec {
                kind: BarKind::Io,
                size: 0x20,
            },
        )
        .unwrap();
        cs.add_bar(
            1,
            BarSpec {
                kind: BarKind::Memory32,
                size: 0x1000,
            },
        )
        .unwrap();
        cs.set_bar_address(0, 0x2000);
        cs.set_bar_address(1, 0xC000_0000);
        assert_eq!(cs.decoded_bars().count(), 0);
        cs.write(4, &[COMMAND_IO_SPACE as u8, 0]);
        let bars: Vec<_> = cs.decoded_bars().collect();
        assert_eq!(
            bars,
            vec![DecodedBar {
                index: 0,
                kind: BarKind::Io,
                base: 0x2000,
                size: 0x20
            }]
        );
        cs.write(4, &[(COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE) as u8, 0]);
        assert_eq!(cs.decoded_bars().count(), 2);
        // A 32-bit BAR sized at the top of the address space does not wrap.
        cs.write(0x14, &[0xFF; 4]);
        assert_eq!(cs.decoded_bars().count(), 2);
        cs.set_bar_address(1, 0xFFFF_F000);
        assert_eq!(cs.decoded_bars().nth(1).map(|b| b.base), Some(0xFFFF_F000));
    }

    #[test]
    fn capabilities_form_a_linked_list() {
        let mut cs = space();
        let first = cs
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            .unwrap();
        let second = cs.add_capability(0x09, &[0xAA; 3]).unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x4C, "aligned to a dword");
        assert_eq!(read32(&cs, 4) >> 16 & 0x10, 0x10, "capability list bit");
        assert_eq!(read32(&cs, 0x34) & 0xFF, 0x40);
        assert_eq!(read32(&cs, 0x40) & 0xFFFF, 0x4C11);
        assert_eq!(read32(&cs, 0x4C), 0xAAAA_0009);
        // Read-only unless made writable.
        cs.write(0x42, &[0xFF]);
        assert_eq!(cs.read_u16(0x42), 0x0201);
        assert!(cs.add_capability(0x05, &[0; 200]).is_err());
    }

    #[test]
    fn reads_past_the_end_are_all_ones() {
        let cs = space();
        let mut d = [0u8; 4];
        cs.read(4094, &mut d);
        assert_eq!(d, [0, 0, 0xFF, 0xFF]);
    }
}
