//! Conversions between KVM's register structs and the portable ones in `arch::x86_64::regs`.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

use crate::arch::x86_64::regs::{
    DescriptorTable, SegmentRegister, SpecialRegisters, StandardRegisters,
};

pub fn from_kvm_regs(r: &kvm_regs) -> StandardRegisters {
    StandardRegisters {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn to_kvm_regs(r: &StandardRegisters) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn from_segment(s: &kvm_segment) -> SegmentRegister {
    SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn to_segment(s: &SegmentRegister) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn from_dtable(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn to_dtable(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        ..Default::default()
    }
}

pub fn from_kvm_sregs(s: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: from_segment(&s.cs),
        ds: from_segment(&s.ds),
        es: from_segment(&s.es),
        fs: from_segment(&s.fs),
        gs: from_segment(&s.gs),
        ss: from_segment(&s.ss),
        tr: from_segment(&s.tr),
        ldt: from_segment(&s.ldt),
        gdt: from_dtable(&s.gdt),
        idt: from_dtable(&s.idt),
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Overwrites `k` with `s`, keeping KVM's pending-interrupt bitmap.
pub fn fill_kvm_sregs(k: &mut kvm_sregs, s: &SpecialRegisters) {
    k.cs = to_segment(&s.cs);
    k.ds = to_segment(&s.ds);
    k.es = to_segment(&s.es);
    k.fs = to_segment(&s.fs);
    k.gs = to_segment(&s.gs);
    k.ss = to_segment(&s.ss);
    k.tr = to_segment(&s.tr);
    k.ldt = to_segment(&s.ldt);
    k.gdt = to_dtable(&s.gdt);
    k.idt = to_dtable(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    if s.apic_base != 0 {
        k.apic_base = s.apic_base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::regs::flat_segment;

    #[test]
    fn sregs_round_trip() {
        let s = SpecialRegisters {
            cs: flat_segment(0x10, true),
            ds: flat_segment(0x18, false),
            gdt: DescriptorTable {
                base: 0x500,
                limit: 0x1f,
            },
            cr0: 0x11,
            efer: 0x500,
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        let mut k = kvm_sregs::default();
        k.interrupt_bitmap[0] = 7;
        fill_kvm_sregs(&mut k, &s);
        assert_eq!(from_kvm_sregs(&k), s);
        assert_eq!(k.interrupt_bitmap[0], 7);
    }
}
