//! Where the loaders put things in guest RAM, and the bookkeeping that keeps blobs apart.
//!
//! Every blob a loader writes is first claimed here, which checks that it lies in RAM (the
//! e820 RAM ranges, so never in the firmware area at 0x9FC00-0x100000 or the PCI hole) and
//! that it overlaps nothing claimed before. Errors name the address.

use super::e820::{e820_map, E820Kind};
use super::BootError;

/// Low-memory addresses, all below the EBDA. 0-0x1000 (real-mode IVT, BDA) stays untouched
/// so that test guests that drop to real mode find it intact.
pub const GDT_AREA: u64 = 0x1000;
pub const GDT_AREA_SIZE: u64 = 0x1000;
/// Multiboot information, its memory map, module list and strings.
pub const MULTIBOOT_INFO_AREA: u64 = 0x2000;
pub const MULTIBOOT_INFO_AREA_SIZE: u64 = 0x6000;
/// PVH `hvm_start_info`, its module list and memory map.
pub const PVH_START_INFO: u64 = 0x6000;
pub const PVH_START_INFO_SIZE: u64 = 0x1000;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
pub const ZERO_PAGE_SIZE: u64 = 0x1000;
/// Linux command line; it may extend up to `CMDLINE_AREA_END`.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
pub const CMDLINE_AREA_END: u64 = super::e820::EBDA_START;

pub const PAGE_SIZE: u64 = 0x1000;

struct Claim {
    start: u64,
    end: u64,
    what: String,
}

/// RAM of one guest and the blobs placed in it so far.
pub struct GuestLayout {
    ram: Vec<(u64, u64)>,
    claims: Vec<Claim>,
}

pub fn align_up(value: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

pub fn align_down(value: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    value & !(align - 1)
}

impl GuestLayout {
    pub fn new(memory_bytes: u64) -> Self {
        let ram = e820_map(memory_bytes)
            .into_iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| (e.addr, e.end()))
            .collect();
        GuestLayout {
            ram,
            claims: Vec::new(),
        }
    }

    fn in_ram(&self, start: u64, end: u64) -> bool {
        self.ram.iter().any(|&(s, e)| start >= s && end <= e)
    }

    fn conflict(&self, start: u64, end: u64) -> Option<&Claim> {
        self.claims.iter().find(|c| start < c.end && c.start < end)
    }

    /// Checks `[start, start + len)` and records it as holding `what`.
    pub fn claim(&mut self, what: &str, start: u64, len: u64) -> Result<(), BootError> {
        let end = start.checked_add(len).ok_or(BootError::OutsideRam {
            what: what.to_string(),
            start,
            end: u64::MAX,
        })?;
        if len == 0 {
            return Ok(());
        }
        if !self.in_ram(start, end) {
            return Err(BootError::OutsideRam {
                what: what.to_string(),
                start,
                end,
            });
        }
        if let Some(other) = self.conflict(start, end) {
            return Err(BootError::Overlap {
                what: what.to_string(),
                start,
                end,
                other: other.what.clone(),
                other_start: other.start,
            });
        }
        self.claims.push(Claim {
            start,
            end,
            what: what.to_string(),
        });
        Ok(())
    }

    /// The highest page-aligned free address where `size` bytes fit entirely below `limit`
    /// and at or above `floor`.
    pub fn highest_free(&self, size: u64, floor: u64, limit: u64) -> Option<u64> {
        let mut candidate = align_down(limit.checked_sub(size)?, PAGE_SIZE);
        loop {
            if candidate < floor {
                return None;
            }
            let end = candidate.checked_add(size)?;
            match self.conflict(candidate, end) {
                Some(c) => candidate = align_down(c.start.checked_sub(size)?, PAGE_SIZE),
                None => return self.in_ram(candidate, end).then_some(candidate),
            }
        }
    }

    /// The lowest page-aligned free address at or above `from` where `size` bytes fit in RAM.
    pub fn lowest_free(&self, size: u64, from: u64) -> Option<u64> {
        let mut candidate = align_up(from, PAGE_SIZE)?;
        loop {
            let end = candidate.checked_add(size)?;
            match self.conflict(candidate, end) {
                Some(c) => candidate = align_up(c.end, PAGE_SIZE)?,
                None => return self.in_ram(candidate, end).then_some(candidate),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn claims_must_be_in_ram_and_apart() {
        let mut layout = GuestLayout::new(64 * MIB);
        layout.claim("kernel", MIB, MIB).unwrap();
        let err = layout.claim("initrd", MIB + 4096, 10).unwrap_err();
        assert_eq!(
            err.to_string(),
            "initrd at 0x101000-0x10100a overlaps kernel at 0x100000"
        );
        let err = layout.claim("segment", 0xF_0000, 16).unwrap_err();
        assert_eq!(
            err.to_string(),
            "segment at 0xf0000-0xf0010 is outside guest RAM"
        );
        // Straddling the EBDA boundary is outside RAM too.
        assert!(layout.claim("blob", 0x9_F000, 0x1000).is_err());
        assert!(layout.claim("blob", 64 * MIB - 8, 16).is_err());
        assert!(layout.claim("blob", u64::MAX - 2, 16).is_err());
        layout.claim("adjacent", 2 * MIB, 16).unwrap();
    }

    #[test]
    fn highest_free_skips_claims_and_respects_floor() {
        let mut layout = GuestLayout::new(64 * MIB);
        assert_eq!(
            layout.highest_free(5000, MIB, 64 * MIB),
            Some(64 * MIB - 0x2000)
        );
        layout.claim("top", 63 * MIB, MIB).unwrap();
        assert_eq!(
            layout.highest_free(4096, MIB, 64 * MIB),
            Some(63 * MIB - 4096)
        );
        assert_eq!(layout.highest_free(63 * MIB, MIB, 64 * MIB), None);
        assert_eq!(layout.highest_free(u64::MAX, 0, 64 * MIB), None);
    }

    #[test]
    fn lowest_free_skips_claims_and_stops_at_ram_end() {
        let mut layout = GuestLayout::new(4 * MIB);
        layout.claim("kernel", MIB, 0x1234).unwrap();
        assert_eq!(layout.lowest_free(10, MIB), Some(MIB + 0x2000));
        assert_eq!(layout.lowest_free(3 * MIB, MIB), None);
        assert_eq!(layout.lowest_free(10, u64::MAX - 5), None);
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(1, 4096), Some(4096));
        assert_eq!(align_up(4096, 4096), Some(4096));
        assert_eq!(align_up(u64::MAX, 4096), None);
        assert_eq!(align_down(8191, 4096), 4096);
    }
}
