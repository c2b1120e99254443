//! Guest linear-address translation for the emulators: the guest's RAM as the back end maps
//! it, and a walk of the guest's own page tables (32-bit, PAE, 4- and 5-level) for string I/O,
//! instruction fetches and the memory operands of emulated instructions. [`Paging::translate`]
//! serves MMIO emulation and checks nothing; [`Paging::walk`] checks an access as the
//! processor does and reports the accessed/dirty flags it would set.

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

/// #PF error-code bits (SDM vol. 3 §4.7).
pub const PF_PRESENT: u32 = 1 << 0;
pub const PF_WRITE: u32 = 1 << 1;
pub const PF_USER: u32 = 1 << 2;
pub const PF_RESERVED: u32 = 1 << 3;
pub const PF_FETCH: u32 = 1 << 4;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_ACCESSED: u64 = 1 << 5;
const PTE_DIRTY: u64 = 1 << 6;
const PTE_LARGE: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const CR0_WP: u64 = 1 << 16;
const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
const EFER_NXE: u64 = 1 << 11;

/// What a checked access does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// Who makes a checked access, which decides the permission rules (SDM vol. 3 §4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privilege {
    /// An access at CPL 3.
    User,
    /// An explicit access at CPL 0-2; `ac` is EFLAGS.AC, which opens user pages to data
    /// accesses under SMAP.
    Supervisor { ac: bool },
    /// An implicit supervisor-mode access (the GDT, LDT, IDT or TSS, whatever the CPL):
    /// SMAP applies whatever EFLAGS.AC says.
    Implicit,
}

impl Privilege {
    /// An explicit access at `cpl` with EFLAGS.AC = `ac`.
    pub fn at(cpl: u8, ac: bool) -> Privilege {
        if cpl == 3 {
            Privilege::User
        } else {
            Privilege::Supervisor { ac }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub kind: AccessKind,
    pub privilege: Privilege,
}

/// Why a checked access cannot be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The access faults in the guest: deliver #PF with this error code.
    PageFault { error_code: u32 },
    /// A paging structure is not in RAM: nothing the guest could be told.
    NotRam,
}

/// A paging-structure entry a walk used whose accessed (and, for a write, dirty) flag is
/// still clear: the processor would set it, the caller does once the instruction commits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryUpdate {
    /// Guest-physical address of the entry.
    pub gpa: u64,
    /// An 8-byte entry (PAE, 4- and 5-level paging), else a 4-byte one (32-bit paging).
    pub wide: bool,
    /// The entry as the walk read it.
    pub seen: u64,
    /// The flags to set (accessed, dirty).
    pub set: u64,
}

impl EntryUpdate {
    /// Sets the flags with a compare-exchange, as the processor's locked update does: another
    /// vCPU may be changing the same table. When the entry no longer maps what the walk saw
    /// (the guest changed it meanwhile) it is left alone: the flags belong to the old mapping.
    /// False when the entry is not in RAM.
    pub fn apply(&self, ram: &dyn GuestRam) -> bool {
        // A 4-byte entry is updated through the naturally aligned 8 bytes around it, the
        // width every back end's compare-exchange supports.
        let word_at = self.gpa & !7;
        let shift = if self.wide { 0 } else { (self.gpa & 4) * 8 };
        let mask = if self.wide { u64::MAX } else { 0xffff_ffff };
        if self.wide && self.gpa & 7 != 0 {
            return false;
        }
        // Other vCPUs changing the neighbouring entry can fail the exchange; each failure
        // means they made progress, and a bounded number of tries keeps a hostile guest from
        // holding this vCPU.
        for _ in 0..64 {
            let mut word = [0u8; 8];
            if !ram.read(word_at, &mut word) {
                return false;
            }
            let old = u64::from_le_bytes(word);
            let entry = old >> shift & mask;
            let frame = if self.wide { PTE_ADDR } else { 0xffff_f000 };
            let moved = entry & PTE_PRESENT == 0 || (entry ^ self.seen) & frame != 0;
            if moved || entry & self.set == self.set {
                return true;
            }
            let new = old | self.set << shift;
            let mut actual = [0u8; 8];
            match ram.compare_exchange(word_at, &word, &new.to_le_bytes(), &mut actual) {
                Some(true) => return true,
                Some(false) => continue,
                None => return false,
            }
        }
        true
    }
}

/// Where a checked access goes, and the entries whose flags it would set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    updates: [EntryUpdate; 5],
    count: usize,
}

impl Translation {
    pub fn updates(&self) -> &[EntryUpdate] {
        &self.updates[..self.count]
    }

    fn record(&mut self, gpa: u64, wide: bool, seen: u64, set: u64) {
        let set = set & !seen;
        if set != 0 && self.count < self.updates.len() {
            self.updates[self.count] = EntryUpdate {
                gpa,
                wide,
                seen,
                set,
            };
            self.count += 1;
        }
    }
}

/// The MAXPHYADDR this machine reports (CPUID 0x80000008), which the guest sees too: entry
/// bits from it to 51 are reserved.
#[cfg(target_arch = "x86_64")]
pub fn host_phys_bits() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static BITS: AtomicU8 = AtomicU8::new(0);
    let known = BITS.load(Ordering::Relaxed);
    if known != 0 {
        return known;
    }
    // SAFETY: CPUID is available on every x86_64 processor; an extended leaf beyond the
    // maximum returns data of the highest basic leaf, which the check below rejects. (The
    // intrinsic is safe from Rust 1.87 on.)
    #[allow(unused_unsafe)]
    let bits = unsafe {
        let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        if max >= 0x8000_0008 {
            std::arch::x86_64::__cpuid(0x8000_0008).eax as u8
        } else {
            36
        }
    };
    // A nonsense value must not make every entry look reserved.
    let bits = if (32..=52).contains(&bits) { bits } else { 52 };
    BITS.store(bits, Ordering::Relaxed);
    bits
}

/// Elsewhere no x86 guest runs; 52 reserves nothing.
#[cfg(not(target_arch = "x86_64"))]
pub fn host_phys_bits() -> u8 {
    52
}

/// Bits `low..=high` set.
const fn bits(high: u32, low: u32) -> u64 {
    (u64::MAX >> (63 - high)) & !((1u64 << low) - 1)
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
    /// The guest-physical address of an access the VMM makes for the guest's instruction,
    /// checked as the processor checks it (SDM vol. 3 §4.6, §4.7): not-present entries,
    /// reserved bits, U/S, R/W under CR0.WP, NX under EFER.NXE, SMEP and SMAP. The access
    /// changes nothing: the entries whose accessed or dirty flag the processor would set come
    /// back in the [`Translation`], for the caller to apply once the instruction commits (an
    /// instruction refused or faulting later must leave guest memory untouched). Protection
    /// keys are not modelled (CR4.PKE). `phys_bits` is the guest's MAXPHYADDR.
    pub fn walk(
        &self,
        ram: &dyn GuestRam,
        linear: u64,
        access: Access,
        phys_bits: u8,
    ) -> Result<Translation, WalkError> {
        let mut out = Translation::default();
        if self.cr0 & CR0_PG == 0 {
            out.gpa = linear;
            return Ok(out);
        }
        let pae = self.cr4 & CR4_PAE != 0;
        let nxe = pae && self.efer & EFER_NXE != 0;
        let write = access.kind == AccessKind::Write;
        let fetch = access.kind == AccessKind::Fetch;
        let user = access.privilege == Privilege::User;
        let mut code = 0;
        if write {
            code |= PF_WRITE;
        }
        if user {
            code |= PF_USER;
        }
        // I/D is reported only where a fetch can fault for its own sake.
        if fetch && (nxe || self.cr4 & CR4_SMEP != 0) {
            code |= PF_FETCH;
        }
        let not_present = WalkError::PageFault { error_code: code };
        let reserved = WalkError::PageFault {
            error_code: code | PF_PRESENT | PF_RESERVED,
        };
        let phys_bits = u32::from(phys_bits.clamp(32, 52));
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
        // The rights of the whole walk: an entry that denies one denies it.
        let (mut writable, mut user_page, mut no_exec) = (true, true, false);
        // (entry address, entry), leaf last; PAE's PDPTE has no flags to set.
        let mut used = [(0u64, 0u64); 5];
        let mut depth = 0;
        let wide = pae;
        if !pae {
            let linear = linear & 0xffff_ffff;
            let pde_at = (self.cr3 & 0xffff_f000) + (linear >> 22) * 4;
            let pde = read_entry(pde_at, false)?;
            if pde & PTE_PRESENT == 0 {
                return Err(not_present);
            }
            used[0] = (pde_at, pde);
            depth = 1;
            if pde & PTE_LARGE != 0 && self.cr4 & CR4_PSE != 0 {
                // Bits 20:13 carry physical-address bits 39:32 (PSE-36), as many as exist;
                // the rest up to bit 21 are reserved.
                let high_bits = phys_bits.min(40);
                if pde & bits(21, high_bits - 19) != 0 {
                    return Err(reserved);
                }
                out.gpa = (pde & 0xffc0_0000) | ((pde >> 13) & 0xff) << 32 | (linear & 0x3f_ffff);
            } else {
                let pte_at = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
                let pte = read_entry(pte_at, false)?;
                if pte & PTE_PRESENT == 0 {
                    return Err(not_present);
                }
                used[1] = (pte_at, pte);
                depth = 2;
                out.gpa = (pte & 0xffff_f000) | (linear & 0xfff);
            }
        } else {
            // Bits from MAXPHYADDR to 51 are reserved everywhere, and so is XD without NXE.
            let mut always_reserved = bits(51, phys_bits);
            if !nxe {
                always_reserved |= PTE_NX;
            }
            let (mut table, levels, linear) = if self.efer & EFER_LMA != 0 {
                let levels = if self.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
                (self.cr3 & PTE_ADDR, levels, linear)
            } else {
                // PAE: the processor checked the PDPTEs when CR3 was loaded, and they carry
                // no R/W, U/S, XD or accessed flags that this walk uses.
                let linear = linear & 0xffff_ffff;
                let pdpte = read_entry((self.cr3 & 0xffff_ffe0) + (linear >> 30) * 8, true)?;
                if pdpte & PTE_PRESENT == 0 {
                    return Err(not_present);
                }
                (pdpte & PTE_ADDR, 2, linear)
            };
            let mut found = false;
            for level in (1..=levels).rev() {
                let shift = 12 + 9 * (level - 1);
                let at = table + ((linear >> shift) & 0x1ff) * 8;
                let e = read_entry(at, true)?;
                if e & PTE_PRESENT == 0 {
                    return Err(not_present);
                }
                let large = e & PTE_LARGE != 0;
                let mut reserved_bits = always_reserved;
                if large && level >= 4 {
                    // PS is reserved in PML4 and PML5 entries.
                    reserved_bits |= PTE_LARGE;
                } else if large && level >= 2 {
                    // A 2 MiB or 1 GiB page: the address bits below its alignment (bit 12
                    // is PAT) must be zero.
                    reserved_bits |= bits(shift - 1, 13);
                }
                if e & reserved_bits != 0 {
                    return Err(reserved);
                }
                writable &= e & PTE_WRITABLE != 0;
                user_page &= e & PTE_USER != 0;
                no_exec |= nxe && e & PTE_NX != 0;
                used[depth] = (at, e);
                depth += 1;
                if level == 1 || large {
                    let page_mask = (1u64 << shift) - 1;
                    out.gpa = (e & PTE_ADDR & !page_mask) | (linear & page_mask);
                    found = true;
                    break;
                }
                table = e & PTE_ADDR;
            }
            if !found {
                return Err(not_present);
            }
        }
        if !pae {
            for &(_, e) in &used[..depth] {
                writable &= e & PTE_WRITABLE != 0;
                user_page &= e & PTE_USER != 0;
            }
        }
        let protection = WalkError::PageFault {
            error_code: code | PF_PRESENT,
        };
        let wp = self.cr0 & CR0_WP != 0;
        let smap = self.cr4 & CR4_SMAP != 0;
        let allowed = match access.privilege {
            Privilege::User => {
                user_page
                    && match access.kind {
                        AccessKind::Read => true,
                        AccessKind::Write => writable,
                        AccessKind::Fetch => !no_exec,
                    }
            }
            Privilege::Supervisor { .. } | Privilege::Implicit => match access.kind {
                AccessKind::Fetch => !(no_exec || (user_page && self.cr4 & CR4_SMEP != 0)),
                AccessKind::Read | AccessKind::Write => {
                    let smap_open = matches!(access.privilege, Privilege::Supervisor { ac: true });
                    let smap_ok = !(smap && user_page && !smap_open);
                    smap_ok && (!write || writable || !wp)
                }
            },
        };
        if !allowed {
            return Err(protection);
        }
        for (i, &(at, e)) in used[..depth].iter().enumerate() {
            let dirty = if write && i + 1 == depth {
                PTE_DIRTY
            } else {
                0
            };
            out.record(at, wide, e, PTE_ACCESSED | dirty);
        }
        Ok(out)
    }

    /// The unchecked walk (MMIO, string I/O): `None` when a level is not present or not in
    /// RAM.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Ram(RefCell<Vec<u8>>);

    impl Ram {
        fn new() -> Self {
            Ram(RefCell::new(vec![0; 0x10_0000]))
        }
        fn put(&self, at: u64, value: u64) {
            self.0.borrow_mut()[at as usize..at as usize + 8].copy_from_slice(&value.to_le_bytes());
        }
        fn put32(&self, at: u64, value: u32) {
            self.0.borrow_mut()[at as usize..at as usize + 4].copy_from_slice(&value.to_le_bytes());
        }
        fn get(&self, at: u64) -> u64 {
            let ram = self.0.borrow();
            u64::from_le_bytes(ram[at as usize..at as usize + 8].try_into().unwrap())
        }
        fn get32(&self, at: u64) -> u32 {
            let ram = self.0.borrow();
            u32::from_le_bytes(ram[at as usize..at as usize + 4].try_into().unwrap())
        }
    }

    impl GuestRam for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let ram = self.0.borrow();
            let Some(src) = usize::try_from(gpa)
                .ok()
                .and_then(|s| ram.get(s..s.checked_add(buf.len())?))
            else {
                return false;
            };
            buf.copy_from_slice(src);
            true
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> bool {
            let mut ram = self.0.borrow_mut();
            let Some(dst) = usize::try_from(gpa)
                .ok()
                .and_then(|s| ram.get_mut(s..s.checked_add(buf.len())?))
            else {
                return false;
            };
            dst.copy_from_slice(buf);
            true
        }
    }

    // 4-level tables for linear 0x1234 (every index 0 but the PT's, 1): PML4 0x1000, PDPT
    // 0x2000, PD 0x3000, PT 0x4000, page 0x8000.
    const ENTRIES: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000 + 8];
    const LINEAR: u64 = 0x1234;
    const P: u64 = 1;
    const RW: u64 = 2;
    const US: u64 = 4;
    const A: u64 = 1 << 5;
    const D: u64 = 1 << 6;
    const CR0_PE_PG: u64 = 1 | 1 << 31;

    /// Builds the tables with per-level flags (PML4 first); `xd` on the leaf.
    fn four_level(ram: &Ram, flags: [u64; 4], xd: bool) {
        let targets = [0x2000, 0x3000, 0x4000, 0x8000];
        for i in 0..4 {
            let nx = if xd && i == 3 { PTE_NX } else { 0 };
            ram.put(ENTRIES[i], targets[i] | flags[i] | nx);
        }
    }

    fn paging(cr0: u64, cr4: u64, efer: u64) -> Paging {
        Paging {
            cr0: CR0_PE_PG | cr0,
            cr3: 0x1000,
            cr4: CR4_PAE | cr4,
            efer: EFER_LMA | efer,
        }
    }

    fn access(kind: AccessKind, privilege: Privilege) -> Access {
        Access { kind, privilege }
    }

    const SUP: Privilege = Privilege::Supervisor { ac: false };
    const SUP_AC: Privilege = Privilege::Supervisor { ac: true };

    fn code(p: &Paging, ram: &Ram, kind: AccessKind, privilege: Privilege) -> Result<u64, u32> {
        match p.walk(ram, LINEAR, access(kind, privilege), 46) {
            Ok(t) => Ok(t.gpa),
            Err(WalkError::PageFault { error_code }) => Err(error_code),
            Err(WalkError::NotRam) => panic!("tables are in RAM"),
        }
    }

    #[test]
    fn error_codes_are_the_sdms_for_each_protection() {
        use AccessKind::{Fetch, Read, Write};
        let ram = Ram::new();
        let wp = 1 << 16;
        let smep = 1 << 20;
        let smap = 1 << 21;
        let nxe = 1 << 11;
        let user_rw = [P | RW | US; 4];
        let user_ro = [P | RW | US, P | RW | US, P | RW | US, P | US];
        let kernel_ro = [P | RW | US, P | RW | US, P | RW, P];

        four_level(&ram, user_rw, false);
        let smap_on = paging(0, smap, 0);
        // SMAP: a supervisor read of a user page faults (P), a write too (P|W); AC opens
        // explicit accesses but never implicit ones.
        assert_eq!(code(&smap_on, &ram, Read, SUP), Err(0x1));
        assert_eq!(code(&smap_on, &ram, Write, SUP), Err(0x3));
        assert_eq!(code(&smap_on, &ram, Read, SUP_AC), Ok(0x8234));
        assert_eq!(code(&smap_on, &ram, Write, SUP_AC), Ok(0x8234));
        assert_eq!(code(&smap_on, &ram, Read, Privilege::Implicit), Err(0x1));
        assert_eq!(code(&smap_on, &ram, Write, Privilege::Implicit), Err(0x3));
        // User accesses are not SMAP's business; neither are supervisor fetches.
        assert_eq!(code(&smap_on, &ram, Read, Privilege::User), Ok(0x8234));
        assert_eq!(code(&smap_on, &ram, Fetch, SUP), Ok(0x8234));
        // Without SMAP the kernel reads user pages freely.
        assert_eq!(code(&paging(0, 0, 0), &ram, Read, SUP), Ok(0x8234));

        // SMEP: a supervisor fetch from a user page faults with I/D; AC does not matter.
        let smep_on = paging(0, smep, 0);
        assert_eq!(code(&smep_on, &ram, Fetch, SUP), Err(0x11));
        assert_eq!(code(&smep_on, &ram, Fetch, SUP_AC), Err(0x11));
        assert_eq!(code(&smep_on, &ram, Read, SUP), Ok(0x8234));
        assert_eq!(code(&smep_on, &ram, Fetch, Privilege::User), Ok(0x8234));

        // CR0.WP: a supervisor write to a read-only page faults only with WP; a user write
        // always does (U/S in the code).
        four_level(&ram, kernel_ro, false);
        assert_eq!(code(&paging(wp, 0, 0), &ram, Write, SUP), Err(0x3));
        assert_eq!(code(&paging(0, 0, 0), &ram, Write, SUP), Ok(0x8234));
        assert_eq!(code(&paging(wp, 0, 0), &ram, Read, SUP), Ok(0x8234));
        // A user access to a supervisor page: P|U, plus W for a write.
        assert_eq!(
            code(&paging(0, 0, 0), &ram, Read, Privilege::User),
            Err(0x5)
        );
        assert_eq!(
            code(&paging(0, 0, 0), &ram, Write, Privilege::User),
            Err(0x7)
        );
        four_level(&ram, user_ro, false);
        assert_eq!(
            code(&paging(0, 0, 0), &ram, Write, Privilege::User),
            Err(0x7)
        );
        assert_eq!(code(&paging(0, 0, 0), &ram, Write, SUP), Ok(0x8234));

        // NX: with EFER.NXE a fetch from an XD page faults (P|I/D); reads do not care.
        four_level(&ram, [P | RW; 4], true);
        assert_eq!(code(&paging(0, 0, nxe), &ram, Fetch, SUP), Err(0x11));
        assert_eq!(code(&paging(0, 0, nxe), &ram, Read, SUP), Ok(0x8234));
        // Without NXE bit 63 is reserved: P|RSVD, and I/D is not reported for the fetch.
        assert_eq!(code(&paging(0, 0, 0), &ram, Fetch, SUP), Err(0x9));
        assert_eq!(code(&paging(0, 0, 0), &ram, Write, SUP), Err(0xb));

        // Not present: P clear; the other bits describe the access.
        four_level(&ram, [P | RW | US, P | RW | US, P | RW | US, 0], false);
        assert_eq!(code(&paging(0, 0, 0), &ram, Read, SUP), Err(0x0));
        assert_eq!(
            code(&paging(0, 0, 0), &ram, Write, Privilege::User),
            Err(0x6)
        );
        assert_eq!(code(&paging(0, 0, nxe), &ram, Fetch, SUP), Err(0x10));
        assert_eq!(code(&paging(0, 0, 0), &ram, Fetch, SUP), Err(0x0));
    }

    #[test]
    fn reserved_bits_fault_with_rsvd() {
        use AccessKind::Read;
        let ram = Ram::new();
        let p = paging(0, 0, 1 << 11);
        let ok = [P | RW; 4];
        four_level(&ram, ok, false);
        assert_eq!(code(&p, &ram, Read, SUP), Ok(0x8234));
        // Bit 46 is beyond a 46-bit MAXPHYADDR, at any level; bit 45 is an address bit.
        for entry in ENTRIES {
            four_level(&ram, ok, false);
            ram.put(entry, ram.get(entry) | 1 << 46);
            assert_eq!(code(&p, &ram, Read, SUP), Err(0x9), "entry at {entry:#x}");
        }
        four_level(&ram, ok, false);
        ram.put(ENTRIES[3], ram.get(ENTRIES[3]) | 1 << 45);
        assert!(code(&p, &ram, Read, SUP).is_ok());
        // PS in a PML4 entry.
        four_level(&ram, [P | RW | 0x80, P | RW, P | RW, P | RW], false);
        assert_eq!(code(&p, &ram, Read, SUP), Err(0x9));
        // A 2 MiB page with an address bit below 2 MiB (bit 13), and a 1 GiB page with one
        // below 1 GiB (bit 21); bit 12 is PAT in both.
        four_level(&ram, [P | RW, P | RW, P | RW | 0x80, P], false);
        ram.put(ENTRIES[2], 0x20_0000 | P | 0x80 | 1 << 13);
        assert_eq!(code(&p, &ram, Read, SUP), Err(0x9));
        ram.put(ENTRIES[2], 0x20_0000 | P | 0x80 | 1 << 12);
        assert_eq!(code(&p, &ram, Read, SUP), Ok(0x20_1234));
        ram.put(ENTRIES[1], 0x4000_0000 | P | 0x80 | 1 << 21);
        assert_eq!(code(&p, &ram, Read, SUP), Err(0x9));
        ram.put(ENTRIES[1], 0x4000_0000 | P | 0x80);
        assert_eq!(code(&p, &ram, Read, SUP), Ok(0x4000_1234));
        // 32-bit paging, 4 MiB page: bit 21 is reserved when MAXPHYADDR >= 40.
        let legacy = Paging {
            cr0: CR0_PE_PG,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        ram.put32(0x1000, 0x40_0000 | 0x81 | 1 << 21);
        let read = access(Read, SUP);
        assert_eq!(
            legacy.walk(&ram, LINEAR, read, 46),
            Err(WalkError::PageFault { error_code: 0x9 })
        );
        ram.put32(0x1000, 0x40_0000 | 0x81 | 1 << 13);
        assert_eq!(
            legacy.walk(&ram, LINEAR, read, 46).unwrap().gpa,
            0x1_0040_1234
        );
    }

    /// Every combination of U/S and R/W at each level, XD, WP, SMAP, SMEP, NXE, privilege
    /// and access kind against the SDM's table of access rights (vol. 3 §4.6.1), restated
    /// per access as the SDM lists them.
    #[test]
    fn access_rights_match_the_sdm_table_exhaustively() {
        let ram = Ram::new();
        let privileges = [Privilege::User, SUP, SUP_AC, Privilege::Implicit];
        let kinds = [AccessKind::Read, AccessKind::Write, AccessKind::Fetch];
        let mut faults = 0;
        for levels in 0u32..256 {
            let flags: [u64; 4] = std::array::from_fn(|i| {
                P | if levels >> (2 * i) & 1 != 0 { RW } else { 0 }
                    | if levels >> (2 * i + 1) & 1 != 0 {
                        US
                    } else {
                        0
                    }
            });
            let user_address = flags.iter().all(|f| f & US != 0);
            let read_only = flags.iter().any(|f| f & RW == 0);
            for bits in 0u32..32 {
                let [xd, wp, smap, smep, nxe] = std::array::from_fn(|i| bits >> i & 1 != 0);
                four_level(&ram, flags, xd);
                let p = paging(
                    if wp { 1 << 16 } else { 0 },
                    if smap { 1 << 21 } else { 0 } | if smep { 1 << 20 } else { 0 },
                    if nxe { 1 << 11 } else { 0 },
                );
                for privilege in privileges {
                    for kind in kinds {
                        let supervisor = privilege != Privilege::User;
                        let explicit_ac = privilege == SUP_AC;
                        let denied = if xd && !nxe {
                            None // reserved bit
                        } else {
                            Some(match kind {
                                AccessKind::Read if supervisor => {
                                    user_address && smap && !explicit_ac
                                }
                                AccessKind::Read => !user_address,
                                AccessKind::Write if supervisor => {
                                    (user_address && smap && !explicit_ac) || (wp && read_only)
                                }
                                AccessKind::Write => !user_address || read_only,
                                AccessKind::Fetch if supervisor => {
                                    (nxe && xd) || (smep && user_address)
                                }
                                AccessKind::Fetch => !user_address || (nxe && xd),
                            })
                        };
                        let mut want_code = 0;
                        if kind == AccessKind::Write {
                            want_code |= 2;
                        }
                        if privilege == Privilege::User {
                            want_code |= 4;
                        }
                        if kind == AccessKind::Fetch && (nxe || smep) {
                            want_code |= 0x10;
                        }
                        let want = match denied {
                            None => Err(want_code | 0x9),
                            Some(true) => Err(want_code | 0x1),
                            Some(false) => Ok(0x8234),
                        };
                        let got = code(&p, &ram, kind, privilege);
                        assert_eq!(
                            got, want,
                            "flags {flags:x?} xd {xd} wp {wp} smap {smap} smep {smep} \
                             nxe {nxe} {privilege:?} {kind:?}"
                        );
                        faults += usize::from(got.is_err());
                    }
                }
            }
        }
        // The sweep is not vacuous either way.
        assert!(faults > 10_000 && faults < 90_000, "{faults} faults");
    }

    #[test]
    fn accessed_flags_on_every_level_and_dirty_on_the_leaf_for_a_write() {
        let ram = Ram::new();
        four_level(&ram, [P | RW; 4], false);
        let p = paging(1 << 16, 0, 0);
        let read = p
            .walk(&ram, LINEAR, access(AccessKind::Read, SUP), 46)
            .unwrap();
        // The walk itself writes nothing.
        for at in ENTRIES {
            assert_eq!(ram.get(at) & (A | D), 0);
        }
        for u in read.updates() {
            assert!(u.apply(&ram));
        }
        for at in ENTRIES {
            assert_eq!(ram.get(at) & (A | D), A, "entry at {at:#x}");
        }
        let write = p
            .walk(&ram, LINEAR, access(AccessKind::Write, SUP), 46)
            .unwrap();
        // Only the leaf still needs a flag.
        assert_eq!(write.updates().len(), 1);
        for u in write.updates() {
            assert!(u.apply(&ram));
        }
        assert_eq!(ram.get(ENTRIES[3]) & (A | D), A | D);
        for at in &ENTRIES[..3] {
            assert_eq!(ram.get(*at) & D, 0);
        }
        // Nothing left to set: a second write records nothing.
        let again = p
            .walk(&ram, LINEAR, access(AccessKind::Write, SUP), 46)
            .unwrap();
        assert!(again.updates().is_empty());

        // 32-bit paging: 4-byte entries, the neighbours untouched.
        let legacy = Paging {
            cr0: CR0_PE_PG,
            cr3: 0x10000,
            cr4: 0,
            efer: 0,
        };
        ram.put32(0x10000, 0x11000 | 3);
        ram.put32(0x10004, 0x5a5a_5000);
        ram.put32(0x11004, 0x12000 | 3);
        ram.put32(0x11000, 0xa5a5_a000);
        let t = legacy
            .walk(&ram, 0x1abc, access(AccessKind::Write, SUP), 46)
            .unwrap();
        assert_eq!(t.gpa, 0x12abc);
        for u in t.updates() {
            assert!(u.apply(&ram));
        }
        assert_eq!(ram.get32(0x10000), 0x11000 | 3 | A as u32);
        assert_eq!(ram.get32(0x11004), 0x12000 | 3 | (A | D) as u32);
        assert_eq!(ram.get32(0x10004), 0x5a5a_5000);
        assert_eq!(ram.get32(0x11000), 0xa5a5_a000);
    }

    #[test]
    fn flags_are_not_set_on_an_entry_remapped_since_the_walk() {
        let ram = Ram::new();
        four_level(&ram, [P | RW; 4], false);
        let p = paging(0, 0, 0);
        let t = p
            .walk(&ram, LINEAR, access(AccessKind::Write, SUP), 46)
            .unwrap();
        // Another vCPU points the PTE elsewhere, and sets A itself on the PD entry.
        ram.put(ENTRIES[3], 0x9000 | P | RW);
        ram.put(ENTRIES[2], ram.get(ENTRIES[2]) | A);
        for u in t.updates() {
            assert!(u.apply(&ram));
        }
        assert_eq!(ram.get(ENTRIES[3]), 0x9000 | P | RW);
        assert_eq!(ram.get(ENTRIES[2]), 0x4000 | P | RW | A);
        assert_eq!(ram.get(ENTRIES[0]) & (A | D), A);
    }
}
