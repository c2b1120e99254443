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
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl Paging {
    /// Walks the guest page tables; `None` when a level is not present or not in RAM.
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
