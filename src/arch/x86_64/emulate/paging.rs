//! Guest linear-address translation for the emulators: the guest's RAM as the back end maps
//! it, and a walk of the guest's own page tables (32-bit, PAE, 4- and 5-level) for string I/O,
//! instruction fetches and the memory operands of emulated instructions. Permission and accessed/dirty bits are not
//! modelled: the walk serves emulation, not protection.

use super::mmio::CpuMode;
use crate::hv::regs::{CR0_PG, CR4_PAE, CR4_PSE, EFER_LMA};

/// CR4.LA57: 5-level paging in long mode.
const CR4_LA57: u64 = 1 << 12;

/// Guest-physical memory as the back end sees it (bounds-checked; false = not RAM).
pub trait GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool;
    fn write(&self, gpa: u64, buf: &[u8]) -> bool;

    /// Stores `new` at `gpa` if `expected` is there, else copies what is there to `actual`;
    /// `Some(swapped)`, or `None` when the range is not RAM. All three slices have one length
    /// (8 or 16). This default is not atomic against other vCPUs; a back end whose vCPUs run
    /// while the VMM emulates overrides it with a locked compare-exchange.
    fn compare_exchange(
        &self,
        gpa: u64,
        expected: &[u8],
        new: &[u8],
        actual: &mut [u8],
    ) -> Option<bool> {
        if !self.read(gpa, actual) {
            return None;
        }
        if actual != expected {
            return Some(false);
        }
        self.write(gpa, new).then_some(true)
    }
}

/// Paging state for guest linear-address translation.
/// #PF error-code bits.
pub const PF_PRESENT: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const CR0_WP: u64 = 1 << 16;

/// Why a checked data access cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The access faults in the guest: deliver #PF with this error code.
    PageFault { error_code: u32 },
    /// A paging structure is not in RAM: nothing the guest could be told.
    NotRam,
}

#[derive(Debug, Clone, Copy)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    /// Walks the guest page tables; `None` when a level is not present or not in RAM.
    /// The guest-physical address of a data access the VMM makes for the guest's instruction,
    /// checked as the processor checks it: a page that is not present, or a write to a page
    /// that is read-only at any level (supervisor writes too, as CR0.WP=1 asks), is the #PF
    /// the instruction would raise. Accesses are supervisor accesses: the completer runs CPL0
    /// instructions only.
    pub fn translate_data(
        &self,
        ram: &dyn GuestRam,
        linear: u64,
        write: bool,
    ) -> Result<u64, WalkError> {
        if self.cr0 & CR0_PG == 0 {
            return Ok(linear);
        }
        let write_bit = if write { PF_WRITE } else { 0 };
        let not_present = WalkError::PageFault {
            error_code: write_bit,
        };
        let protection = WalkError::PageFault {
            error_code: PF_PRESENT | write_bit,
        };
        let wp = self.cr0 & CR0_WP != 0;
        let mut writable = true;
        let read_entry = |addr: u64, wide: bool| -> Result<u64, WalkError> {
            if wide {
                let mut b = [0u8; 8];
                ram.read(addr, &mut b)
                    .then(|| u64::from_le_bytes(b))
                    .ok_or(WalkError::NotRam)
            } else {
                let mut b = [0u8; 4];
                ram.read(addr, &mut b)
                    .then(|| u64::from(u32::from_le_bytes(b)))
                    .ok_or(WalkError::NotRam)
            }
        };
        let gpa = if self.cr4 & CR4_PAE == 0 {
            let linear = linear & 0xffff_ffff;
            let pde_at = (self.cr3 & 0xffff_f000) + (linear >> 22) * 4;
            let pde = read_entry(pde_at, false)?;
            if pde & PTE_PRESENT == 0 {
                return Err(not_present);
            }
            writable &= pde & PTE_WRITABLE != 0;
            if pde & PTE_LARGE != 0 && self.cr4 & CR4_PSE != 0 {
                (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32 | (linear & 0x3f_ffff)
            } else {
                let pte_at = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
                let pte = read_entry(pte_at, false)?;
                if pte & PTE_PRESENT == 0 {
                    return Err(not_present);
                }
                writable &= pte & PTE_WRITABLE != 0;
                (pte & 0xffff_f000) | (linear & 0xfff)
            }
        } else {
            let (mut table, levels, linear) = if self.efer & EFER_LMA != 0 {
                let levels = if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
                (self.cr3 & PTE_ADDR, levels, linear)
            } else {
                // PAE: the PDPT entries have no R/W or accessed bits of their own to keep.
                let linear = linear & 0xffff_ffff;
                let pdpte = read_entry((self.cr3 & 0xffff_ffe0) + (linear >> 30) * 8, true)?;
                if pdpte & PTE_PRESENT == 0 {
                    return Err(not_present);
                }
                (pdpte & PTE_ADDR, 2, linear)
            };
            let mut found = None;
            for level in (1..=levels).rev() {
                let shift = 12 + 9 * (level - 1);
                let at = table + ((linear >> shift) & 0x1ff) * 8;
                let e = read_entry(at, true)?;
                if e & PTE_PRESENT == 0 {
                    return Err(not_present);
                }
                writable &= e & PTE_WRITABLE != 0;
                if level == 1 || (level <= 3 && e & PTE_LARGE != 0) {
                    let page_mask = (1u64 << shift) - 1;
                    found = Some((e & PTE_ADDR & !page_mask) | (linear & page_mask));
                    break;
                }
                table = e & PTE_ADDR;
            }
            found.ok_or(not_present)?
        };
        if write && wp && !writable {
            return Err(protection);
        }
        // Accessed and dirty bits are left alone: an instruction the completer then refuses
        // must leave guest memory untouched (the VMM stops instead), and Linux marks the pages
        // it lets the kernel write dirty when it maps them.
        Ok(gpa)
    }

    pub fn translate(&self, ram: &dyn GuestRam, linear: u64) -> Option<u64> {
        if self.cr0 & CR0_PG == 0 {
            return Some(linear);
        }
        let entry = |table: u64, index: u64, wide: bool| -> Option<u64> {
            if wide {
                let mut b = [0u8; 8];
                ram.read(table + index * 8, &mut b)
                    .then(|| u64::from_le_bytes(b))
            } else {
                let mut b = [0u8; 4];
                ram.read(table + index * 4, &mut b)
                    .then(|| u64::from(u32::from_le_bytes(b)))
            }
        };
        const PRESENT: u64 = 1;
        const LARGE: u64 = 1 << 7;
        const ADDR: u64 = 0x000f_ffff_ffff_f000;
        if self.cr4 & CR4_PAE == 0 {
            // Two-level 32-bit paging, 4 MiB pages with CR4.PSE.
            let linear = linear & 0xffff_ffff;
            let pde = entry(self.cr3 & 0xffff_f000, linear >> 22, false)?;
            if pde & PRESENT == 0 {
                return None;
            }
            if pde & LARGE != 0 && self.cr4 & CR4_PSE != 0 {
                let base = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32;
                return Some(base | (linear & 0x3f_ffff));
            }
            let pte = entry(pde & 0xffff_f000, (linear >> 12) & 0x3ff, false)?;
            return (pte & PRESENT != 0).then_some((pte & 0xffff_f000) | (linear & 0xfff));
        }
        let (mut table, levels) = if self.efer & EFER_LMA != 0 {
            (
                self.cr3 & ADDR,
                if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 },
            )
        } else {
            // PAE: the 32-byte-aligned PDPT holds four entries indexed by bits 31:30.
            let linear32 = linear & 0xffff_ffff;
            let pdpte = entry(self.cr3 & 0xffff_ffe0, linear32 >> 30, true)?;
            if pdpte & PRESENT == 0 {
                return None;
            }
            (pdpte & ADDR, 2)
        };
        let linear = if levels == 2 {
            linear & 0xffff_ffff
        } else {
            linear
        };
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = entry(table, (linear >> shift) & 0x1ff, true)?;
            if e & PRESENT == 0 {
                return None;
            }
            if level == 1 || (level <= 3 && e & LARGE != 0) {
                let page_mask = (1u64 << shift) - 1;
                return Some((e & ADDR & !page_mask) | (linear & page_mask));
            }
            table = e & ADDR;
        }
        None
    }
}

/// Reads up to `buf.len()` instruction bytes at `linear`, page by page; returns how many.
pub fn fetch(
    ram: &dyn GuestRam,
    paging: &Paging,
    linear: u64,
    mode: CpuMode,
    buf: &mut [u8],
) -> usize {
    let mut done = 0;
    while done < buf.len() {
        let mut at = linear.wrapping_add(done as u64);
        if mode != CpuMode::Long64 {
            at &= 0xffff_ffff;
        }
        let in_page = (0x1000 - (at & 0xfff)) as usize;
        let chunk = in_page.min(buf.len() - done);
        match paging.translate(ram, at) {
            Some(gpa) if ram.read(gpa, &mut buf[done..done + chunk]) => done += chunk,
            _ => break,
        }
    }
    done
}
