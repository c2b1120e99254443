//! Portable x86 register state, shared by the loaders and every hypervisor back end.

/// General-purpose registers, RIP and RFLAGS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register in its hidden (descriptor-cache) form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentRegister {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// Default operation size (D/B bit): 32-bit when set.
    pub db: bool,
    /// Code/data (1) or system (0) descriptor.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit in 4 KiB units when set.
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and system registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: SegmentRegister,
    pub ds: SegmentRegister,
    pub es: SegmentRegister,
    pub fs: SegmentRegister,
    pub gs: SegmentRegister,
    pub ss: SegmentRegister,
    pub tr: SegmentRegister,
    pub ldt: SegmentRegister,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const RFLAGS_RESERVED: u64 = 1 << 1;
pub const RFLAGS_IF: u64 = 1 << 9;

/// The processor mode that a set of special registers describes, for diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Protected16,
    Protected32,
    Long64,
    Compat32,
}

impl SpecialRegisters {
    pub fn mode(&self) -> CpuMode {
        if self.cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if self.efer & EFER_LMA != 0 {
            if self.cs.l {
                CpuMode::Long64
            } else {
                CpuMode::Compat32
            }
        } else if self.cs.db {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        }
    }

    /// Current privilege level (the DPL of SS in protected mode, as the processor defines it).
    pub fn cpl(&self) -> u8 {
        if self.cr0 & CR0_PE == 0 {
            0
        } else {
            self.cs.selector as u8 & 3
        }
    }
}

impl std::fmt::Display for CpuMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuMode::Real => "real mode",
            CpuMode::Protected16 => "16-bit protected mode",
            CpuMode::Protected32 => "32-bit protected mode",
            CpuMode::Long64 => "64-bit long mode",
            CpuMode::Compat32 => "compatibility mode",
        })
    }
}

/// A flat 4 GiB segment for 32-bit protected-mode entry (loaders use these).
pub fn flat_segment(selector: u16, code: bool) -> SegmentRegister {
    SegmentRegister {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        // Execute/read accessed, or read/write accessed.
        type_: if code { 0xb } else { 0x3 },
        present: true,
        dpl: 0,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// CR0 after RESET: CD, NW and ET set (Intel SDM vol. 3, table 9-1).
pub const CR0_POWER_ON: u64 = 0x6000_0010;

/// The registers a processor has after RESET or INIT (Intel SDM vol. 3, table 9-1): real
/// mode at F000:FFF0 with CS based at 0xFFFF0000, paging and protection off, EFER clear.
/// `apic_base` is left 0 (the back ends then keep theirs; the boot MSRs set it).
pub fn power_on_registers() -> (StandardRegisters, SpecialRegisters) {
    let real = |selector: u16, base: u64, type_: u8| SegmentRegister {
        base,
        limit: 0xffff,
        selector,
        type_,
        present: true,
        s: true,
        ..Default::default()
    };
    let system = |type_: u8| SegmentRegister {
        limit: 0xffff,
        type_,
        present: true,
        ..Default::default()
    };
    let data = real(0, 0, 0x3);
    let sregs = SpecialRegisters {
        cs: real(0xf000, 0xffff_0000, 0xb),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        // An LDT, and a busy 16-bit TSS, as the SDM gives them.
        ldt: system(0x2),
        tr: system(0x3),
        gdt: DescriptorTable {
            base: 0,
            limit: 0xffff,
        },
        idt: DescriptorTable {
            base: 0,
            limit: 0xffff,
        },
        cr0: CR0_POWER_ON,
        ..Default::default()
    };
    let regs = StandardRegisters {
        rip: 0xfff0,
        rflags: 0x2,
        // The processor signature (family 6), as a real CPU leaves it.
        rdx: 0x600,
        ..Default::default()
    };
    (regs, sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_follows_cr0_efer_and_cs() {
        let mut s = SpecialRegisters::default();
        assert_eq!(s.mode(), CpuMode::Real);
        s.cr0 = CR0_PE;
        s.cs = flat_segment(0x10, true);
        assert_eq!(s.mode(), CpuMode::Protected32);
        s.efer = EFER_LME | EFER_LMA;
        s.cs.l = true;
        s.cs.db = false;
        assert_eq!(s.mode(), CpuMode::Long64);
        s.cs.selector = 0x1b;
        assert_eq!(s.cpl(), 3);
    }
}
