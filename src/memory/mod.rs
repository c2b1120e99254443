//! Guest RAM: the host mappings behind guest-physical addresses, laid out by the
//! architecture's memory map (`arch::x86_64::layout`). Every layer that touches guest memory
//! imports it from here, never from `vmm`. RAM is anonymous,
//! `MAP_NORESERVE` memory (vm-memory's default), so nothing is committed until the guest
//! touches it: `-m 8G` costs nothing up front.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_ranges;

pub mod guest_ram;

pub type GuestMemory = GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("invalid memory size {0} bytes: must be at least 1 MiB")]
    TooSmall(u64),
    #[error("invalid memory size {0} bytes: must be a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Maps `size` bytes of guest RAM with xhyve's layout.
pub fn create_guest_memory(size: u64) -> Result<GuestMemory, MemoryError> {
    if size < (1 << 20) {
        return Err(MemoryError::TooSmall(size));
    }
    if size % 4096 != 0 {
        return Err(MemoryError::Unaligned(size));
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map { size, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_guest_is_one_low_region() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        let mem = create_guest_memory(256 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn large_guest_skips_the_pci_hole() {
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(lowmem_size(8 << 30), 3 << 30);
        assert_eq!(highmem_size(8 << 30), 5 << 30);
        assert_eq!(highmem_size(1 << 30), 0);
    }

    #[test]
    fn eight_gib_maps_lazily_and_is_usable_above_4g() {
        let mem = create_guest_memory(8 << 30).unwrap();
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 << 30), (4 << 30, 5 << 30)]);
        mem.write_obj(0xdead_beef_u32, GuestAddress((8 << 30) + 12))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((8 << 30) + 12)).unwrap(),
            0xdead_beef
        );
        // The hole is not RAM.
        assert!(mem.read_obj::<u32>(GuestAddress(LAPIC_BASE)).is_err());
        assert!(mem.read_obj::<u32>(GuestAddress(9 << 30)).is_err());
    }

    #[test]
    fn rejects_tiny_and_unaligned_sizes() {
        assert!(matches!(
            create_guest_memory(4096),
            Err(MemoryError::TooSmall(4096))
        ));
        assert!(matches!(
            create_guest_memory((1 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
    }
}
