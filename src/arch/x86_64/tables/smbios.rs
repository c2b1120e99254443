//! SMBIOS 2.8 tables: a 32-bit (`_SM_`/`_DMI_`) entry point at `SMBIOS_START` and the
//! structure table right after it, with xhyve's structure set: BIOS (0), system (1),
//! chassis (3), one processor (4) per vCPU, memory array (16), memory device (17), mapped
//! address ranges (19), boot information (32) and the end marker (127).

use super::{
    align_up, check_fits, checksum, write_bytes, MachineDescription, PutLe, TablesError,
    SMBIOS_END, SMBIOS_START,
};
use crate::arch::x86_64::layout::{highmem_size, lowmem_size, HIGHMEM_BASE};
use crate::memory::GuestMemory;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

const ENTRY_POINT_LEN: usize = 0x1F;
const VERSION_MAJOR: u8 = 2;
const VERSION_MINOR: u8 = 8;

const TYPE_BIOS: u8 = 0;
const TYPE_SYSTEM: u8 = 1;
const TYPE_CHASSIS: u8 = 3;
const TYPE_PROCESSOR: u8 = 4;
const TYPE_MEMORY_ARRAY: u8 = 16;
const TYPE_MEMORY_DEVICE: u8 = 17;
const TYPE_MEMORY_ARRAY_MAPPED: u8 = 19;
const TYPE_BOOT_INFO: u8 = 32;
const TYPE_END: u8 = 127;

const VENDOR: &str = "xhyve";
const PRODUCT: &str = "xhyve";
const BIOS_VERSION: &str = env!("CARGO_PKG_VERSION");
const BIOS_RELEASE_DATE: &str = "01/01/2025";

/// "No error information structure was provided" for memory handles.
const NO_ERROR_INFO: u16 = 0xFFFE;
/// "No cache described" for processor cache handles.
const NO_CACHE: u16 = 0xFFFF;
/// Memory device size field value that says "see the extended size field".
const SIZE_IN_EXTENDED_FIELD: u16 = 0x7FFF;

/// Writes the entry point at `SMBIOS_START` and the structure table after it.
///
/// The system UUID is `m.uuid` when given. Without one the guest gets a random version-4
/// UUID, new on every start: all-zero would mean "no UUID" and a fixed one would make every
/// VM look like the same machine.
pub fn write_smbios(mem: &GuestMemory, m: &MachineDescription) -> Result<(), TablesError> {
    m.validate()?;
    let table = StructureTable::for_machine(m);
    let table_addr = align_up(SMBIOS_START + ENTRY_POINT_LEN as u64, 16);
    check_fits("SMBIOS", table_addr, table.bytes.len(), SMBIOS_END)?;
    let entry = entry_point(&table, table_addr);
    write_bytes(mem, "SMBIOS entry point", SMBIOS_START, &entry)?;
    write_bytes(mem, "SMBIOS structure table", table_addr, &table.bytes)
}

fn entry_point(table: &StructureTable, table_addr: u64) -> Vec<u8> {
    let mut e = Vec::with_capacity(ENTRY_POINT_LEN);
    e.extend_from_slice(b"_SM_");
    e.push(0); // checksum, below
    e.push(ENTRY_POINT_LEN as u8);
    e.push(VERSION_MAJOR);
    e.push(VERSION_MINOR);
    e.put_u16(table.max_structure_size);
    e.push(0); // entry point revision: 2.1 format
    e.extend_from_slice(&[0; 5]);
    e.extend_from_slice(b"_DMI_");
    e.push(0); // intermediate checksum, below
               // check_fits() keeps the table inside the 32 KiB SMBIOS range below 1 MiB.
    e.put_u16(table.bytes.len() as u16);
    e.put_u32(table_addr as u32);
    e.put_u16(table.count);
    e.push(VERSION_MAJOR << 4 | VERSION_MINOR);
    debug_assert_eq!(e.len(), ENTRY_POINT_LEN);
    e[0x15] = checksum(&e[0x10..]);
    e[4] = checksum(&e);
    e
}

/// SMBIOS stores the first three UUID fields little-endian; the text form is big-endian.
fn smbios_uuid_bytes(textual: [u8; 16]) -> [u8; 16] {
    let mut u = textual;
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

/// A random version-4 UUID in textual byte order. `RandomState` is seeded from the OS's
/// random source, which spares a dependency for 16 bytes that need no cryptographic quality.
fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    for (i, half) in u.chunks_mut(8).enumerate() {
        let mut h = RandomState::new().build_hasher();
        h.write_usize(i);
        half.copy_from_slice(&h.finish().to_le_bytes());
    }
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// One structure: its formatted area, then its strings.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    fn new(kind: u8, handle: u16) -> Self {
        let mut formatted = vec![kind, 0];
        formatted.put_u16(handle);
        Self {
            formatted,
            strings: Vec::new(),
        }
    }

    /// Adds a string and returns its 1-based number; 0 ("none") for an empty string.
    fn string(&mut self, s: &str) -> u8 {
        if s.is_empty() {
            return 0;
        }
        // Strings are ours (constants and "CPU n"); NUL would end one early.
        debug_assert!(!s.contains('\0'));
        self.strings.push(s.to_owned());
        self.strings.len() as u8
    }

    fn into_bytes(mut self) -> Vec<u8> {
        self.formatted[1] = self.formatted.len() as u8;
        let mut bytes = self.formatted;
        for s in &self.strings {
            bytes.extend_from_slice(s.as_bytes());
            bytes.push(0);
        }
        if self.strings.is_empty() {
            bytes.push(0);
        }
        bytes.push(0);
        bytes
    }
}

struct StructureTable {
    bytes: Vec<u8>,
    count: u16,
    max_structure_size: u16,
    next_handle: u16,
}

impl StructureTable {
    fn for_machine(m: &MachineDescription) -> Self {
        let mut t = Self {
            bytes: Vec::new(),
            count: 0,
            max_structure_size: 0,
            next_handle: 0,
        };
        t.bios();
        t.system(m.uuid.unwrap_or_else(random_uuid));
        t.chassis();
        for cpu in 0..m.vcpus {
            t.processor(cpu);
        }
        let array = t.memory_array(m.memory_bytes);
        t.memory_device(array, m.memory_bytes);
        t.mapped_range(array, 0, lowmem_size(m.memory_bytes));
        let high = highmem_size(m.memory_bytes);
        if high > 0 {
            t.mapped_range(array, HIGHMEM_BASE, high);
        }
        t.boot_info();
        t.end();
        t
    }

    fn start(&mut self, kind: u8) -> Structure {
        let s = Structure::new(kind, self.next_handle);
        self.next_handle += 1;
        s
    }

    fn finish(&mut self, s: Structure) -> u16 {
        let handle = u16::from_le_bytes([s.formatted[2], s.formatted[3]]);
        let bytes = s.into_bytes();
        self.max_structure_size = self.max_structure_size.max(bytes.len() as u16);
        self.bytes.extend_from_slice(&bytes);
        self.count += 1;
        handle
    }

    fn bios(&mut self) {
        let mut s = self.start(TYPE_BIOS);
        let vendor = s.string(VENDOR);
        let version = s.string(BIOS_VERSION);
        let f = &mut s.formatted;
        f.push(vendor);
        f.push(version);
        f.put_u16(0xF000); // BIOS starting segment
        let date = s.string(BIOS_RELEASE_DATE);
        let f = &mut s.formatted;
        f.push(date);
        f.push(0); // ROM size: 64 KiB
        f.put_u64((1 << 4) | (1 << 7)); // ISA, PCI
        f.push(1 << 0); // ACPI supported
        f.push(1 << 4); // describes a virtual machine
        f.extend_from_slice(&[0, 0]); // system BIOS release
        f.extend_from_slice(&[0xFF, 0xFF]); // no embedded controller
        self.finish(s);
    }

    fn system(&mut self, uuid: [u8; 16]) {
        let mut s = self.start(TYPE_SYSTEM);
        let strings = [
            s.string(VENDOR),
            s.string(PRODUCT),
            s.string("1.0"),
            s.string("None"),
        ];
        s.formatted.extend_from_slice(&strings);
        s.formatted.extend_from_slice(&smbios_uuid_bytes(uuid));
        s.formatted.push(0x06); // woken by the power switch
        let sku = s.string("None");
        let family = s.string("Virtual Machine");
        s.formatted.extend_from_slice(&[sku, family]);
        self.finish(s);
    }

    fn chassis(&mut self) {
        let mut s = self.start(TYPE_CHASSIS);
        let manufacturer = s.string(VENDOR);
        s.formatted.push(manufacturer);
        s.formatted.push(0x01); // type: other
        let strings = [s.string("1.0"), s.string("None"), s.string("None")];
        s.formatted.extend_from_slice(&strings);
        s.formatted.extend_from_slice(&[0x03, 0x03, 0x03, 0x03]); // states: safe, security: none
        s.formatted.put_u32(0); // OEM-defined
        s.formatted.extend_from_slice(&[0, 0]); // height, power cords
        s.formatted.extend_from_slice(&[0, 0]); // no contained elements
        s.formatted.push(0); // SKU
        self.finish(s);
    }

    fn processor(&mut self, cpu: u8) {
        let mut s = self.start(TYPE_PROCESSOR);
        let socket = s.string(&format!("CPU {cpu}"));
        s.formatted.push(socket);
        s.formatted.push(0x03); // central processor
        s.formatted.push(0x01); // family: other
        let manufacturer = s.string(VENDOR);
        s.formatted.push(manufacturer);
        s.formatted.put_u64(0); // processor id: the guest reads CPUID itself
        s.formatted.push(0); // version string
        s.formatted.push(0); // voltage
        s.formatted.put_u16(0); // external clock: unknown
        s.formatted.put_u16(0); // max speed: unknown
        s.formatted.put_u16(0); // current speed: unknown
        s.formatted.push(0x41); // socket populated, CPU enabled
        s.formatted.push(0x01); // upgrade: other
        s.formatted.put_u16(NO_CACHE);
        s.formatted.put_u16(NO_CACHE);
        s.formatted.put_u16(NO_CACHE);
        s.formatted.extend_from_slice(&[0, 0, 0]); // serial, asset tag, part number
        s.formatted.extend_from_slice(&[1, 1, 1]); // cores, enabled cores, threads
        s.formatted.put_u16(1 << 2); // 64-bit capable
        s.formatted.put_u16(0x01); // family 2: other
        self.finish(s);
    }

    fn memory_array(&mut self, memory_bytes: u64) -> u16 {
        let mut s = self.start(TYPE_MEMORY_ARRAY);
        s.formatted.extend_from_slice(&[0x03, 0x03, 0x03]); // board, system memory, no ECC
        let kib = memory_bytes >> 10;
        if kib < 0x8000_0000 {
            s.formatted.put_u32(kib as u32);
        } else {
            s.formatted.put_u32(0x8000_0000); // see the extended field
        }
        s.formatted.put_u16(NO_ERROR_INFO);
        s.formatted.put_u16(1); // devices
        s.formatted
            .put_u64(if kib < 0x8000_0000 { 0 } else { memory_bytes });
        self.finish(s)
    }

    fn memory_device(&mut self, array: u16, memory_bytes: u64) {
        let mut s = self.start(TYPE_MEMORY_DEVICE);
        s.formatted.put_u16(array);
        s.formatted.put_u16(NO_ERROR_INFO);
        s.formatted.put_u16(64); // total width
        s.formatted.put_u16(64); // data width
        let mib = memory_bytes >> 20;
        let extended = if mib < u64::from(SIZE_IN_EXTENDED_FIELD) {
            s.formatted.put_u16(mib as u16);
            0
        } else {
            s.formatted.put_u16(SIZE_IN_EXTENDED_FIELD);
            // Bits 0-30 hold MiB: up to 2 PiB, far beyond any guest.
            mib.min(0x7FFF_FFFF) as u32
        };
        s.formatted.push(0x09); // DIMM
        s.formatted.push(0); // not in a set
        let locator = s.string("DIMM 0");
        let bank = s.string("Bank 0");
        s.formatted.extend_from_slice(&[locator, bank]);
        s.formatted.push(0x07); // RAM
        s.formatted.put_u16(1 << 1); // type detail: other
        s.formatted.put_u16(0); // speed: unknown
        let manufacturer = s.string(VENDOR);
        s.formatted.extend_from_slice(&[manufacturer, 0, 0, 0]);
        s.formatted.push(0); // rank unknown
        s.formatted.put_u32(extended);
        s.formatted.put_u16(0); // configured speed
        s.formatted.extend_from_slice(&[0; 6]); // voltages unknown
        self.finish(s);
    }

    fn mapped_range(&mut self, array: u16, start: u64, len: u64) {
        let mut s = self.start(TYPE_MEMORY_ARRAY_MAPPED);
        let end = start + len - 1;
        let (start_kib, end_kib) = (start >> 10, end >> 10);
        if end_kib < 0xFFFF_FFFF {
            s.formatted.put_u32(start_kib as u32);
            s.formatted.put_u32(end_kib as u32);
        } else {
            s.formatted.put_u32(0xFFFF_FFFF);
            s.formatted.put_u32(0xFFFF_FFFF);
        }
        s.formatted.put_u16(array);
        s.formatted.push(1); // partition width: one device
        let extended = end_kib >= 0xFFFF_FFFF;
        s.formatted.put_u64(if extended { start } else { 0 });
        s.formatted.put_u64(if extended { end } else { 0 });
        self.finish(s);
    }

    fn boot_info(&mut self) {
        let mut s = self.start(TYPE_BOOT_INFO);
        s.formatted.extend_from_slice(&[0; 6]);
        s.formatted.push(0); // no errors detected
        self.finish(s);
    }

    fn end(&mut self) {
        let s = self.start(TYPE_END);
        self.finish(s);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;

    #[derive(Debug)]
    struct Parsed {
        kind: u8,
        handle: u16,
        formatted: Vec<u8>,
        strings: Vec<String>,
    }

    impl Parsed {
        fn string(&self, index: u8) -> &str {
            if index == 0 {
                return "";
            }
            &self.strings[usize::from(index) - 1]
        }
    }

    fn parse(mem: &GuestMemory) -> (Vec<u8>, Vec<Parsed>) {
        let entry = read(mem, SMBIOS_START, ENTRY_POINT_LEN);
        assert_eq!(&entry[0..4], b"_SM_");
        assert_eq!(entry[5] as usize, ENTRY_POINT_LEN);
        assert!(sums_to_zero(&entry), "entry point checksum");
        assert_eq!(&entry[0x10..0x15], b"_DMI_");
        assert!(sums_to_zero(&entry[0x10..]), "intermediate checksum");
        assert_eq!((entry[6], entry[7], entry[0x1E]), (2, 8, 0x28));
        let len = u16_at(&entry, 0x16) as usize;
        let addr = u32_at(&entry, 0x18) as u64;
        assert_eq!(addr % 16, 0);
        let count = u16_at(&entry, 0x1C);
        let max = u16_at(&entry, 8) as usize;
        let table = read(mem, addr, len);

        let mut out = Vec::new();
        let mut off = 0;
        let mut seen_max = 0;
        while off < table.len() {
            let start = off;
            let flen = table[off + 1] as usize;
            let formatted = table[off..off + flen].to_vec();
            off += flen;
            let mut strings = Vec::new();
            if table[off] == 0 {
                assert_eq!(table[off + 1], 0, "no strings: double NUL");
                off += 2;
            } else {
                while table[off] != 0 {
                    let end = off + table[off..].iter().position(|b| *b == 0).unwrap();
                    strings.push(String::from_utf8(table[off..end].to_vec()).unwrap());
                    off = end + 1;
                }
                off += 1;
            }
            seen_max = seen_max.max(off - start);
            out.push(Parsed {
                kind: formatted[0],
                handle: u16_at(&formatted, 2),
                formatted,
                strings,
            });
        }
        assert_eq!(off, len, "structures fill the table exactly");
        assert_eq!(out.len(), count as usize);
        assert_eq!(max, seen_max, "max structure size");
        (entry, out)
    }

    fn of(all: &[Parsed], kind: u8) -> Vec<&Parsed> {
        all.iter().filter(|s| s.kind == kind).collect()
    }

    #[test]
    fn writes_every_structure_once_in_order() {
        let m = machine(3, 256 << 20);
        let mem = memory_for(&m);
        write_smbios(&mem, &m).unwrap();
        let (_, all) = parse(&mem);
        let kinds: Vec<u8> = all.iter().map(|s| s.kind).collect();
        assert_eq!(kinds, vec![0, 1, 3, 4, 4, 4, 16, 17, 19, 32, 127]);
        let handles: Vec<u16> = all.iter().map(|s| s.handle).collect();
        assert_eq!(handles, (0..11).collect::<Vec<u16>>());
        let lengths: Vec<usize> = all.iter().map(|s| s.formatted.len()).collect();
        assert_eq!(
            lengths,
            vec![0x18, 0x1B, 0x16, 0x2A, 0x2A, 0x2A, 0x17, 0x28, 0x1F, 0x0B, 4]
        );

        let bios = of(&all, 0)[0];
        assert_eq!(bios.string(bios.formatted[4]), "xhyve");
        assert_eq!(bios.string(bios.formatted[5]), BIOS_VERSION);
        assert_eq!(bios.string(bios.formatted[8]), BIOS_RELEASE_DATE);
        let system = of(&all, 1)[0];
        assert_eq!(system.string(system.formatted[5]), "xhyve");
        let cpus: Vec<&str> = of(&all, 4)
            .iter()
            .map(|p| p.string(p.formatted[4]))
            .collect();
        assert_eq!(cpus, vec!["CPU 0", "CPU 1", "CPU 2"]);
    }

    #[test]
    fn uuid_is_stored_in_smbios_byte_order() {
        let textual = [
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD,
            0xEE, 0xFF,
        ];
        let m = MachineDescription {
            uuid: Some(textual),
            ..machine(1, 64 << 20)
        };
        let mem = memory_for(&m);
        write_smbios(&mem, &m).unwrap();
        let (_, all) = parse(&mem);
        let system = of(&all, 1)[0];
        assert_eq!(
            system.formatted[8..24],
            [
                0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD,
                0xEE, 0xFF
            ]
        );
        // The field is followed by the wake-up type, untouched by the UUID.
        assert_eq!(system.formatted[24], 0x06);
    }

    #[test]
    fn missing_uuid_becomes_a_random_version_4_uuid() {
        let a = random_uuid();
        let b = random_uuid();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4);
        assert_eq!(a[8] >> 6, 0b10);
        let m = machine(1, 64 << 20);
        let mem = memory_for(&m);
        write_smbios(&mem, &m).unwrap();
        let (_, all) = parse(&mem);
        let stored = &of(&all, 1)[0].formatted[8..24];
        assert_ne!(stored, &[0u8; 16][..]);
        assert_eq!(stored[7] >> 4, 4, "version nibble, after the byte swap");
    }

    #[test]
    fn small_memory_sizes_and_ranges() {
        let m = machine(1, 512 << 20);
        let mem = memory_for(&m);
        write_smbios(&mem, &m).unwrap();
        let (_, all) = parse(&mem);
        let array = of(&all, 16)[0];
        assert_eq!(u32_at(&array.formatted, 7), 512 << 10);
        let device = of(&all, 17)[0];
        assert_eq!(u16_at(&device.formatted, 4), array.handle);
        assert_eq!(u16_at(&device.formatted, 12), 512);
        assert_eq!(u32_at(&device.formatted, 28), 0);
        let ranges = of(&all, 19);
        assert_eq!(ranges.len(), 1);
        assert_eq!(u32_at(&ranges[0].formatted, 4), 0);
        assert_eq!(u32_at(&ranges[0].formatted, 8), (512 << 10) - 1);
        assert_eq!(u16_at(&ranges[0].formatted, 12), array.handle);
    }

    #[test]
    fn large_memory_uses_extended_size_and_high_range() {
        let m = machine(2, 40 << 30);
        let mem = memory_for(&m);
        write_smbios(&mem, &m).unwrap();
        let (_, all) = parse(&mem);
        let device = of(&all, 17)[0];
        assert_eq!(u16_at(&device.formatted, 12), 0x7FFF);
        assert_eq!(u32_at(&device.formatted, 28), 40 << 10);
        let array = of(&all, 16)[0];
        assert_eq!(u32_at(&array.formatted, 7), 40 << 20);
        let ranges: Vec<(u32, u32)> = of(&all, 19)
            .iter()
            .map(|r| (u32_at(&r.formatted, 4), u32_at(&r.formatted, 8)))
            .collect();
        assert_eq!(
            ranges,
            vec![(0, (3 << 20) - 1), (4 << 20, (41 << 20) - 1)],
            "3 GiB low, 37 GiB from 4 GiB, in KiB"
        );
    }

    #[test]
    fn terabytes_use_the_extended_fields() {
        // Not mapped: the table builder only needs the size.
        let m = machine(1, 5 << 40);
        let t = StructureTable::for_machine(&m);
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let addr = align_up(SMBIOS_START + ENTRY_POINT_LEN as u64, 16);
        write_bytes(&mem, "test", SMBIOS_START, &entry_point(&t, addr)).unwrap();
        write_bytes(&mem, "test", addr, &t.bytes).unwrap();
        let (_, all) = parse(&mem);
        let array = of(&all, 16)[0];
        assert_eq!(u32_at(&array.formatted, 7), 0x8000_0000);
        assert_eq!(u64_at(&array.formatted, 15), 5 << 40);
        let high = of(&all, 19)[1];
        assert_eq!(u32_at(&high.formatted, 4), 0xFFFF_FFFF);
        assert_eq!(u64_at(&high.formatted, 15), 4 << 30);
        assert_eq!(
            u64_at(&high.formatted, 23),
            (4 << 30) + (5 << 40) - (3 << 30) - 1
        );
    }

    #[test]
    fn the_most_vcpus_fit() {
        let m = machine(254, 64 << 20);
        let mem = memory_for(&m);
        write_smbios(&mem, &m).unwrap();
        let (_, all) = parse(&mem);
        assert_eq!(of(&all, 4).len(), 254);
    }
}
