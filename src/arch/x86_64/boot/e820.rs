//! The guest's physical memory map as every loader reports it (BIOS e820 form).

use crate::arch::x86_64::layout::{highmem_size, lowmem_size, HIGHMEM_BASE};

/// Start of the extended BIOS data area: RAM below it is the guest's conventional memory.
pub const EBDA_START: u64 = 0x9_FC00;
/// End of the legacy VGA/BIOS area that `EBDA_START..LOW_RESERVED_END` partly covers.
const VGA_START: u64 = 0xA_0000;
/// The BIOS area that holds the MP table, SMBIOS and ACPI tables.
pub const BIOS_AREA_START: u64 = 0xE_0000;
/// First byte of RAM above the legacy area.
pub const HIGH_RAM_START: u64 = 0x10_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum E820Kind {
    Ram,
    Reserved,
    Acpi,
}

impl E820Kind {
    /// The type code that e820, multiboot mmap and PVH memmap entries carry.
    pub fn code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
            E820Kind::Acpi => 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The e820 map for a guest with `memory_bytes` of RAM laid out as `vmm::memory` maps it.
pub fn e820_map(memory_bytes: u64) -> Vec<E820Entry> {
    let lowmem_end = lowmem_size(memory_bytes);
    let highmem = highmem_size(memory_bytes);
    let mut map = Vec::with_capacity(5);
    let mut push = |addr: u64, end: u64, kind: E820Kind| {
        if end > addr {
            map.push(E820Entry {
                addr,
                size: end - addr,
                kind,
            });
        }
    };
    push(0, EBDA_START.min(lowmem_end), E820Kind::Ram);
    push(EBDA_START, VGA_START, E820Kind::Reserved);
    push(BIOS_AREA_START, HIGH_RAM_START, E820Kind::Reserved);
    push(HIGH_RAM_START, lowmem_end, E820Kind::Ram);
    push(HIGHMEM_BASE, HIGHMEM_BASE + highmem, E820Kind::Ram);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addr: u64, end: u64, kind: E820Kind) -> E820Entry {
        E820Entry {
            addr,
            size: end - addr,
            kind,
        }
    }

    #[test]
    fn small_guest_has_low_ram_and_legacy_holes() {
        assert_eq!(
            e820_map(256 << 20),
            vec![
                entry(0, 0x9_FC00, E820Kind::Ram),
                entry(0x9_FC00, 0xA_0000, E820Kind::Reserved),
                entry(0xE_0000, 0x10_0000, E820Kind::Reserved),
                entry(0x10_0000, 256 << 20, E820Kind::Ram),
            ]
        );
    }

    #[test]
    fn large_guest_continues_above_4g() {
        let map = e820_map(8 << 30);
        assert_eq!(map.len(), 5);
        assert_eq!(map[3], entry(0x10_0000, 3 << 30, E820Kind::Ram));
        assert_eq!(map[4], entry(4 << 30, 9 << 30, E820Kind::Ram));
        // Exactly 3 GiB has no high part.
        assert_eq!(e820_map(3 << 30).len(), 4);
    }

    #[test]
    fn one_mib_guest_has_no_empty_entries() {
        let map = e820_map(1 << 20);
        assert!(map.iter().all(|e| e.size > 0));
        assert_eq!(map.iter().filter(|e| e.kind == E820Kind::Ram).count(), 1);
    }

    #[test]
    fn kind_codes_match_the_bios_convention() {
        assert_eq!(E820Kind::Ram.code(), 1);
        assert_eq!(E820Kind::Reserved.code(), 2);
        assert_eq!(E820Kind::Acpi.code(), 3);
    }
}
