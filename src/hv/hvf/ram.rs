//! Guest RAM as the macOS back end sees it: the host mappings handed to `hv_vm_map`, kept in
//! a table so the VMX layer can read page tables and instruction bytes and emulate memory
//! operands. Portable (tested on Linux over ordinary buffers).

/// One guest-physical range backed by host memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    guest_addr: u64,
    size: u64,
    host_addr: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamError {
    #[error("guest memory {guest_addr:#x}+{size:#x} overlaps a mapped region")]
    Overlap { guest_addr: u64, size: u64 },
    #[error("guest memory {guest_addr:#x}+{size:#x} wraps the address space")]
    Wraps { guest_addr: u64, size: u64 },
}

/// The mapped regions, sorted by guest address, never overlapping.
#[derive(Debug, Default, Clone)]
pub struct RegionTable {
    regions: Vec<Region>,
}

impl RegionTable {
    pub fn new() -> Self {
        RegionTable::default()
    }

    /// Records `host_addr..+size` as the RAM at `guest_addr`.
    ///
    /// # Safety
    /// The host range must stay mapped, readable and writable for as long as this table
    /// (or anything reading through it) lives.
    pub unsafe fn insert(
        &mut self,
        guest_addr: u64,
        size: u64,
        host_addr: *mut u8,
    ) -> Result<(), RamError> {
        let end = guest_addr
            .checked_add(size)
            .ok_or(RamError::Wraps { guest_addr, size })?;
        let overlaps = self
            .regions
            .iter()
            .any(|r| guest_addr < r.guest_addr + r.size && r.guest_addr < end);
        if overlaps {
            return Err(RamError::Overlap { guest_addr, size });
        }
        let at = self.regions.partition_point(|r| r.guest_addr < guest_addr);
        self.regions.insert(
            at,
            Region {
                guest_addr,
                size,
                host_addr: host_addr as usize,
            },
        );
        Ok(())
    }

    /// The host address of `gpa..gpa+len`, if one region holds all of it.
    fn host_range(&self, gpa: u64, len: usize) -> Option<usize> {
        let len = u64::try_from(len).ok()?;
        let end = gpa.checked_add(len)?;
        let at = self.regions.partition_point(|r| r.guest_addr <= gpa);
        let region = self.regions.get(at.checked_sub(1)?)?;
        if end > region.guest_addr + region.size {
            return None;
        }
        let offset = usize::try_from(gpa - region.guest_addr).ok()?;
        region.host_addr.checked_add(offset)
    }

    /// Copies guest RAM at `gpa` into `buf`; false (and `buf` untouched) unless one region
    /// holds the whole range.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(host) = self.host_range(gpa, buf.len()) else {
            return false;
        };
        // SAFETY: `host..host+len` lies inside a region that `insert`'s contract keeps mapped
        // and readable. Guest RAM is shared with running vCPUs, so the bytes may change under
        // us; they are plain data, copied, and never form a Rust reference into guest memory.
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copies `buf` into guest RAM at `gpa`; false (and nothing written) unless one region
    /// holds the whole range.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        let Some(host) = self.host_range(gpa, buf.len()) else {
            return false;
        };
        // SAFETY: as in `read`; the region is writable by `insert`'s contract.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), host as *mut u8, buf.len()) };
        true
    }
}

impl super::vmx::GuestRam for RegionTable {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        RegionTable::read(self, gpa, buf)
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        RegionTable::write(self, gpa, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Low RAM at 0 and high RAM at 4 GiB, as the VMM maps them, over two buffers.
    fn table(low: &mut [u8], high: &mut [u8]) -> RegionTable {
        let mut t = RegionTable::new();
        // SAFETY: the buffers outlive the table in every test.
        unsafe {
            t.insert(1 << 32, high.len() as u64, high.as_mut_ptr())
                .unwrap();
            t.insert(0, low.len() as u64, low.as_mut_ptr()).unwrap();
        }
        t
    }

    #[test]
    fn reads_and_writes_land_in_the_right_region() {
        let mut low = vec![0u8; 0x2000];
        let mut high = vec![0u8; 0x1000];
        let t = table(&mut low, &mut high);
        assert!(t.write(0x1ffc, &[1, 2, 3, 4]));
        assert!(t.write((1 << 32) + 8, &[9; 8]));
        let mut buf = [0u8; 4];
        assert!(t.read(0x1ffc, &mut buf));
        assert_eq!(buf, [1, 2, 3, 4]);
        let mut wide = [0u8; 8];
        assert!(t.read((1 << 32) + 8, &mut wide));
        assert_eq!(wide, [9; 8]);
        drop(t);
        assert_eq!(&low[0x1ffc..], &[1, 2, 3, 4]);
        assert_eq!(&high[8..16], &[9; 8]);
    }

    #[test]
    fn ranges_outside_or_across_regions_are_not_ram() {
        let mut low = vec![0u8; 0x2000];
        let mut high = vec![0u8; 0x1000];
        let t = table(&mut low, &mut high);
        let mut buf = [0xAAu8; 4];
        for gpa in [
            0x1ffe,
            0x2000,
            0xFEE0_0000,
            (1 << 32) - 2,
            (1 << 32) + 0xffe,
            u64::MAX - 1,
        ] {
            assert!(!t.read(gpa, &mut buf), "{gpa:#x}");
            assert!(!t.write(gpa, &[0; 4]), "{gpa:#x}");
        }
        assert_eq!(buf, [0xAA; 4], "untouched on failure");
        assert!(t.read(0, &mut []), "an empty access inside RAM is fine");
    }

    #[test]
    fn overlapping_or_wrapping_regions_are_refused() {
        let mut low = vec![0u8; 0x2000];
        let mut high = vec![0u8; 0x1000];
        let mut t = table(&mut low, &mut high);
        let mut other = vec![0u8; 0x1000];
        // SAFETY: refused inserts record nothing; `other` outlives `t` anyway.
        unsafe {
            assert_eq!(
                t.insert(0x1000, 0x1000, other.as_mut_ptr()),
                Err(RamError::Overlap {
                    guest_addr: 0x1000,
                    size: 0x1000
                })
            );
            assert!(matches!(
                t.insert(u64::MAX, 2, other.as_mut_ptr()),
                Err(RamError::Wraps { .. })
            ));
            assert!(t.insert(0x2000, 0x1000, other.as_mut_ptr()).is_ok());
        }
        assert!(t.write(0x2ff0, &[5; 16]), "the new region is RAM");
        assert!(
            !t.write(0x1ff8, &[5; 16]),
            "adjacent regions are separate host mappings: no access spans both"
        );
    }
}
