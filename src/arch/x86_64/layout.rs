//! The x86 machine's memory map, as xhyve lays it out: RAM up to 3 GiB from address 0, the
//! rest from 4 GiB; the 3-4 GiB hole holds PCI BARs, ECAM, the IOAPIC, HPET and LAPIC.

/// End of RAM mapped from 0 (xhyve's lowmem limit).
pub const LOWMEM_LIMIT: u64 = 3 << 30;
/// Where RAM beyond `LOWMEM_LIMIT` continues.
pub const HIGHMEM_BASE: u64 = 4 << 30;
/// Start of the 32-bit PCI memory hole (BARs) below 4 GiB.
pub const PCI_HOLE_START: u64 = LOWMEM_LIMIT;
/// PCI Express ECAM (MMCONFIG) base and size: one bus.
pub const PCI_ECAM_BASE: u64 = 0xE000_0000;
pub const PCI_ECAM_SIZE: u64 = 1 << 20;
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
pub const HPET_BASE: u64 = 0xFED0_0000;
pub const LAPIC_BASE: u64 = 0xFEE0_0000;

/// The guest-physical RAM ranges for `size` bytes of RAM: `(start, len)`.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(LOWMEM_LIMIT);
    let mut ranges = vec![(0, low)];
    if size > LOWMEM_LIMIT {
        ranges.push((HIGHMEM_BASE, size - LOWMEM_LIMIT));
    }
    ranges
}

/// Size of RAM below 4 GiB.
pub fn lowmem_size(size: u64) -> u64 {
    size.min(LOWMEM_LIMIT)
}

/// Size of RAM from 4 GiB up.
pub fn highmem_size(size: u64) -> u64 {
    size.saturating_sub(LOWMEM_LIMIT)
}
