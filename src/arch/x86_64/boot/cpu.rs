//! The boot vCPU's entry state, common to every loader: 32-bit flat protected mode, paging
//! and interrupts off, with a GDT in guest memory whose descriptors match the hidden state.

use super::image::write_guest;
use super::layout::{GuestLayout, GDT_AREA, GDT_AREA_SIZE};
use super::{BootError, BootSetup};
use crate::arch::x86_64::layout::LAPIC_BASE;
use crate::arch::x86_64::regs::{
    flat_segment, DescriptorTable, SegmentRegister, SpecialRegisters, StandardRegisters, CR0_ET,
    CR0_PE, RFLAGS_RESERVED,
};
use crate::memory::GuestMemory;

pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;
const GDT_ENTRIES: u64 = 5;
pub const GDT_ADDR: u64 = GDT_AREA;
/// The TSS sits in the GDT's page; nothing reads it until a privilege change, which the guest
/// sets up for itself, but KVM insists that TR is usable.
pub const TSS_ADDR: u64 = GDT_AREA + 0x80;
const TSS_LIMIT: u32 = 0x67;
/// 32-bit TSS, busy.
const TSS_TYPE_BUSY: u8 = 0xb;
const LDT_TYPE: u8 = 0x2;
/// IA32_APIC_BASE for the bootstrap processor: the default base, enabled (bit 11), BSP (bit 8).
const APIC_BASE_BSP: u64 = LAPIC_BASE | (1 << 11) | (1 << 8);

/// Encodes a segment's hidden state as the GDT descriptor that would load it.
pub fn descriptor(seg: &SegmentRegister) -> u64 {
    let limit = if seg.g { seg.limit >> 12 } else { seg.limit } as u64;
    let base = seg.base & 0xffff_ffff;
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((seg.type_ as u64 & 0xf) << 40)
        | ((seg.s as u64) << 44)
        | ((seg.dpl as u64 & 3) << 45)
        | ((seg.present as u64) << 47)
        | (((limit >> 16) & 0xf) << 48)
        | ((seg.avl as u64) << 52)
        | ((seg.l as u64) << 53)
        | ((seg.db as u64) << 54)
        | ((seg.g as u64) << 55)
        | (((base >> 24) & 0xff) << 56)
}

fn task_segment() -> SegmentRegister {
    SegmentRegister {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: TSS_TYPE_BUSY,
        present: true,
        dpl: 0,
        db: false,
        s: false,
        l: false,
        g: false,
        avl: false,
        unusable: false,
    }
}

/// Claims the GDT page, writes the GDT and a zeroed TSS, and returns the entry state with
/// RIP = `entry`; the caller sets the protocol's argument registers.
pub fn protected_mode_entry(
    mem: &GuestMemory,
    layout: &mut GuestLayout,
    entry: u64,
) -> Result<BootSetup, BootError> {
    layout.claim("boot GDT", GDT_AREA, GDT_AREA_SIZE)?;
    let code = flat_segment(CODE_SELECTOR, true);
    let data = flat_segment(DATA_SELECTOR, false);
    let tss = task_segment();
    let gdt: [u64; GDT_ENTRIES as usize] =
        [0, 0, descriptor(&code), descriptor(&data), descriptor(&tss)];
    let mut bytes = Vec::with_capacity(gdt.len() * 8);
    for entry in gdt {
        bytes.extend_from_slice(&entry.to_le_bytes());
    }
    write_guest(mem, "boot GDT", GDT_ADDR, &bytes)?;
    write_guest(mem, "boot TSS", TSS_ADDR, &[0; TSS_LIMIT as usize + 1])?;

    let ldt = SegmentRegister {
        type_: LDT_TYPE,
        unusable: true,
        ..SegmentRegister::default()
    };
    let sregs = SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt,
        gdt: DescriptorTable {
            base: GDT_ADDR,
            limit: (GDT_ENTRIES * 8 - 1) as u16,
        },
        idt: DescriptorTable::default(),
        cr0: CR0_PE | CR0_ET,
        apic_base: APIC_BASE_BSP,
        ..SpecialRegisters::default()
    };
    let regs = StandardRegisters {
        rip: entry,
        rflags: RFLAGS_RESERVED,
        ..StandardRegisters::default()
    };
    Ok(BootSetup { regs, sregs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::regs::CpuMode;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn flat_descriptors_have_the_classic_encodings() {
        assert_eq!(
            descriptor(&flat_segment(CODE_SELECTOR, true)),
            0x00cf_9b00_0000_ffff
        );
        assert_eq!(
            descriptor(&flat_segment(DATA_SELECTOR, false)),
            0x00cf_9300_0000_ffff
        );
        assert_eq!(descriptor(&task_segment()), 0x0000_8b00_1080_0067);
    }

    #[test]
    fn entry_state_is_flat_protected_mode_matching_the_gdt() {
        let mem = create_guest_memory(2 << 20).unwrap();
        let mut layout = GuestLayout::new(2 << 20);
        let setup = protected_mode_entry(&mem, &mut layout, 0x10_0000).unwrap();
        let s = &setup.sregs;
        assert_eq!(s.mode(), CpuMode::Protected32);
        assert_eq!(s.cr0, CR0_PE | CR0_ET);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(setup.regs.rflags, 0x2);
        assert_eq!(setup.regs.rip, 0x10_0000);
        assert!(s.ldt.unusable);
        assert!(!s.tr.unusable && s.tr.present && s.tr.type_ == 0xb);
        assert_eq!(s.gdt.limit, 39);
        // Every selector's GDT slot holds exactly the hidden state loaded for it.
        for seg in [s.cs, s.ds, s.es, s.fs, s.gs, s.ss, s.tr] {
            let slot = GuestAddress(s.gdt.base + seg.selector as u64);
            assert_eq!(mem.read_obj::<u64>(slot).unwrap(), descriptor(&seg));
        }
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ss.selector, 0x18);
        // The GDT page is now taken.
        assert!(layout.claim("other", GDT_ADDR + 8, 8).is_err());
    }
}
