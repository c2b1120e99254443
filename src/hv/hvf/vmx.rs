//! The VMX exit handler of the Hypervisor.framework back end (xhyve's `vmm/intel/vmx.c`),
//! written against the [`Vmcs`] trait so recorded exit sequences can drive it in tests.
//!
//! The back end's run loop is `prepare_entry` -> `hv_vcpu_run` -> `handle_exit`. An exit the
//! layer cannot finish alone (I/O, MMIO, unknown MSRs) is returned to the VMM with its data in
//! buffers owned by [`VmxVcpu`]; the next `prepare_entry` completes it with what the VMM filled
//! in (register write-back, RIP advance, the next REP element) before anything is injected.

use std::cell::RefCell;

use iced_x86::Register;

use super::controls::Controls;
use super::ffi::*;
use super::vmcs::Vmcs;
use crate::arch::x86_64::cpuid::CpuidEntry;
pub use crate::arch::x86_64::emulate::GuestRam;
use crate::arch::x86_64::emulate::{emulate, CpuMode, EmulateError, Emulated, EmulatorContext};
use crate::arch::x86_64::emulate::{fetch, Paging};
use crate::arch::x86_64::regs::{
    DescriptorTable, SegmentRegister, SpecialRegisters, StandardRegisters, CR0_ET, CR0_PE, CR0_PG,
    EFER_LMA, EFER_LME, RFLAGS_IF, RFLAGS_RESERVED,
};
use crate::hv::{HvError, RunState, VmExit};

/// What a vCPU is configured with at creation.
#[derive(Debug, Clone, Default)]
pub struct VmxConfig {
    pub vcpu_id: u8,
    /// The CPUID table the guest sees (after policy).
    pub cpuid: Vec<CpuidEntry>,
    /// `-w`: unknown MSRs go to the VMM (which reads 0 / ignores writes) instead of #GP.
    pub ignore_unknown_msrs: bool,
    /// `-H`: exit on HLT.
    pub exit_on_hlt: bool,
    /// `-P`: exit on PAUSE.
    pub exit_on_pause: bool,
}

/// MSRs the back end passes through to the hardware with `hv_vcpu_enable_native_msr`, as xhyve
/// does; they never exit.
pub const NATIVE_MSRS: &[u32] = &[
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_ESP,
    MSR_SYSENTER_EIP,
    MSR_TSC,
    MSR_TSC_AUX,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SFMASK,
];

pub const MSR_TSC: u32 = 0x10;
pub const MSR_APIC_BASE: u32 = 0x1b;
pub const MSR_FEATURE_CONTROL: u32 = 0x3a;
pub const MSR_BIOS_SIGN: u32 = 0x8b;
pub const MSR_MTRR_CAP: u32 = 0xfe;
pub const MSR_SYSENTER_CS: u32 = 0x174;
pub const MSR_SYSENTER_ESP: u32 = 0x175;
pub const MSR_SYSENTER_EIP: u32 = 0x176;
pub const MSR_MCG_CAP: u32 = 0x179;
pub const MSR_MCG_STATUS: u32 = 0x17a;
pub const MSR_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_PHYS_FIRST: u32 = 0x200;
pub const MSR_MTRR_PHYS_LAST: u32 = 0x20f;
pub const MSR_MTRR_FIX_64K: u32 = 0x250;
pub const MSR_MTRR_FIX_16K: u32 = 0x258;
pub const MSR_MTRR_FIX_16K_2: u32 = 0x259;
pub const MSR_MTRR_FIX_4K_FIRST: u32 = 0x268;
pub const MSR_MTRR_FIX_4K_LAST: u32 = 0x26f;
pub const MSR_PAT: u32 = 0x277;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SFMASK: u32 = 0xc000_0084;
pub const MSR_FS_BASE: u32 = 0xc000_0100;
pub const MSR_GS_BASE: u32 = 0xc000_0101;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const MSR_TSC_AUX: u32 = 0xc000_0103;

const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR4_VMXE: u64 = 1 << 13;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_DF: u64 = 1 << 10;

/// CR0 bits the processor in VMX operation forces (NE, ET on; NW, CD off), as xhyve does.
const CR0_ONES: u64 = CR0_NE | CR0_ET;
const CR0_ZEROS: u64 = CR0_NW | CR0_CD;
/// CR0 bits whose guest writes exit: the forced ones and PG/PE, so EFER.LMA can follow paging.
const CR0_GUEST_HOST_MASK: u64 = CR0_ONES | CR0_ZEROS | CR0_PG | CR0_PE;
const CR4_ONES: u64 = CR4_VMXE;
const CR4_GUEST_HOST_MASK: u64 = CR4_ONES;
/// CR0 at power-on (Intel SDM vol. 3, 9.1.1).
const CR0_RESET: u64 = 0x6000_0010;
/// The power-on PAT: WB, WT, UC-, UC repeated.
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
/// MISC_ENABLE as xhyve reports it: fast strings, no branch trace, no PEBS.
const MISC_ENABLE: u64 = 1 | (1 << 11) | (1 << 12);
/// Writable bits of MISC_ENABLE whose changes we silently accept (XD disable; Linux clears it).
const MISC_ENABLE_IGNORED: u64 = 1 << 34;
const APIC_BASE_DEFAULT: u64 = 0xfee0_0000 | (1 << 11);
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// The LAPIC's task-priority register, which CR8 mirrors (CR8 = TPR[7:4]).
const LAPIC_TPR_OFFSET: u64 = 0x80;

/// CPUID.1:ECX features this layer does not provide whatever the table says: MONITOR/MWAIT
/// and VMX instructions raise #UD, and the LAPIC has no x2APIC mode.
const CPUID1_ECX_NOT_HERE: u32 = 1 << 3 | 1 << 5 | 1 << 21;
const EXC_UD: u8 = 6;
const EXC_GP: u8 = 13;
const EXC_PF: u8 = 14;
/// The x86 instruction length limit.
const MAX_INSN_LEN: usize = 15;
/// KVM's `KVM_INTERNAL_ERROR_EMULATION`, which the VMM reports the same way.
pub const INTERNAL_ERROR_EMULATION: u32 = 1;

/// The general register a VMX exit qualification or instruction-information field names with
/// its 4-bit index (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15).
const GPR_BY_INDEX: [hv_x86_reg_t; 16] = [
    HV_X86_RAX, HV_X86_RCX, HV_X86_RDX, HV_X86_RBX, HV_X86_RSP, HV_X86_RBP, HV_X86_RSI, HV_X86_RDI,
    HV_X86_R8, HV_X86_R9, HV_X86_R10, HV_X86_R11, HV_X86_R12, HV_X86_R13, HV_X86_R14, HV_X86_R15,
];

/// One segment register's four VMCS fields.
struct SegmentFields {
    selector: u32,
    base: u32,
    limit: u32,
    access: u32,
}

const fn seg(selector: u32, base: u32, limit: u32, access: u32) -> SegmentFields {
    SegmentFields {
        selector,
        base,
        limit,
        access,
    }
}

const CS: SegmentFields = seg(
    VMCS_GUEST_CS,
    VMCS_GUEST_CS_BASE,
    VMCS_GUEST_CS_LIMIT,
    VMCS_GUEST_CS_AR,
);
const DS: SegmentFields = seg(
    VMCS_GUEST_DS,
    VMCS_GUEST_DS_BASE,
    VMCS_GUEST_DS_LIMIT,
    VMCS_GUEST_DS_AR,
);
const ES: SegmentFields = seg(
    VMCS_GUEST_ES,
    VMCS_GUEST_ES_BASE,
    VMCS_GUEST_ES_LIMIT,
    VMCS_GUEST_ES_AR,
);
const FS: SegmentFields = seg(
    VMCS_GUEST_FS,
    VMCS_GUEST_FS_BASE,
    VMCS_GUEST_FS_LIMIT,
    VMCS_GUEST_FS_AR,
);
const GS: SegmentFields = seg(
    VMCS_GUEST_GS,
    VMCS_GUEST_GS_BASE,
    VMCS_GUEST_GS_LIMIT,
    VMCS_GUEST_GS_AR,
);
const SS: SegmentFields = seg(
    VMCS_GUEST_SS,
    VMCS_GUEST_SS_BASE,
    VMCS_GUEST_SS_LIMIT,
    VMCS_GUEST_SS_AR,
);
const TR: SegmentFields = seg(
    VMCS_GUEST_TR,
    VMCS_GUEST_TR_BASE,
    VMCS_GUEST_TR_LIMIT,
    VMCS_GUEST_TR_AR,
);
const LDTR: SegmentFields = seg(
    VMCS_GUEST_LDTR,
    VMCS_GUEST_LDTR_BASE,
    VMCS_GUEST_LDTR_LIMIT,
    VMCS_GUEST_LDTR_AR,
);
/// Segments in the order of the 3-bit segment field of the VMX instruction information.
const SEGMENT_BY_INDEX: [&SegmentFields; 6] = [&ES, &CS, &SS, &DS, &FS, &GS];

const AR_UNUSABLE: u64 = 1 << 16;
const AR_L: u64 = 1 << 13;
const AR_DB: u64 = 1 << 14;

fn access_rights(s: &SegmentRegister) -> u64 {
    u64::from(s.type_ & 0xf)
        | u64::from(s.s) << 4
        | u64::from(s.dpl & 3) << 5
        | u64::from(s.present) << 7
        | u64::from(s.avl) << 12
        | u64::from(s.l) << 13
        | u64::from(s.db) << 14
        | u64::from(s.g) << 15
        | u64::from(s.unusable) << 16
}

fn segment_from(selector: u64, base: u64, limit: u64, ar: u64) -> SegmentRegister {
    SegmentRegister {
        base,
        limit: limit as u32,
        selector: selector as u16,
        type_: (ar & 0xf) as u8,
        s: ar & (1 << 4) != 0,
        dpl: ((ar >> 5) & 3) as u8,
        present: ar & (1 << 7) != 0,
        avl: ar & (1 << 12) != 0,
        l: ar & AR_L != 0,
        db: ar & AR_DB != 0,
        g: ar & (1 << 15) != 0,
        unusable: ar & AR_UNUSABLE != 0,
    }
}

/// An event for the VM-entry interruption-information field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Event {
    info: u32,
    error_code: Option<u32>,
    /// For software interrupts and exceptions re-injected after an exit during delivery:
    /// the instruction length the entry needs to push the right return address.
    insn_len: Option<u64>,
}

impl Event {
    fn exception(vector: u8, error_code: Option<u32>) -> Event {
        let mut info = IRQ_INFO_VALID | IRQ_INFO_HARD_EXC | u32::from(vector);
        if error_code.is_some() {
            info |= IRQ_INFO_ERROR_VALID;
        }
        Event {
            info,
            error_code,
            insn_len: None,
        }
    }
}

/// A string I/O instruction in flight: one element per exit.
#[derive(Debug, Clone, Copy)]
struct StringIo {
    rep: bool,
    /// The index register (RSI for OUTS, RDI for INS) and the linear address of the element.
    index: hv_x86_reg_t,
    linear: u64,
    /// 0xffff, 0xffff_ffff or !0 for 16-, 32- and 64-bit addressing.
    address_mask: u64,
}

/// The exit the VMM is answering, completed by the next `prepare_entry`.
#[derive(Debug, Clone, Copy)]
enum Pending {
    None,
    Io {
        size: usize,
        is_in: bool,
        insn_len: u64,
        string: Option<StringIo>,
    },
    /// An instruction whose MMIO read went to the VMM: emulate it again with the value.
    MmioRead {
        gpa: u64,
        len: usize,
    },
    MsrRead {
        insn_len: u64,
    },
    MsrWrite {
        insn_len: u64,
    },
    /// MOV from CR8: the LAPIC's TPR is in `data`.
    Cr8Read {
        gpr: hv_x86_reg_t,
        insn_len: u64,
    },
}

/// What an emulated MMIO instruction needs from the VMM.
#[derive(Debug, Clone, Copy)]
enum MmioAccess {
    /// Fill `data[..len]` and emulate the instruction again.
    Read { gpa: u64, len: usize },
    /// `data[..len]` goes to the device; the instruction is complete.
    Write { gpa: u64, len: usize },
    /// The instruction cannot be emulated.
    Failed,
}

/// One vCPU's VMX state machine over a [`Vmcs`].
pub struct VmxVcpu<V: Vmcs> {
    vmcs: V,
    config: VmxConfig,
    controls: Controls,
    run_state: RunState,
    pending: Pending,
    /// An exception to raise on the next entry (#GP from an MSR, #UD, re-injected events...).
    exception: Option<Event>,
    interrupt: Option<u8>,
    nmi: bool,
    /// What the VMM asked for; applied to the controls in `prepare_entry`.
    irq_window_wanted: bool,
    irq_window_on: bool,
    nmi_window_on: bool,
    /// Data buffers the returned exits borrow.
    data: [u8; 8],
    msr_value: u64,
    msr_fault: u8,
    apic_base: u64,
    cr8: u64,
    emulation_error: Option<EmulateError>,
}

impl<V: Vmcs> VmxVcpu<V> {
    /// Programs the controls from the capabilities and puts the vCPU in its reset state:
    /// the boot CPU (id 0) runs, an application processor waits for its start-up.
    pub fn new(mut vmcs: V, config: VmxConfig) -> Result<Self, HvError> {
        let controls = Controls::negotiate(&vmcs, config.exit_on_hlt, config.exit_on_pause)?;
        controls.program(&mut vmcs)?;
        let bsp = config.vcpu_id == 0;
        let mut vcpu = VmxVcpu {
            vmcs,
            config,
            controls,
            run_state: if bsp {
                RunState::Running
            } else {
                RunState::WaitingForSipi
            },
            pending: Pending::None,
            exception: None,
            interrupt: None,
            nmi: false,
            irq_window_wanted: false,
            irq_window_on: false,
            nmi_window_on: false,
            data: [0; 8],
            msr_value: 0,
            msr_fault: 0,
            apic_base: APIC_BASE_DEFAULT | if bsp { APIC_BASE_BSP } else { 0 },
            cr8: 0,
            emulation_error: None,
        };
        vcpu.reset()?;
        Ok(vcpu)
    }

    pub fn vmcs(&self) -> &V {
        &self.vmcs
    }

    pub fn vmcs_mut(&mut self) -> &mut V {
        &mut self.vmcs
    }

    pub fn config(&self) -> &VmxConfig {
        &self.config
    }

    pub fn run_state(&self) -> RunState {
        self.run_state
    }

    /// A machine reset: the power-on registers and VMCS guest state, as `new` leaves them,
    /// with nothing pending, queued or half-done (an I/O or MMIO exit the VMM never
    /// answered is dropped), both windows closed, the APIC base and CR8 at their defaults,
    /// and an AP waiting for its start-up again.
    pub fn power_on_reset(&mut self) -> Result<(), HvError> {
        let bsp = self.config.vcpu_id == 0;
        self.run_state = if bsp {
            RunState::Running
        } else {
            RunState::WaitingForSipi
        };
        self.pending = Pending::None;
        self.exception = None;
        self.interrupt = None;
        self.nmi = false;
        self.irq_window_wanted = false;
        self.set_windows(false, false)?;
        self.msr_value = 0;
        self.msr_fault = 0;
        self.apic_base = APIC_BASE_DEFAULT | if bsp { APIC_BASE_BSP } else { 0 };
        self.cr8 = 0;
        self.emulation_error = None;
        self.reset()
    }

    /// The power-on state (Intel SDM vol. 3, table 9-1), with xhyve's CR shadows.
    fn reset(&mut self) -> Result<(), HvError> {
        let v = &mut self.vmcs;
        v.write_field(VMCS_CTRL_EXC_BITMAP, 1 << 18)?; // #MC only
        v.write_field(VMCS_CTRL_CR0_MASK, CR0_GUEST_HOST_MASK)?;
        v.write_field(VMCS_CTRL_CR0_SHADOW, CR0_RESET)?;
        v.write_field(VMCS_GUEST_CR0, (CR0_RESET | CR0_ONES) & !CR0_ZEROS)?;
        v.write_field(VMCS_CTRL_CR4_MASK, CR4_GUEST_HOST_MASK)?;
        v.write_field(VMCS_CTRL_CR4_SHADOW, 0)?;
        v.write_field(VMCS_GUEST_CR4, CR4_ONES)?;
        v.write_field(VMCS_GUEST_CR3, 0)?;
        v.write_field(VMCS_GUEST_IA32_EFER, 0)?;
        v.write_field(VMCS_GUEST_IA32_PAT, PAT_RESET)?;
        v.write_field(VMCS_GUEST_LINK_POINTER, !0)?;
        v.write_field(VMCS_GUEST_DR7, 0x400)?;
        v.write_field(VMCS_GUEST_ACTIVITY_STATE, 0)?;
        v.write_field(VMCS_GUEST_IGNORE_IRQ, 0)?;
        v.write_field(VMCS_GUEST_RFLAGS, RFLAGS_RESERVED)?;
        v.write_field(VMCS_GUEST_RIP, 0xfff0)?;
        v.write_field(VMCS_GUEST_RSP, 0)?;
        v.write_field(VMCS_CTRL_VMENTRY_IRQ_INFO, 0)?;
        let cs = segment_from(0xf000, 0xffff_0000, 0xffff, 0x9b);
        let data = segment_from(0, 0, 0xffff, 0x93);
        let ldt = segment_from(0, 0, 0xffff, 0x82);
        let tss = segment_from(0, 0, 0xffff, 0x8b);
        for (fields, s) in [
            (&CS, &cs),
            (&DS, &data),
            (&ES, &data),
            (&FS, &data),
            (&GS, &data),
            (&SS, &data),
            (&LDTR, &ldt),
            (&TR, &tss),
        ] {
            write_segment(v, fields, s)?;
        }
        v.write_field(VMCS_GUEST_GDTR_BASE, 0)?;
        v.write_field(VMCS_GUEST_GDTR_LIMIT, 0xffff)?;
        v.write_field(VMCS_GUEST_IDTR_BASE, 0)?;
        v.write_field(VMCS_GUEST_IDTR_LIMIT, 0xffff)?;
        for reg in GPR_BY_INDEX {
            if reg != HV_X86_RSP {
                v.write_reg(reg, 0)?;
            }
        }
        // EDX holds the processor signature after reset.
        v.write_reg(HV_X86_RDX, 0x600)?;
        v.write_reg(HV_X86_CR2, 0)?;
        self.set_long_mode(false)
    }

    fn set_long_mode(&mut self, on: bool) -> Result<(), HvError> {
        let mut entry = self.controls.vmentry & !VMENTRY_GUEST_IA32E;
        if on {
            entry |= VMENTRY_GUEST_IA32E;
        }
        self.vmcs
            .write_field(VMCS_CTRL_VMENTRY_CONTROLS, entry.into())
    }

    fn cpu_based(&self) -> u32 {
        let mut v = self.controls.cpu_based;
        if self.irq_window_on {
            v |= CPU_BASED_IRQ_WND;
        }
        if self.nmi_window_on {
            v |= CPU_BASED_VIRTUAL_NMI_WND;
        }
        v
    }

    fn set_windows(&mut self, irq: bool, nmi: bool) -> Result<(), HvError> {
        if irq != self.irq_window_on || nmi != self.nmi_window_on {
            self.irq_window_on = irq;
            self.nmi_window_on = nmi;
            let value = self.cpu_based();
            self.vmcs.write_field(VMCS_CTRL_CPU_BASED, value.into())?;
        }
        Ok(())
    }

    fn advance_rip(&mut self, len: u64) -> Result<(), HvError> {
        let rip = self.vmcs.read_field(VMCS_GUEST_RIP)?;
        self.vmcs
            .write_field(VMCS_GUEST_RIP, rip.wrapping_add(len))?;
        // Completing an instruction ends an STI / MOV SS interrupt shadow.
        let blocking = self.vmcs.read_field(VMCS_GUEST_IGNORE_IRQ)?;
        let shadow = VMCS_INTERRUPTIBILITY_STI_BLOCKING | VMCS_INTERRUPTIBILITY_MOVSS_BLOCKING;
        if blocking & shadow != 0 {
            self.vmcs
                .write_field(VMCS_GUEST_IGNORE_IRQ, blocking & !shadow)?;
        }
        Ok(())
    }

    fn insn_len(&self) -> Result<u64, HvError> {
        self.vmcs.read_field(VMCS_RO_VMEXIT_INSTR_LEN)
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        self.exception = Some(Event::exception(vector, error_code));
    }

    fn paging(&self) -> Result<Paging, HvError> {
        Ok(Paging {
            cr0: self.vmcs.read_field(VMCS_GUEST_CR0)?,
            cr3: self.vmcs.read_field(VMCS_GUEST_CR3)?,
            cr4: self.vmcs.read_field(VMCS_GUEST_CR4)?,
            efer: self.vmcs.read_field(VMCS_GUEST_IA32_EFER)?,
        })
    }

    /// Guest-virtual to guest-physical in the current paging mode.
    pub fn translate(&self, ram: &dyn GuestRam, linear: u64) -> Result<Option<u64>, HvError> {
        Ok(self.paging()?.translate(ram, linear))
    }

    // ---- entry ----

    /// Before each hardware entry: completes the previous I/O/MMIO exit with the values the
    /// VMM filled in (register write-back, RIP advance, REP iteration), and writes a queued
    /// event into the VM-entry interruption field. `Some(exit)` = another access for the VMM
    /// (e.g. the write half of a read-modify-write): return it from run() without entering.
    pub fn prepare_entry(&mut self, ram: &dyn GuestRam) -> Result<Option<VmExit<'_>>, HvError> {
        let pending = std::mem::replace(&mut self.pending, Pending::None);
        match pending {
            Pending::None => {}
            Pending::Io {
                size,
                is_in,
                insn_len,
                string,
            } => {
                if let Some(done) = self.complete_io(ram, size, is_in, string)? {
                    if done {
                        self.advance_rip(insn_len)?;
                    }
                }
            }
            Pending::MmioRead { gpa, len } => {
                if let Some(access) = self.emulate_mmio(ram, Some((gpa, len)))? {
                    return Ok(Some(self.mmio_exit(access)));
                }
            }
            Pending::MsrRead { insn_len } => {
                if self.msr_fault != 0 {
                    self.inject_exception(EXC_GP, Some(0));
                } else {
                    self.vmcs
                        .write_reg(HV_X86_RAX, self.msr_value & 0xffff_ffff)?;
                    self.vmcs.write_reg(HV_X86_RDX, self.msr_value >> 32)?;
                    self.advance_rip(insn_len)?;
                }
            }
            Pending::MsrWrite { insn_len } => {
                if self.msr_fault != 0 {
                    self.inject_exception(EXC_GP, Some(0));
                } else {
                    self.advance_rip(insn_len)?;
                }
            }
            Pending::Cr8Read { gpr, insn_len } => {
                self.cr8 = u64::from(self.data[0] >> 4);
                self.vmcs.write_reg(gpr, self.cr8)?;
                self.advance_rip(insn_len)?;
            }
        }
        if self.run_state == RunState::Halted {
            self.run_state = RunState::Running;
        }
        self.write_event()?;
        Ok(None)
    }

    /// Completes one I/O exit. Returns whether the instruction is finished (RIP may advance);
    /// `None` when it raised a fault instead.
    fn complete_io(
        &mut self,
        ram: &dyn GuestRam,
        size: usize,
        is_in: bool,
        string: Option<StringIo>,
    ) -> Result<Option<bool>, HvError> {
        let Some(s) = string else {
            if is_in {
                let mut bytes = [0u8; 8];
                bytes[..size].copy_from_slice(&self.data[..size]);
                let value = u64::from_le_bytes(bytes);
                let rax = self.vmcs.read_reg(HV_X86_RAX)?;
                let merged = match size {
                    1 => (rax & !0xff) | value,
                    2 => (rax & !0xffff) | value,
                    // A 32-bit destination zero-extends into the full register.
                    _ => value,
                };
                self.vmcs.write_reg(HV_X86_RAX, merged)?;
            }
            return Ok(Some(true));
        };
        if is_in {
            match self.paging()?.translate(ram, s.linear) {
                Some(gpa) if ram.write(gpa, &self.data[..size]) => {}
                _ => {
                    self.page_fault(s.linear, true)?;
                    return Ok(None);
                }
            }
        }
        self.step_string(&s, size)?;
        if !s.rep {
            return Ok(Some(true));
        }
        let rcx = self.vmcs.read_reg(HV_X86_RCX)?;
        let count = (rcx & s.address_mask).wrapping_sub(1) & s.address_mask;
        self.vmcs
            .write_reg(HV_X86_RCX, (rcx & !s.address_mask) | count)?;
        Ok(Some(count == 0))
    }

    /// Moves RSI/RDI to the next element, by DF.
    fn step_string(&mut self, s: &StringIo, size: usize) -> Result<(), HvError> {
        let rflags = self.vmcs.read_field(VMCS_GUEST_RFLAGS)?;
        let index = self.vmcs.read_reg(s.index)?;
        let moved = if rflags & RFLAGS_DF != 0 {
            index.wrapping_sub(size as u64)
        } else {
            index.wrapping_add(size as u64)
        };
        self.vmcs.write_reg(
            s.index,
            (index & !s.address_mask) | (moved & s.address_mask),
        )
    }

    fn page_fault(&mut self, linear: u64, write: bool) -> Result<(), HvError> {
        self.vmcs.write_reg(HV_X86_CR2, linear)?;
        self.inject_exception(EXC_PF, Some(if write { 2 } else { 0 }));
        Ok(())
    }

    /// Writes the highest-priority queued event into the VM-entry interruption field, or asks
    /// for a window exit when it cannot be delivered yet.
    fn write_event(&mut self) -> Result<(), HvError> {
        if self.exception.is_none() && !self.nmi && self.interrupt.is_none() {
            // The common entry: nothing to deliver, no VMCS reads.
            return self.set_windows(self.irq_window_wanted, false);
        }
        let blocking = self.vmcs.read_field(VMCS_GUEST_IGNORE_IRQ)?;
        let shadow = blocking
            & (VMCS_INTERRUPTIBILITY_STI_BLOCKING | VMCS_INTERRUPTIBILITY_MOVSS_BLOCKING)
            != 0;
        // An interrupt queued behind an exception may meet IF clear by the time it is due.
        let if_set = self.vmcs.read_field(VMCS_GUEST_RFLAGS)? & RFLAGS_IF != 0;
        let event = if let Some(e) = self.exception.take() {
            Some(e)
        } else if self.nmi && !shadow && blocking & VMCS_INTERRUPTIBILITY_NMI_BLOCKING == 0 {
            self.nmi = false;
            Some(Event {
                info: IRQ_INFO_VALID | IRQ_INFO_NMI | 2,
                error_code: None,
                insn_len: None,
            })
        } else if let Some(vector) = self.interrupt.filter(|_| !self.nmi && !shadow && if_set) {
            self.interrupt = None;
            Some(Event {
                info: IRQ_INFO_VALID | IRQ_INFO_EXT_IRQ | u32::from(vector),
                error_code: None,
                insn_len: None,
            })
        } else {
            None
        };
        if let Some(e) = event {
            if let Some(code) = e.error_code {
                self.vmcs
                    .write_field(VMCS_CTRL_VMENTRY_EXC_ERROR, code.into())?;
            }
            if let Some(len) = e.insn_len {
                self.vmcs.write_field(VMCS_CTRL_VMENTRY_INSTR_LEN, len)?;
            }
            self.vmcs
                .write_field(VMCS_CTRL_VMENTRY_IRQ_INFO, e.info.into())?;
        }
        // Whatever is still queued waits for its window.
        let irq = self.irq_window_wanted || self.interrupt.is_some();
        self.set_windows(irq, self.nmi)
    }

    // ---- exits ----

    /// After the hardware run returned: handles what it can itself (CPUID, CR access, known
    /// MSRs, PAUSE, window exits...) -> `Ok(None)` = enter again; `Ok(Some(exit))` = for the VMM.
    pub fn handle_exit(&mut self, ram: &dyn GuestRam) -> Result<Option<VmExit<'_>>, HvError> {
        let full_reason = self.vmcs.read_field(VMCS_RO_EXIT_REASON)?;
        if full_reason & VMX_REASON_ENTRY_FAILED != 0 {
            return Ok(Some(VmExit::FailEntry {
                reason: full_reason,
            }));
        }
        self.requeue_vectoring_event()?;
        let reason = (full_reason & 0xffff) as u32;
        match reason {
            VMX_REASON_EXC_NMI => {
                let info = self.vmcs.read_field(VMCS_RO_VMEXIT_IRQ_INFO)? as u32;
                if info & IRQ_INFO_TYPE_MASK == IRQ_INFO_NMI {
                    // A host NMI: the framework has handled it.
                    Ok(None)
                } else {
                    Ok(Some(VmExit::Other { reason }))
                }
            }
            // A host interrupt (e.g. the back end's kick): the run loop looks at its kick flag.
            VMX_REASON_IRQ => Ok(None),
            VMX_REASON_TRIPLE_FAULT => Ok(Some(VmExit::Shutdown)),
            VMX_REASON_INIT => {
                // INIT puts the CPU back into wait-for-SIPI; the VMM restarts it by set_sregs.
                self.run_state = RunState::WaitingForSipi;
                Ok(Some(VmExit::Hlt))
            }
            VMX_REASON_SIPI => {
                let vector = self.vmcs.read_field(VMCS_RO_EXIT_QUALIFIC)? & 0xff;
                let cs = segment_from(vector << 8, vector << 12, 0xffff, 0x9b);
                write_segment(&mut self.vmcs, &CS, &cs)?;
                self.vmcs.write_field(VMCS_GUEST_RIP, 0)?;
                self.vmcs.write_field(VMCS_GUEST_ACTIVITY_STATE, 0)?;
                self.run_state = RunState::Running;
                Ok(None)
            }
            VMX_REASON_IRQ_WND => {
                let wanted = std::mem::take(&mut self.irq_window_wanted);
                self.set_windows(false, self.nmi_window_on)?;
                // A window opened only for an interrupt we already hold: just deliver it.
                Ok(wanted.then_some(VmExit::IrqWindowOpen))
            }
            VMX_REASON_VIRTUAL_NMI_WND => {
                // Only a queued NMI opens this window; the next entry delivers it.
                self.set_windows(self.irq_window_on, false)?;
                Ok(None)
            }
            // xhyve does not emulate hardware task switches either.
            VMX_REASON_TASK => Ok(Some(VmExit::Other { reason })),
            VMX_REASON_CPUID => {
                self.emulate_cpuid()?;
                Ok(None)
            }
            VMX_REASON_HLT => {
                let len = self.insn_len()?;
                self.advance_rip(len)?;
                self.run_state = RunState::Halted;
                Ok(Some(VmExit::Hlt))
            }
            VMX_REASON_PAUSE => {
                let len = self.insn_len()?;
                self.advance_rip(len)?;
                Ok(None)
            }
            VMX_REASON_MOV_CR => self.cr_access(),
            VMX_REASON_IO => self.io_exit(ram),
            VMX_REASON_RDMSR => self.rdmsr(),
            VMX_REASON_WRMSR => self.wrmsr(),
            VMX_REASON_EPT_VIOLATION => {
                self.restore_nmi_blocking()?;
                let gpa = self.vmcs.read_field(VMCS_GUEST_PHYSICAL_ADDRESS)?;
                if ram.read(gpa, &mut [0u8; 1]) {
                    // A fault on RAM we mapped: nothing to emulate.
                    return Ok(Some(VmExit::Other { reason }));
                }
                let access = self.emulate_mmio(ram, None)?;
                Ok(access.map(|a| self.mmio_exit(a)))
            }
            VMX_REASON_XSETBV => self.xsetbv(),
            // VMX instructions, MONITOR/MWAIT: not available to the guest.
            VMX_REASON_VMCALL..=27
            | VMX_REASON_EPT_INVEPT
            | VMX_REASON_INVVPID
            | VMX_REASON_VMFUNC
            | VMX_REASON_MWAIT
            | VMX_REASON_MONITOR => {
                self.inject_exception(EXC_UD, None);
                Ok(None)
            }
            _ => Ok(Some(VmExit::Other { reason })),
        }
    }

    /// An EPT violation in an IRET that unblocked NMIs must leave NMIs blocked again, as the
    /// IRET has not completed (SDM 27.2.3, "NMI unblocking due to IRET").
    fn restore_nmi_blocking(&mut self) -> Result<(), HvError> {
        const NMI_UNBLOCKED_BY_IRET: u64 = 1 << 12;
        let qual = self.vmcs.read_field(VMCS_RO_EXIT_QUALIFIC)?;
        let vectoring = self.vmcs.read_field(VMCS_RO_IDT_VECTOR_INFO)? as u32;
        if qual & NMI_UNBLOCKED_BY_IRET != 0 && vectoring & IRQ_INFO_VALID == 0 {
            let blocking = self.vmcs.read_field(VMCS_GUEST_IGNORE_IRQ)?;
            self.vmcs.write_field(
                VMCS_GUEST_IGNORE_IRQ,
                blocking | VMCS_INTERRUPTIBILITY_NMI_BLOCKING,
            )?;
        }
        Ok(())
    }

    /// An exit during event delivery loses the event unless it is delivered again.
    fn requeue_vectoring_event(&mut self) -> Result<(), HvError> {
        let info = self.vmcs.read_field(VMCS_RO_IDT_VECTOR_INFO)? as u32;
        if info & IRQ_INFO_VALID == 0 {
            return Ok(());
        }
        let error_code = if info & IRQ_INFO_ERROR_VALID != 0 {
            Some(self.vmcs.read_field(VMCS_RO_IDT_VECTOR_ERROR)? as u32)
        } else {
            None
        };
        let software = matches!(
            info & IRQ_INFO_TYPE_MASK,
            IRQ_INFO_SOFT_IRQ | IRQ_INFO_PRIV_SOFT_EXC | IRQ_INFO_SOFT_EXC
        );
        let insn_len = if software {
            Some(self.insn_len()?)
        } else {
            None
        };
        self.exception = Some(Event {
            info,
            error_code,
            insn_len,
        });
        Ok(())
    }

    fn emulate_cpuid(&mut self) -> Result<(), HvError> {
        let function = self.vmcs.read_reg(HV_X86_RAX)? as u32;
        let index = self.vmcs.read_reg(HV_X86_RCX)? as u32;
        let found = self
            .config
            .cpuid
            .iter()
            .find(|e| e.function == function && (!e.index_significant || e.index == index))
            .copied()
            .unwrap_or_default();
        let (eax, mut ebx, mut ecx, mut edx) = (found.eax, found.ebx, found.ecx, found.edx);
        let apic_id = u32::from(self.config.vcpu_id);
        match function {
            1 => {
                ebx = (ebx & 0x00ff_ffff) | apic_id << 24;
                let cr4 = self.guest_cr4()?;
                ecx &= !(1 << 27 | CPUID1_ECX_NOT_HERE);
                if cr4 & CR4_OSXSAVE != 0 {
                    ecx |= 1 << 27;
                }
            }
            0xb | 0x1f => edx = apic_id,
            _ => {}
        }
        if function == 0xb && found == CpuidEntry::default() {
            ecx = index;
        }
        self.vmcs.write_reg(HV_X86_RAX, eax.into())?;
        self.vmcs.write_reg(HV_X86_RBX, ebx.into())?;
        self.vmcs.write_reg(HV_X86_RCX, ecx.into())?;
        self.vmcs.write_reg(HV_X86_RDX, edx.into())?;
        let len = self.insn_len()?;
        self.advance_rip(len)
    }

    /// The CR0 the guest believes it has: host-owned bits from the read shadow.
    fn guest_cr0(&self) -> Result<u64, HvError> {
        let real = self.vmcs.read_field(VMCS_GUEST_CR0)?;
        let shadow = self.vmcs.read_field(VMCS_CTRL_CR0_SHADOW)?;
        Ok((real & !CR0_GUEST_HOST_MASK) | (shadow & CR0_GUEST_HOST_MASK))
    }

    fn guest_cr4(&self) -> Result<u64, HvError> {
        let real = self.vmcs.read_field(VMCS_GUEST_CR4)?;
        let shadow = self.vmcs.read_field(VMCS_CTRL_CR4_SHADOW)?;
        Ok((real & !CR4_GUEST_HOST_MASK) | (shadow & CR4_GUEST_HOST_MASK))
    }

    /// Sets the guest's CR0: the shadow holds its value, the VMCS the forced one; turning
    /// paging on with EFER.LME set enters long mode (LMA and the IA-32e entry control).
    fn write_cr0(&mut self, value: u64) -> Result<(), HvError> {
        self.vmcs.write_field(VMCS_CTRL_CR0_SHADOW, value)?;
        self.vmcs
            .write_field(VMCS_GUEST_CR0, (value | CR0_ONES) & !CR0_ZEROS)?;
        let efer = self.vmcs.read_field(VMCS_GUEST_IA32_EFER)?;
        let lma = value & CR0_PG != 0 && efer & EFER_LME != 0;
        let new_efer = if lma {
            efer | EFER_LMA
        } else {
            efer & !EFER_LMA
        };
        if new_efer != efer {
            self.vmcs.write_field(VMCS_GUEST_IA32_EFER, new_efer)?;
        }
        self.set_long_mode(lma)
    }

    fn write_cr4(&mut self, value: u64) -> Result<(), HvError> {
        self.vmcs.write_field(VMCS_CTRL_CR4_SHADOW, value)?;
        self.vmcs.write_field(VMCS_GUEST_CR4, value | CR4_ONES)
    }

    fn cr_access(&mut self) -> Result<Option<VmExit<'_>>, HvError> {
        let qual = self.vmcs.read_field(VMCS_RO_EXIT_QUALIFIC)?;
        let cr = qual & 0xf;
        let access = (qual >> 4) & 3;
        let gpr = GPR_BY_INDEX[((qual >> 8) & 0xf) as usize];
        match (access, cr) {
            (0, 0) => {
                let value = self.vmcs.read_reg(gpr)?;
                self.write_cr0(value)?;
            }
            (0, 4) => {
                let value = self.vmcs.read_reg(gpr)?;
                self.write_cr4(value)?;
            }
            (0, 8) => {
                // The user LAPIC owns the TPR: CR8 writes become TPR writes.
                self.cr8 = self.vmcs.read_reg(gpr)? & 0xf;
                let len = self.insn_len()?;
                self.advance_rip(len)?;
                self.data = [0; 8];
                self.data[0] = (self.cr8 << 4) as u8;
                return Ok(Some(VmExit::MmioWrite {
                    addr: self.tpr_address(),
                    data: &self.data[..4],
                }));
            }
            (1, 8) => {
                let insn_len = self.insn_len()?;
                self.pending = Pending::Cr8Read { gpr, insn_len };
                self.data = [0; 8];
                return Ok(Some(VmExit::MmioRead {
                    addr: self.tpr_address(),
                    data: &mut self.data[..4],
                }));
            }
            (2, _) => {
                // CLTS
                let cr0 = self.guest_cr0()? & !CR0_TS;
                self.write_cr0(cr0)?;
            }
            (3, _) => {
                // LMSW loads CR0[3:0] but cannot clear PE.
                let source = (qual >> 16) & 0xf;
                let cr0 = self.guest_cr0()?;
                self.write_cr0((cr0 & !0xe) | source | (cr0 & CR0_PE))?;
            }
            _ => {
                return Ok(Some(VmExit::Other {
                    reason: VMX_REASON_MOV_CR,
                }))
            }
        }
        let len = self.insn_len()?;
        self.advance_rip(len)?;
        Ok(None)
    }

    fn tpr_address(&self) -> u64 {
        (self.apic_base & !0xfff) + LAPIC_TPR_OFFSET
    }

    fn io_exit(&mut self, ram: &dyn GuestRam) -> Result<Option<VmExit<'_>>, HvError> {
        let qual = self.vmcs.read_field(VMCS_RO_EXIT_QUALIFIC)?;
        let size = ((qual & 7) + 1) as usize;
        let is_in = qual & (1 << 3) != 0;
        let is_string = qual & (1 << 4) != 0;
        let rep = qual & (1 << 5) != 0;
        let port = (qual >> 16) as u16;
        let insn_len = self.insn_len()?;
        if !matches!(size, 1 | 2 | 4) {
            return Ok(Some(VmExit::Other {
                reason: VMX_REASON_IO,
            }));
        }
        let string = if is_string {
            let info = self.vmcs.read_field(VMCS_RO_VMX_INSTR_INFO)?;
            let address_mask = match (info >> 7) & 7 {
                0 => 0xffff,
                1 => 0xffff_ffff,
                _ => !0,
            };
            // OUTS reads DS:RSI (segment overridable); INS writes ES:RDI.
            let (index, segment) = if is_in {
                (HV_X86_RDI, &ES)
            } else {
                let seg = SEGMENT_BY_INDEX
                    .get(((info >> 15) & 7) as usize)
                    .copied()
                    .unwrap_or(&DS);
                (HV_X86_RSI, seg)
            };
            if rep && self.vmcs.read_reg(HV_X86_RCX)? & address_mask == 0 {
                // A REP with a zero count does nothing.
                self.advance_rip(insn_len)?;
                return Ok(None);
            }
            let long_mode = self.vmcs.read_field(VMCS_GUEST_IA32_EFER)? & EFER_LMA != 0
                && self.vmcs.read_field(CS.access)? & AR_L != 0;
            let base = if long_mode
                && segment.selector != VMCS_GUEST_FS
                && segment.selector != VMCS_GUEST_GS
            {
                0
            } else {
                self.vmcs.read_field(segment.base)?
            };
            let offset = self.vmcs.read_reg(index)? & address_mask;
            let mut linear = base.wrapping_add(offset);
            if !long_mode {
                linear &= 0xffff_ffff;
            }
            Some(StringIo {
                rep,
                index,
                linear,
                address_mask,
            })
        } else {
            None
        };
        if let (true, Some(s)) = (is_in, &string) {
            // Fault before the device sees the read, so a restarted INS reads it only once.
            if self.paging()?.translate(ram, s.linear).is_none() {
                self.page_fault(s.linear, true)?;
                return Ok(None);
            }
        }
        if !is_in {
            match &string {
                Some(s) => {
                    let mut buf = [0u8; 4];
                    match self.paging()?.translate(ram, s.linear) {
                        Some(gpa) if ram.read(gpa, &mut buf[..size]) => {}
                        _ => {
                            self.page_fault(s.linear, false)?;
                            return Ok(None);
                        }
                    }
                    self.data[..size].copy_from_slice(&buf[..size]);
                }
                None => {
                    let rax = self.vmcs.read_reg(HV_X86_RAX)?;
                    self.data = rax.to_le_bytes();
                }
            }
        }
        self.pending = Pending::Io {
            size,
            is_in,
            insn_len,
            string,
        };
        Ok(Some(if is_in {
            self.data = [0; 8];
            VmExit::IoIn {
                port,
                size,
                data: &mut self.data[..size],
            }
        } else {
            VmExit::IoOut {
                port,
                size,
                data: &self.data[..size],
            }
        }))
    }

    fn rdmsr(&mut self) -> Result<Option<VmExit<'_>>, HvError> {
        let index = self.vmcs.read_reg(HV_X86_RCX)? as u32;
        let insn_len = self.insn_len()?;
        let value = match index {
            MSR_EFER => Some(self.vmcs.read_field(VMCS_GUEST_IA32_EFER)?),
            MSR_TSC => Some(host_tsc().wrapping_add(self.vmcs.read_field(VMCS_CTRL_TSC_OFFSET)?)),
            MSR_APIC_BASE => Some(self.apic_base),
            MSR_PAT => Some(self.vmcs.read_field(VMCS_GUEST_IA32_PAT)?),
            MSR_MISC_ENABLE => Some(MISC_ENABLE),
            MSR_MCG_CAP | MSR_MCG_STATUS | MSR_BIOS_SIGN => Some(0),
            // xhyve reports no MTRRs and ignores their writes.
            MSR_MTRR_CAP | MSR_MTRR_DEF_TYPE | MSR_MTRR_FIX_64K | MSR_MTRR_FIX_16K
            | MSR_MTRR_FIX_16K_2 => Some(0),
            MSR_MTRR_FIX_4K_FIRST..=MSR_MTRR_FIX_4K_LAST
            | MSR_MTRR_PHYS_FIRST..=MSR_MTRR_PHYS_LAST => Some(0),
            // Locked with VMX off: the guest must not try to use VMX.
            MSR_FEATURE_CONTROL => Some(1),
            _ => None,
        };
        match value {
            Some(v) => {
                self.vmcs.write_reg(HV_X86_RAX, v & 0xffff_ffff)?;
                self.vmcs.write_reg(HV_X86_RDX, v >> 32)?;
                self.advance_rip(insn_len)?;
                Ok(None)
            }
            None => self.unknown_msr(index, None, insn_len),
        }
    }

    fn wrmsr(&mut self) -> Result<Option<VmExit<'_>>, HvError> {
        let index = self.vmcs.read_reg(HV_X86_RCX)? as u32;
        let value = (self.vmcs.read_reg(HV_X86_RDX)? << 32)
            | (self.vmcs.read_reg(HV_X86_RAX)? & 0xffff_ffff);
        let insn_len = self.insn_len()?;
        match self.set_msr(index, value)? {
            Some(true) => self.advance_rip(insn_len)?,
            Some(false) => self.inject_exception(EXC_GP, Some(0)),
            None => return self.unknown_msr(index, Some(value), insn_len),
        }
        Ok(None)
    }

    /// Writes an MSR this layer emulates (EFER, TSC, APIC base, PAT, the MTRRs and machine-check
    /// MSRs, which xhyve ignores): `Some(true)` = done, `Some(false)` = the value is invalid
    /// (#GP for a guest write), `None` = not an MSR of this layer (the framework's native MSRs
    /// included). The back end's `set_msrs` can route the VMM's boot MSRs through it.
    pub fn set_msr(&mut self, index: u32, value: u64) -> Result<Option<bool>, HvError> {
        Ok(Some(match index {
            MSR_EFER => self.write_efer(value)?,
            MSR_TSC => {
                let offset = value.wrapping_sub(host_tsc());
                self.vmcs.write_field(VMCS_CTRL_TSC_OFFSET, offset)?;
                true
            }
            MSR_APIC_BASE => {
                // The BSP flag is read-only; x2APIC mode does not exist in our LAPIC.
                let ok = value & APIC_BASE_X2APIC == 0;
                if ok {
                    self.apic_base = (value & !APIC_BASE_BSP) | (self.apic_base & APIC_BASE_BSP);
                }
                ok
            }
            MSR_PAT => {
                let valid = (0..8).all(|i| matches!((value >> (i * 8)) & 0xff, 0 | 1 | 4..=7));
                if valid {
                    self.vmcs.write_field(VMCS_GUEST_IA32_PAT, value)?;
                }
                valid
            }
            // As xhyve: only the XD-disable bit may change; anything else is the VMM's call.
            MSR_MISC_ENABLE if (value ^ MISC_ENABLE) & !MISC_ENABLE_IGNORED == 0 => true,
            MSR_MCG_CAP | MSR_MCG_STATUS | MSR_BIOS_SIGN | MSR_MTRR_DEF_TYPE | MSR_MTRR_FIX_64K
            | MSR_MTRR_FIX_16K | MSR_MTRR_FIX_16K_2 => true,
            MSR_MTRR_FIX_4K_FIRST..=MSR_MTRR_FIX_4K_LAST
            | MSR_MTRR_PHYS_FIRST..=MSR_MTRR_PHYS_LAST => true,
            MSR_MTRR_CAP | MSR_FEATURE_CONTROL => false,
            _ => return Ok(None),
        }))
    }

    /// EFER: SCE, LME and NXE are writable; LMA follows CR0.PG and LME. False = #GP.
    fn write_efer(&mut self, value: u64) -> Result<bool, HvError> {
        if value & !(EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE) != 0 {
            return Ok(false);
        }
        let cr0 = self.guest_cr0()?;
        let old = self.vmcs.read_field(VMCS_GUEST_IA32_EFER)?;
        // LME cannot change while paging is on.
        if cr0 & CR0_PG != 0 && (old ^ value) & EFER_LME != 0 {
            return Ok(false);
        }
        let lma = cr0 & CR0_PG != 0 && value & EFER_LME != 0;
        let efer = if lma {
            value | EFER_LMA
        } else {
            value & !EFER_LMA
        };
        self.vmcs.write_field(VMCS_GUEST_IA32_EFER, efer)?;
        self.set_long_mode(lma)?;
        Ok(true)
    }

    /// An MSR the layer does not know: with `-w` the VMM decides (its answer is applied by
    /// `prepare_entry`), without it the guest gets #GP as on real hardware.
    fn unknown_msr(
        &mut self,
        index: u32,
        write: Option<u64>,
        insn_len: u64,
    ) -> Result<Option<VmExit<'_>>, HvError> {
        if !self.config.ignore_unknown_msrs {
            self.inject_exception(EXC_GP, Some(0));
            return Ok(None);
        }
        self.msr_fault = 0;
        Ok(Some(match write {
            None => {
                self.msr_value = 0;
                self.pending = Pending::MsrRead { insn_len };
                VmExit::MsrRead {
                    index,
                    value: &mut self.msr_value,
                    fault: &mut self.msr_fault,
                }
            }
            Some(value) => {
                self.pending = Pending::MsrWrite { insn_len };
                VmExit::MsrWrite {
                    index,
                    value,
                    fault: &mut self.msr_fault,
                }
            }
        }))
    }

    fn xsetbv(&mut self) -> Result<Option<VmExit<'_>>, HvError> {
        let index = self.vmcs.read_reg(HV_X86_RCX)? as u32;
        let value = (self.vmcs.read_reg(HV_X86_RDX)? << 32)
            | (self.vmcs.read_reg(HV_X86_RAX)? & 0xffff_ffff);
        // XCR0: x87 state must stay enabled, AVX needs SSE.
        let valid = index == 0 && value & 1 != 0 && (value & 4 == 0 || value & 2 != 0);
        if valid && self.guest_cr4()? & CR4_OSXSAVE != 0 {
            self.vmcs.write_reg(HV_X86_XCR0, value)?;
            let len = self.insn_len()?;
            self.advance_rip(len)?;
        } else {
            self.inject_exception(EXC_GP, Some(0));
        }
        Ok(None)
    }

    /// Emulates the instruction at RIP that touched MMIO. `replay` is the read the VMM just
    /// answered (its value is in `self.data`). `Some` = an access for the VMM.
    fn emulate_mmio(
        &mut self,
        ram: &dyn GuestRam,
        replay: Option<(u64, usize)>,
    ) -> Result<Option<MmioAccess>, HvError> {
        let paging = self.paging()?;
        let rip = self.vmcs.read_field(VMCS_GUEST_RIP)?;
        let cs_access = self.vmcs.read_field(CS.access)?;
        let mode = if paging.cr0 & CR0_PE == 0 {
            CpuMode::Real
        } else if paging.efer & EFER_LMA != 0 && cs_access & AR_L != 0 {
            CpuMode::Long64
        } else if cs_access & AR_DB != 0 {
            CpuMode::Protected32
        } else {
            CpuMode::Protected16
        };
        let cs_base = if mode == CpuMode::Long64 {
            0
        } else {
            self.vmcs.read_field(CS.base)?
        };
        let mut bytes = [0u8; MAX_INSN_LEN];
        let fetched = fetch(ram, &paging, cs_base.wrapping_add(rip), mode, &mut bytes);
        if fetched == 0 {
            self.emulation_error = None;
            return Ok(Some(MmioAccess::Failed));
        }
        let mut ctx = MmioContext {
            vmcs: &mut self.vmcs,
            ram,
            paging,
            long_mode: mode == CpuMode::Long64,
            rip,
            replay: replay.map(|(gpa, len)| (gpa, len, self.data)),
            read_miss: None,
            write: None,
            error: RefCell::new(None),
        };
        let result = emulate(&mut ctx, &bytes[..fetched], mode);
        let MmioContext {
            read_miss,
            write,
            error,
            ..
        } = ctx;
        if let Some(e) = error.into_inner() {
            return Err(e);
        }
        match result {
            Ok(outcome) => {
                if let Emulated::Done { len } = outcome {
                    self.advance_rip(len as u64)?;
                }
                Ok(write.map(|(gpa, len, data)| {
                    self.data = data;
                    MmioAccess::Write { gpa, len }
                }))
            }
            Err(EmulateError::MmioPending { .. }) if read_miss.is_some() => {
                let (gpa, len) = read_miss.unwrap_or_default();
                self.pending = Pending::MmioRead { gpa, len };
                self.data = [0; 8];
                Ok(Some(MmioAccess::Read { gpa, len }))
            }
            Err(e) => {
                self.emulation_error = Some(e);
                Ok(Some(MmioAccess::Failed))
            }
        }
    }

    /// Why the last MMIO emulation failed (`VmExit::InternalError`), for the VMM's message.
    pub fn last_emulation_error(&self) -> Option<EmulateError> {
        self.emulation_error
    }

    fn mmio_exit(&mut self, access: MmioAccess) -> VmExit<'_> {
        match access {
            MmioAccess::Read { gpa, len } => VmExit::MmioRead {
                addr: gpa,
                data: &mut self.data[..len],
            },
            MmioAccess::Write { gpa, len } => VmExit::MmioWrite {
                addr: gpa,
                data: &self.data[..len],
            },
            MmioAccess::Failed => VmExit::InternalError {
                suberror: INTERNAL_ERROR_EMULATION,
            },
        }
    }

    // ---- registers and interrupts ----

    pub fn regs(&self) -> Result<StandardRegisters, HvError> {
        let r = |reg| self.vmcs.read_reg(reg);
        Ok(StandardRegisters {
            rax: r(HV_X86_RAX)?,
            rbx: r(HV_X86_RBX)?,
            rcx: r(HV_X86_RCX)?,
            rdx: r(HV_X86_RDX)?,
            rsi: r(HV_X86_RSI)?,
            rdi: r(HV_X86_RDI)?,
            rsp: self.vmcs.read_field(VMCS_GUEST_RSP)?,
            rbp: r(HV_X86_RBP)?,
            r8: r(HV_X86_R8)?,
            r9: r(HV_X86_R9)?,
            r10: r(HV_X86_R10)?,
            r11: r(HV_X86_R11)?,
            r12: r(HV_X86_R12)?,
            r13: r(HV_X86_R13)?,
            r14: r(HV_X86_R14)?,
            r15: r(HV_X86_R15)?,
            rip: self.vmcs.read_field(VMCS_GUEST_RIP)?,
            rflags: self.vmcs.read_field(VMCS_GUEST_RFLAGS)?,
        })
    }

    /// Sets the registers; an application processor starts running with them.
    pub fn set_regs(&mut self, regs: &StandardRegisters) -> Result<(), HvError> {
        let v = &mut self.vmcs;
        for (reg, value) in [
            (HV_X86_RAX, regs.rax),
            (HV_X86_RBX, regs.rbx),
            (HV_X86_RCX, regs.rcx),
            (HV_X86_RDX, regs.rdx),
            (HV_X86_RSI, regs.rsi),
            (HV_X86_RDI, regs.rdi),
            (HV_X86_RBP, regs.rbp),
            (HV_X86_R8, regs.r8),
            (HV_X86_R9, regs.r9),
            (HV_X86_R10, regs.r10),
            (HV_X86_R11, regs.r11),
            (HV_X86_R12, regs.r12),
            (HV_X86_R13, regs.r13),
            (HV_X86_R14, regs.r14),
            (HV_X86_R15, regs.r15),
        ] {
            v.write_reg(reg, value)?;
        }
        v.write_field(VMCS_GUEST_RSP, regs.rsp)?;
        v.write_field(VMCS_GUEST_RIP, regs.rip)?;
        v.write_field(VMCS_GUEST_RFLAGS, regs.rflags | RFLAGS_RESERVED)?;
        self.start();
        Ok(())
    }

    pub fn sregs(&self) -> Result<SpecialRegisters, HvError> {
        let v = &self.vmcs;
        let segment = |f: &SegmentFields| -> Result<SegmentRegister, HvError> {
            Ok(segment_from(
                v.read_field(f.selector)?,
                v.read_field(f.base)?,
                v.read_field(f.limit)?,
                v.read_field(f.access)?,
            ))
        };
        Ok(SpecialRegisters {
            cs: segment(&CS)?,
            ds: segment(&DS)?,
            es: segment(&ES)?,
            fs: segment(&FS)?,
            gs: segment(&GS)?,
            ss: segment(&SS)?,
            tr: segment(&TR)?,
            ldt: segment(&LDTR)?,
            gdt: DescriptorTable {
                base: v.read_field(VMCS_GUEST_GDTR_BASE)?,
                limit: v.read_field(VMCS_GUEST_GDTR_LIMIT)? as u16,
            },
            idt: DescriptorTable {
                base: v.read_field(VMCS_GUEST_IDTR_BASE)?,
                limit: v.read_field(VMCS_GUEST_IDTR_LIMIT)? as u16,
            },
            cr0: self.guest_cr0()?,
            cr2: v.read_reg(HV_X86_CR2)?,
            cr3: v.read_field(VMCS_GUEST_CR3)?,
            cr4: self.guest_cr4()?,
            cr8: self.cr8,
            efer: v.read_field(VMCS_GUEST_IA32_EFER)?,
            apic_base: self.apic_base,
        })
    }

    /// Sets segments and control registers; an application processor starts running.
    pub fn set_sregs(&mut self, sregs: &SpecialRegisters) -> Result<(), HvError> {
        for (fields, s) in [
            (&CS, &sregs.cs),
            (&DS, &sregs.ds),
            (&ES, &sregs.es),
            (&FS, &sregs.fs),
            (&GS, &sregs.gs),
            (&SS, &sregs.ss),
            (&TR, &sregs.tr),
            (&LDTR, &sregs.ldt),
        ] {
            write_segment(&mut self.vmcs, fields, s)?;
        }
        let v = &mut self.vmcs;
        v.write_field(VMCS_GUEST_GDTR_BASE, sregs.gdt.base)?;
        v.write_field(VMCS_GUEST_GDTR_LIMIT, sregs.gdt.limit.into())?;
        v.write_field(VMCS_GUEST_IDTR_BASE, sregs.idt.base)?;
        v.write_field(VMCS_GUEST_IDTR_LIMIT, sregs.idt.limit.into())?;
        v.write_reg(HV_X86_CR2, sregs.cr2)?;
        v.write_field(VMCS_GUEST_CR3, sregs.cr3)?;
        // EFER first: the CR0 write derives LMA from it.
        v.write_field(VMCS_GUEST_IA32_EFER, sregs.efer)?;
        self.write_cr4(sregs.cr4)?;
        self.write_cr0(sregs.cr0)?;
        self.cr8 = sregs.cr8 & 0xf;
        if sregs.apic_base != 0 {
            self.apic_base = sregs.apic_base;
        }
        self.start();
        Ok(())
    }

    fn start(&mut self) {
        if self.run_state == RunState::WaitingForSipi {
            self.run_state = RunState::Running;
        }
    }

    /// Whether an external interrupt can be injected on the next entry: RFLAGS.IF set, no
    /// STI/MOV SS shadow, and nothing queued already.
    pub fn ready_for_interrupt(&mut self) -> bool {
        if self.interrupt.is_some() || self.exception.is_some() || self.nmi {
            return false;
        }
        let (Ok(rflags), Ok(blocking)) = (
            self.vmcs.read_field(VMCS_GUEST_RFLAGS),
            self.vmcs.read_field(VMCS_GUEST_IGNORE_IRQ),
        ) else {
            return false;
        };
        rflags & RFLAGS_IF != 0
            && blocking
                & (VMCS_INTERRUPTIBILITY_STI_BLOCKING | VMCS_INTERRUPTIBILITY_MOVSS_BLOCKING)
                == 0
    }

    /// Queues external interrupt `vector` for the next entry.
    pub fn inject_interrupt(&mut self, vector: u8) -> Result<(), HvError> {
        self.interrupt = Some(vector);
        Ok(())
    }

    /// Queues an NMI; it is delivered when NMIs are not blocked (NMI-window exit otherwise).
    pub fn inject_nmi(&mut self) -> Result<(), HvError> {
        self.nmi = true;
        Ok(())
    }

    /// Asks for `VmExit::IrqWindowOpen` as soon as the guest can take an interrupt; the
    /// control is written by the next `prepare_entry`.
    pub fn request_interrupt_window(&mut self, on: bool) {
        self.irq_window_wanted = on;
    }

    pub fn interrupts_enabled(&mut self) -> bool {
        self.vmcs
            .read_field(VMCS_GUEST_RFLAGS)
            .is_ok_and(|f| f & RFLAGS_IF != 0)
    }
}

fn write_segment(v: &mut impl Vmcs, f: &SegmentFields, s: &SegmentRegister) -> Result<(), HvError> {
    v.write_field(f.selector, s.selector.into())?;
    v.write_field(f.base, s.base)?;
    v.write_field(f.limit, s.limit.into())?;
    // VMX wants a null or absent segment marked unusable.
    let mut ar = access_rights(s);
    if !s.present {
        ar |= AR_UNUSABLE;
    }
    v.write_field(f.access, ar)
}

/// The host's time-stamp counter, which the guest's runs at plus VMCS_CTRL_TSC_OFFSET.
/// (The back end makes the TSC MSR native, so this serves only a back end that does not.)
fn host_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC has no memory effects and exists on every x86-64 processor.
    unsafe {
        std::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// The emulator's view of the vCPU during one MMIO emulation. Memory that is not RAM is the
/// device: a read is answered from `replay` or recorded as a miss (the emulation aborts and the
/// VMM is asked), a write is recorded for the VMM.
struct MmioContext<'a, V: Vmcs> {
    vmcs: &'a mut V,
    ram: &'a dyn GuestRam,
    paging: Paging,
    long_mode: bool,
    rip: u64,
    replay: Option<(u64, usize, [u8; 8])>,
    read_miss: Option<(u64, usize)>,
    write: Option<(u64, usize, [u8; 8])>,
    /// The first VMCS access error; the emulation's result is discarded when set. A cell
    /// because register reads happen through `&self`.
    error: RefCell<Option<HvError>>,
}

impl<V: Vmcs> MmioContext<'_, V> {
    fn hv_reg(reg: Register) -> Option<hv_x86_reg_t> {
        Some(match reg {
            Register::RAX => HV_X86_RAX,
            Register::RCX => HV_X86_RCX,
            Register::RDX => HV_X86_RDX,
            Register::RBX => HV_X86_RBX,
            Register::RSP => HV_X86_RSP,
            Register::RBP => HV_X86_RBP,
            Register::RSI => HV_X86_RSI,
            Register::RDI => HV_X86_RDI,
            Register::R8 => HV_X86_R8,
            Register::R9 => HV_X86_R9,
            Register::R10 => HV_X86_R10,
            Register::R11 => HV_X86_R11,
            Register::R12 => HV_X86_R12,
            Register::R13 => HV_X86_R13,
            Register::R14 => HV_X86_R14,
            Register::R15 => HV_X86_R15,
            _ => return None,
        })
    }

    fn note<T: Default>(&self, result: Result<T, HvError>) -> T {
        result.unwrap_or_else(|e| {
            self.error.borrow_mut().get_or_insert(e);
            T::default()
        })
    }

    /// The guest-physical address of `linear` when the access stays in one page.
    fn physical(&self, linear: u64, size: usize) -> Result<u64, EmulateError> {
        let linear = if self.long_mode {
            linear
        } else {
            linear & 0xffff_ffff
        };
        let crosses = (linear & 0xfff) as usize + size > 0x1000;
        match self.paging.translate(self.ram, linear) {
            Some(gpa) if !crosses && size <= 8 => Ok(gpa),
            _ => Err(EmulateError::Memory { linear, size }),
        }
    }
}

impl<V: Vmcs> EmulatorContext for MmioContext<'_, V> {
    fn gpr(&self, reg: Register) -> u64 {
        if reg == Register::RIP {
            return self.rip;
        }
        match Self::hv_reg(reg) {
            Some(r) => self.note(self.vmcs.read_reg(r)),
            None => 0,
        }
    }

    fn set_gpr(&mut self, reg: Register, value: u64) {
        if let Some(r) = Self::hv_reg(reg) {
            let result = self.vmcs.write_reg(r, value);
            self.note(result);
        }
    }

    fn rflags(&self) -> u64 {
        self.note(self.vmcs.read_field(VMCS_GUEST_RFLAGS))
    }

    fn set_rflags(&mut self, value: u64) {
        let result = self
            .vmcs
            .write_field(VMCS_GUEST_RFLAGS, value | RFLAGS_RESERVED);
        self.note(result);
    }

    fn read_memory(&mut self, linear: u64, data: &mut [u8]) -> Result<(), EmulateError> {
        let gpa = self.physical(linear, data.len())?;
        if self.ram.read(gpa, data) {
            return Ok(());
        }
        match self.replay {
            Some((at, len, value)) if at == gpa && len == data.len() => {
                data.copy_from_slice(&value[..len]);
                Ok(())
            }
            _ => {
                self.read_miss = Some((gpa, data.len()));
                Err(EmulateError::MmioPending {
                    linear,
                    size: data.len(),
                })
            }
        }
    }

    fn write_memory(&mut self, linear: u64, data: &[u8]) -> Result<(), EmulateError> {
        let gpa = self.physical(linear, data.len())?;
        if self.ram.write(gpa, data) {
            return Ok(());
        }
        if self.write.is_some() {
            // One device write per instruction is all the exit can carry.
            return Err(EmulateError::Memory {
                linear,
                size: data.len(),
            });
        }
        let mut value = [0u8; 8];
        value[..data.len()].copy_from_slice(data);
        self.write = Some((gpa, data.len(), value));
        Ok(())
    }

    fn segment_base(&self, seg: Register) -> u64 {
        let field = match seg {
            Register::ES => ES.base,
            Register::CS => CS.base,
            Register::SS => SS.base,
            Register::DS => DS.base,
            Register::FS => FS.base,
            Register::GS => GS.base,
            _ => return 0,
        };
        self.note(self.vmcs.read_field(field))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::arch::x86_64::regs::{CR4_PAE, CR4_PSE};
    use crate::hv::hvf::vmcs::VmcsModel;

    /// Guest RAM from GPA 0; everything above is "MMIO".
    struct Ram(RefCell<Vec<u8>>);

    impl Ram {
        fn new(size: usize) -> Ram {
            Ram(RefCell::new(vec![0; size]))
        }
        fn put(&self, gpa: u64, bytes: &[u8]) {
            let at = gpa as usize;
            self.0.borrow_mut()[at..at + bytes.len()].copy_from_slice(bytes);
        }
        fn put_u64(&self, gpa: u64, value: u64) {
            self.put(gpa, &value.to_le_bytes());
        }
    }

    impl GuestRam for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
            let mem = self.0.borrow();
            let Some(end) = (gpa as usize).checked_add(buf.len()) else {
                return false;
            };
            match mem.get(gpa as usize..end) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
        fn write(&self, gpa: u64, buf: &[u8]) -> bool {
            let mut mem = self.0.borrow_mut();
            let Some(end) = (gpa as usize).checked_add(buf.len()) else {
                return false;
            };
            match mem.get_mut(gpa as usize..end) {
                Some(dst) => {
                    dst.copy_from_slice(buf);
                    true
                }
                None => false,
            }
        }
    }

    fn config() -> VmxConfig {
        VmxConfig {
            vcpu_id: 0,
            cpuid: vec![],
            ignore_unknown_msrs: false,
            exit_on_hlt: true,
            exit_on_pause: true,
        }
    }

    fn vcpu_with(config: VmxConfig) -> VmxVcpu<VmcsModel> {
        let mut vcpu = VmxVcpu::new(VmcsModel::new(), config).unwrap();
        // Tests count RIP from 0 rather than from the reset vector.
        vcpu.vmcs_mut().set_field(VMCS_GUEST_RIP, 0);
        vcpu.vmcs_mut().writes.clear();
        vcpu
    }

    fn vcpu() -> VmxVcpu<VmcsModel> {
        vcpu_with(config())
    }

    /// 32-bit protected mode, flat segments, no paging.
    fn protected32(v: &mut VmxVcpu<VmcsModel>) {
        let m = v.vmcs_mut();
        m.set_field(VMCS_GUEST_CR0, CR0_PE | CR0_NE | CR0_ET);
        m.set_field(VMCS_CTRL_CR0_SHADOW, CR0_PE | CR0_ET);
        m.set_field(VMCS_GUEST_CS_AR, 0xc09b);
        m.set_field(VMCS_GUEST_CS_BASE, 0);
    }

    /// 64-bit mode with identity-mapped 1 GiB pages for the low 4 GiB (PML4 at 0x1000).
    fn long_mode(v: &mut VmxVcpu<VmcsModel>, ram: &Ram) {
        ram.put_u64(0x1000, 0x2000 | 3);
        for i in 0..4u64 {
            ram.put_u64(0x2000 + i * 8, (i << 30) | 0x83);
        }
        let m = v.vmcs_mut();
        m.set_field(VMCS_GUEST_CR0, CR0_PE | CR0_PG | CR0_NE | CR0_ET);
        m.set_field(VMCS_CTRL_CR0_SHADOW, CR0_PE | CR0_PG | CR0_ET);
        m.set_field(VMCS_GUEST_CR4, CR4_PAE | CR4_VMXE);
        m.set_field(VMCS_GUEST_CR3, 0x1000);
        m.set_field(VMCS_GUEST_IA32_EFER, EFER_LME | EFER_LMA);
        m.set_field(VMCS_GUEST_CS_AR, 0xa09b);
    }

    /// Records an exit in the model as the hardware would leave it.
    fn exit(v: &mut VmxVcpu<VmcsModel>, reason: u32, qualification: u64, insn_len: u64) {
        let m = v.vmcs_mut();
        m.set_field(VMCS_RO_EXIT_REASON, reason.into());
        m.set_field(VMCS_RO_EXIT_QUALIFIC, qualification);
        m.set_field(VMCS_RO_VMEXIT_INSTR_LEN, insn_len);
        m.set_field(VMCS_CTRL_VMENTRY_IRQ_INFO, 0);
    }

    fn rip(v: &VmxVcpu<VmcsModel>) -> u64 {
        v.vmcs().field(VMCS_GUEST_RIP)
    }

    fn set_rip(v: &mut VmxVcpu<VmcsModel>, rip: u64) {
        v.vmcs_mut().set_field(VMCS_GUEST_RIP, rip);
    }

    fn reg(v: &VmxVcpu<VmcsModel>, r: hv_x86_reg_t) -> u64 {
        v.vmcs().reg(r)
    }

    fn set_reg(v: &mut VmxVcpu<VmcsModel>, r: hv_x86_reg_t, value: u64) {
        v.vmcs_mut().set_reg(r, value);
    }

    fn entry_event(v: &VmxVcpu<VmcsModel>) -> u64 {
        v.vmcs().field(VMCS_CTRL_VMENTRY_IRQ_INFO)
    }

    const GP_EVENT: u64 = (IRQ_INFO_VALID | IRQ_INFO_HARD_EXC | IRQ_INFO_ERROR_VALID | 13) as u64;

    fn io_qual(port: u16, size: u64, is_in: bool) -> u64 {
        (u64::from(port) << 16) | (size - 1) | if is_in { 1 << 3 } else { 0 }
    }

    #[test]
    fn in_al_dx_merges_the_byte_into_rax_and_advances_rip() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        set_rip(&mut v, 0x100);
        set_reg(&mut v, HV_X86_RAX, 0x1122_3344_5566_7788);
        exit(&mut v, VMX_REASON_IO, io_qual(0x3fd, 1, true), 1);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::IoIn { port, size, data }) => {
                assert_eq!((port, size, data.len()), (0x3fd, 1, 1));
                data[0] = 0x60;
            }
            other => panic!("expected IoIn, got {other:?}"),
        }
        assert_eq!(rip(&v), 0x100, "RIP moves only once the VMM answered");
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(reg(&v, HV_X86_RAX), 0x1122_3344_5566_7760);
        assert_eq!(rip(&v), 0x101);
    }

    #[test]
    fn in_eax_zero_extends() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        set_reg(&mut v, HV_X86_RAX, !0);
        exit(&mut v, VMX_REASON_IO, io_qual(0xcfc, 4, true), 1);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::IoIn { data, .. }) => data.copy_from_slice(&[1, 2, 3, 4]),
            other => panic!("expected IoIn, got {other:?}"),
        }
        v.prepare_entry(&ram).unwrap();
        assert_eq!(reg(&v, HV_X86_RAX), 0x0403_0201);
    }

    #[test]
    fn out_dx_al_sends_the_low_byte() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        set_rip(&mut v, 0x200);
        set_reg(&mut v, HV_X86_RAX, 0xabcd_0041);
        exit(&mut v, VMX_REASON_IO, io_qual(0x3f8, 1, false), 1);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::IoOut { port, size, data }) => {
                assert_eq!((port, size, data), (0x3f8, 1, &[0x41][..]))
            }
            other => panic!("expected IoOut, got {other:?}"),
        }
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(rip(&v), 0x201);
        assert_eq!(reg(&v, HV_X86_RAX), 0xabcd_0041);
    }

    #[test]
    fn out_imm8_eax_sends_four_bytes() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        set_rip(&mut v, 0x300);
        set_reg(&mut v, HV_X86_RAX, 0xdead_beef);
        // `out 0x80, eax`: E7 80, immediate-operand bit set.
        exit(&mut v, VMX_REASON_IO, io_qual(0x80, 4, false) | 1 << 6, 2);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::IoOut { port, size, data }) => {
                assert_eq!((port, size), (0x80, 4));
                assert_eq!(data, &0xdead_beef_u32.to_le_bytes());
            }
            other => panic!("expected IoOut, got {other:?}"),
        }
        v.prepare_entry(&ram).unwrap();
        assert_eq!(rip(&v), 0x302);
    }

    #[test]
    fn rep_outsb_sends_one_byte_per_exit_and_advances_rip_at_the_end() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        protected32(&mut v);
        ram.put(0x5000, b"abc");
        set_rip(&mut v, 0x400);
        set_reg(&mut v, HV_X86_RSI, 0x5000);
        set_reg(&mut v, HV_X86_RCX, 3);
        // 32-bit addressing, DS segment.
        v.vmcs_mut()
            .set_field(VMCS_RO_VMX_INSTR_INFO, (1 << 7) | (3 << 15));
        let qual = io_qual(0x3f8, 1, false) | 1 << 4 | 1 << 5;
        for (i, expected) in b"abc".iter().enumerate() {
            exit(&mut v, VMX_REASON_IO, qual, 2);
            match v.handle_exit(&ram).unwrap() {
                Some(VmExit::IoOut { port, size, data }) => {
                    assert_eq!((port, size, data), (0x3f8, 1, &[*expected][..]))
                }
                other => panic!("expected IoOut, got {other:?}"),
            }
            assert!(v.prepare_entry(&ram).unwrap().is_none());
            let i = i as u64;
            assert_eq!(reg(&v, HV_X86_RCX), 2 - i);
            assert_eq!(reg(&v, HV_X86_RSI), 0x5001 + i);
            let expected_rip = if i == 2 { 0x402 } else { 0x400 };
            assert_eq!(rip(&v), expected_rip, "after element {i}");
        }
    }

    #[test]
    fn rep_insb_writes_guest_ram_through_es_rdi() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        protected32(&mut v);
        set_reg(&mut v, HV_X86_RDI, 0x6000);
        set_reg(&mut v, HV_X86_RCX, 1);
        v.vmcs_mut().set_field(VMCS_RO_VMX_INSTR_INFO, 1 << 7);
        exit(
            &mut v,
            VMX_REASON_IO,
            io_qual(0x60, 1, true) | 1 << 4 | 1 << 5,
            2,
        );
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::IoIn { data, .. }) => data[0] = 0x5a,
            other => panic!("expected IoIn, got {other:?}"),
        }
        v.prepare_entry(&ram).unwrap();
        let mut b = [0u8];
        assert!(ram.read(0x6000, &mut b));
        assert_eq!(b[0], 0x5a);
        assert_eq!(reg(&v, HV_X86_RDI), 0x6001);
        assert_eq!(rip(&v), 2);
    }

    #[test]
    fn mmio_write_to_lapic_eoi_in_long_mode() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        long_mode(&mut v, &ram);
        ram.put(0x3000, &[0x89, 0x08]); // mov [rax], ecx
        set_rip(&mut v, 0x3000);
        set_reg(&mut v, HV_X86_RAX, 0xfee0_00b0);
        set_reg(&mut v, HV_X86_RCX, 0);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0xfee0_00b0);
        exit(&mut v, VMX_REASON_EPT_VIOLATION, 2, 0);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MmioWrite { addr, data }) => {
                assert_eq!((addr, data), (0xfee0_00b0, &[0u8; 4][..]))
            }
            other => panic!("expected MmioWrite, got {other:?}"),
        }
        assert_eq!(rip(&v), 0x3002);
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(rip(&v), 0x3002);
    }

    #[test]
    fn mmio_read_of_the_ioapic_window_is_replayed_with_the_value() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        protected32(&mut v);
        ram.put(0x3000, &[0x8b, 0x03]); // mov eax, [rbx]
        set_rip(&mut v, 0x3000);
        set_reg(&mut v, HV_X86_RAX, 0xffff_ffff);
        set_reg(&mut v, HV_X86_RBX, 0xfec0_0010);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0xfec0_0010);
        exit(&mut v, VMX_REASON_EPT_VIOLATION, 1, 0);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MmioRead { addr, data }) => {
                assert_eq!((addr, data.len()), (0xfec0_0010, 4));
                data.copy_from_slice(&0x0017_0011_u32.to_le_bytes());
            }
            other => panic!("expected MmioRead, got {other:?}"),
        }
        assert_eq!(
            reg(&v, HV_X86_RAX),
            0xffff_ffff,
            "no effect before the value"
        );
        assert_eq!(rip(&v), 0x3000);
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(reg(&v, HV_X86_RAX), 0x0017_0011);
        assert_eq!(rip(&v), 0x3002);
    }

    #[test]
    fn mmio_read_modify_write_returns_the_write_from_prepare_entry() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        protected32(&mut v);
        ram.put(0x3000, &[0x09, 0x08]); // or [eax], ecx
        set_rip(&mut v, 0x3000);
        set_reg(&mut v, HV_X86_RAX, 0xfec0_0000);
        set_reg(&mut v, HV_X86_RCX, 0x0100);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0xfec0_0000);
        exit(&mut v, VMX_REASON_EPT_VIOLATION, 3, 0);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MmioRead { data, .. }) => data.copy_from_slice(&[1, 0, 0, 0]),
            other => panic!("expected MmioRead, got {other:?}"),
        }
        match v.prepare_entry(&ram).unwrap() {
            Some(VmExit::MmioWrite { addr, data }) => {
                assert_eq!((addr, data), (0xfec0_0000, &[1, 1, 0, 0][..]))
            }
            other => panic!("expected MmioWrite, got {other:?}"),
        }
        assert_eq!(rip(&v), 0x3002);
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(rip(&v), 0x3002);
    }

    #[test]
    fn unsupported_mmio_instruction_is_an_internal_error_naming_it() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        protected32(&mut v);
        ram.put(0x3000, &[0x0f, 0xa2]); // cpuid: not an MMIO instruction
        set_rip(&mut v, 0x3000);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0xfec0_0000);
        exit(&mut v, VMX_REASON_EPT_VIOLATION, 1, 0);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::InternalError {
                suberror: INTERNAL_ERROR_EMULATION
            })
        ));
        assert!(matches!(
            v.last_emulation_error(),
            Some(EmulateError::Unsupported {
                mnemonic: iced_x86::Mnemonic::Cpuid
            })
        ));
        assert_eq!(rip(&v), 0x3000);
    }

    fn cpuid_table() -> Vec<CpuidEntry> {
        vec![
            CpuidEntry {
                function: 0,
                eax: 0xd,
                ebx: 0x756e_6547,
                ecx: 0x6c65_746e,
                edx: 0x4965_6e69,
                ..Default::default()
            },
            CpuidEntry {
                function: 1,
                eax: 0x306a9,
                ebx: 0x0001_0800,
                ecx: 0x0400_0000 | 1 << 27 | 1 << 21 | 1 << 5 | 1 << 3 | 1,
                edx: 0x0789_fbff,
                ..Default::default()
            },
        ]
    }

    fn cpuid(v: &mut VmxVcpu<VmcsModel>, leaf: u32) -> [u64; 4] {
        let ram = Ram::new(0x1000);
        set_reg(v, HV_X86_RAX, leaf.into());
        set_reg(v, HV_X86_RCX, 0);
        exit(v, VMX_REASON_CPUID, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        [HV_X86_RAX, HV_X86_RBX, HV_X86_RCX, HV_X86_RDX].map(|r| reg(v, r))
    }

    #[test]
    fn cpuid_leaf_0_comes_from_the_table() {
        let mut v = vcpu_with(VmxConfig {
            cpuid: cpuid_table(),
            ..config()
        });
        set_rip(&mut v, 0x10);
        assert_eq!(
            cpuid(&mut v, 0),
            [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]
        );
        assert_eq!(rip(&v), 0x12);
    }

    #[test]
    fn cpuid_leaf_1_has_the_apic_id_and_osxsave_from_cr4() {
        let mut v = vcpu_with(VmxConfig {
            vcpu_id: 3,
            cpuid: cpuid_table(),
            ..config()
        });
        let [eax, ebx, ecx, edx] = cpuid(&mut v, 1);
        assert_eq!((eax, edx), (0x306a9, 0x0789_fbff));
        assert_eq!(ebx, 0x0301_0800);
        assert_eq!(ecx & 1 << 27, 0, "OSXSAVE clear while CR4.OSXSAVE is clear");
        assert_eq!(ecx, 0x0400_0001, "no MONITOR, VMX or x2APIC");
        v.vmcs_mut()
            .set_field(VMCS_GUEST_CR4, CR4_OSXSAVE | CR4_VMXE);
        let [_, _, ecx, _] = cpuid(&mut v, 1);
        assert_ne!(ecx & 1 << 27, 0);
        assert_eq!(cpuid(&mut v, 0x4000_0000), [0; 4], "unknown leaves read 0");
    }

    fn rdmsr(v: &mut VmxVcpu<VmcsModel>, index: u32) {
        set_reg(v, HV_X86_RCX, index.into());
        exit(v, VMX_REASON_RDMSR, 0, 2);
    }

    #[test]
    fn unknown_msr_with_w_goes_to_the_vmm_and_reads_0() {
        let (mut v, ram) = (
            vcpu_with(VmxConfig {
                ignore_unknown_msrs: true,
                ..config()
            }),
            Ram::new(0x1000),
        );
        set_rip(&mut v, 0x40);
        set_reg(&mut v, HV_X86_RAX, 0x55);
        set_reg(&mut v, HV_X86_RDX, 0x66);
        rdmsr(&mut v, 0x1234);
        match v.handle_exit(&ram).unwrap() {
            // Answered as src/vmm/vcpu.rs does with -w.
            Some(VmExit::MsrRead {
                index,
                value,
                fault,
            }) => {
                assert_eq!(index, 0x1234);
                *value = 0;
                assert_eq!(*fault, 0);
            }
            other => panic!("expected MsrRead, got {other:?}"),
        }
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!((reg(&v, HV_X86_RAX), reg(&v, HV_X86_RDX)), (0, 0));
        assert_eq!(rip(&v), 0x42);
        assert_eq!(entry_event(&v), 0, "no fault injected");
    }

    #[test]
    fn unknown_msr_write_with_w_is_ignored() {
        let (mut v, ram) = (
            vcpu_with(VmxConfig {
                ignore_unknown_msrs: true,
                ..config()
            }),
            Ram::new(0x1000),
        );
        set_reg(&mut v, HV_X86_RCX, 0x1234);
        set_reg(&mut v, HV_X86_RDX, 1);
        set_reg(&mut v, HV_X86_RAX, 2);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MsrWrite { index, value, .. }) => {
                assert_eq!((index, value), (0x1234, 0x1_0000_0002))
            }
            other => panic!("expected MsrWrite, got {other:?}"),
        }
        v.prepare_entry(&ram).unwrap();
        assert_eq!(rip(&v), 2);
        assert_eq!(entry_event(&v), 0);
    }

    #[test]
    fn unknown_msr_without_w_injects_gp() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        set_rip(&mut v, 0x40);
        rdmsr(&mut v, 0x1234);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert!(!v.ready_for_interrupt(), "#GP queued first");
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(entry_event(&v), GP_EVENT);
        assert_eq!(v.vmcs().writes_to(VMCS_CTRL_VMENTRY_EXC_ERROR), vec![0]);
        assert_eq!(rip(&v), 0x40, "a faulting RDMSR does not complete");
    }

    #[test]
    fn vmm_fault_on_unknown_msr_injects_gp() {
        let (mut v, ram) = (
            vcpu_with(VmxConfig {
                ignore_unknown_msrs: true,
                ..config()
            }),
            Ram::new(0x1000),
        );
        rdmsr(&mut v, 0x1234);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MsrRead { fault, .. }) => *fault = 1,
            other => panic!("expected MsrRead, got {other:?}"),
        }
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), GP_EVENT);
        assert_eq!(rip(&v), 0);
    }

    #[test]
    fn known_msrs_are_handled_in_the_layer() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        rdmsr(&mut v, MSR_APIC_BASE);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(reg(&v, HV_X86_RAX), 0xfee0_0900, "enabled, BSP");
        rdmsr(&mut v, MSR_PAT);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!((reg(&v, HV_X86_RDX) << 32) | reg(&v, HV_X86_RAX), PAT_RESET);
        rdmsr(&mut v, MSR_MTRR_CAP);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(reg(&v, HV_X86_RAX), 0);
        assert_eq!(rip(&v), 6);
        // An invalid PAT memory type faults.
        set_reg(&mut v, HV_X86_RCX, MSR_PAT.into());
        set_reg(&mut v, HV_X86_RAX, 2);
        set_reg(&mut v, HV_X86_RDX, 0);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), GP_EVENT);
    }

    fn mov_to_cr(v: &mut VmxVcpu<VmcsModel>, cr: u64, gpr: u64, value: u64) {
        set_reg(v, GPR_BY_INDEX[gpr as usize], value);
        exit(v, VMX_REASON_MOV_CR, cr | gpr << 8, 3);
        assert!(v.handle_exit(&Ram::new(0x1000)).unwrap().is_none());
    }

    #[test]
    fn efer_lme_then_cr0_pg_enters_long_mode() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        set_reg(&mut v, HV_X86_RCX, MSR_EFER.into());
        set_reg(&mut v, HV_X86_RAX, EFER_LME);
        set_reg(&mut v, HV_X86_RDX, 0);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(v.vmcs().field(VMCS_GUEST_IA32_EFER), EFER_LME);
        mov_to_cr(&mut v, 4, 0, CR4_PAE);
        assert_eq!(
            v.vmcs().field(VMCS_GUEST_CR4),
            CR4_PAE | CR4_VMXE,
            "VMXE forced"
        );
        assert_eq!(v.vmcs().field(VMCS_CTRL_CR4_SHADOW), CR4_PAE);
        // mov cr0, rbx with PG|PE (and CD set, which the VMCS value drops).
        mov_to_cr(&mut v, 0, 3, CR0_PG | CR0_PE | CR0_CD);
        assert_eq!(
            v.vmcs().field(VMCS_GUEST_CR0),
            CR0_PG | CR0_PE | CR0_NE | CR0_ET
        );
        assert_eq!(
            v.vmcs().field(VMCS_CTRL_CR0_SHADOW),
            CR0_PG | CR0_PE | CR0_CD
        );
        assert_eq!(v.vmcs().field(VMCS_GUEST_IA32_EFER), EFER_LME | EFER_LMA);
        assert_ne!(
            v.vmcs().field(VMCS_CTRL_VMENTRY_CONTROLS) & u64::from(VMENTRY_GUEST_IA32E),
            0
        );
        assert_eq!(v.sregs().unwrap().cr0, CR0_PG | CR0_PE | CR0_CD);
        assert_eq!(rip(&v), 8);
        // Paging off leaves long mode.
        mov_to_cr(&mut v, 0, 3, CR0_PE);
        assert_eq!(v.vmcs().field(VMCS_GUEST_IA32_EFER), EFER_LME);
        assert_eq!(
            v.vmcs().field(VMCS_CTRL_VMENTRY_CONTROLS) & u64::from(VMENTRY_GUEST_IA32E),
            0
        );
    }

    #[test]
    fn interrupt_window_is_requested_reported_and_cleared() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        let window = u64::from(CPU_BASED_IRQ_WND);
        assert_eq!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
        v.request_interrupt_window(true);
        v.prepare_entry(&ram).unwrap();
        assert_ne!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
        exit(&mut v, VMX_REASON_IRQ_WND, 0, 0);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::IrqWindowOpen)
        ));
        assert_eq!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
        v.prepare_entry(&ram).unwrap();
        assert_eq!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0, "stays off");
    }

    #[test]
    fn nmi_waits_for_the_nmi_window_while_blocked() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        v.vmcs_mut()
            .set_field(VMCS_GUEST_IGNORE_IRQ, VMCS_INTERRUPTIBILITY_NMI_BLOCKING);
        v.inject_nmi().unwrap();
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), 0);
        let window = u64::from(CPU_BASED_VIRTUAL_NMI_WND);
        assert_ne!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
        v.vmcs_mut().set_field(VMCS_GUEST_IGNORE_IRQ, 0);
        exit(&mut v, VMX_REASON_VIRTUAL_NMI_WND, 0, 0);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(
            entry_event(&v),
            u64::from(IRQ_INFO_VALID | IRQ_INFO_NMI | 2)
        );
        assert_eq!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
    }

    #[test]
    fn hlt_then_pending_interrupt_is_injected_past_the_hlt() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        set_rip(&mut v, 0x500);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_RFLAGS, RFLAGS_IF | RFLAGS_RESERVED);
        exit(&mut v, VMX_REASON_HLT, 0, 1);
        assert!(matches!(v.handle_exit(&ram).unwrap(), Some(VmExit::Hlt)));
        assert_eq!(rip(&v), 0x501);
        assert_eq!(v.run_state(), RunState::Halted);
        assert!(v.interrupts_enabled());
        assert!(v.ready_for_interrupt());
        v.inject_interrupt(0x30).unwrap();
        assert!(!v.ready_for_interrupt(), "one event at a time");
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(
            entry_event(&v),
            u64::from(IRQ_INFO_VALID | IRQ_INFO_EXT_IRQ | 0x30)
        );
        assert_eq!(v.run_state(), RunState::Running);
        assert_eq!(rip(&v), 0x501);
    }

    #[test]
    fn interrupt_shadow_and_if_gate_interrupts() {
        let mut v = vcpu();
        v.vmcs_mut().set_field(VMCS_GUEST_RFLAGS, RFLAGS_RESERVED);
        assert!(!v.ready_for_interrupt(), "IF clear");
        assert!(!v.interrupts_enabled());
        v.vmcs_mut()
            .set_field(VMCS_GUEST_RFLAGS, RFLAGS_IF | RFLAGS_RESERVED);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_IGNORE_IRQ, VMCS_INTERRUPTIBILITY_STI_BLOCKING);
        assert!(!v.ready_for_interrupt(), "STI shadow");
        v.vmcs_mut()
            .set_field(VMCS_GUEST_IGNORE_IRQ, VMCS_INTERRUPTIBILITY_MOVSS_BLOCKING);
        assert!(!v.ready_for_interrupt(), "MOV SS shadow");
        v.vmcs_mut().set_field(VMCS_GUEST_IGNORE_IRQ, 0);
        assert!(v.ready_for_interrupt());
    }

    #[test]
    fn triple_fault_is_shutdown() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        exit(&mut v, VMX_REASON_TRIPLE_FAULT, 0, 0);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::Shutdown)
        ));
    }

    #[test]
    fn task_switch_and_unknown_exits_are_other_and_entry_failure_is_fail_entry() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        exit(&mut v, VMX_REASON_TASK, 0, 0);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::Other { reason: 9 })
        ));
        exit(&mut v, VMX_REASON_EPT_MISCONFIG, 0, 0);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::Other { reason: 49 })
        ));
        let failed = VMX_REASON_ENTRY_FAILED | u64::from(VMX_REASON_VMENTRY_GUEST);
        v.vmcs_mut().set_field(VMCS_RO_EXIT_REASON, failed);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::FailEntry { reason }) if reason == failed
        ));
    }

    #[test]
    fn pause_and_host_interrupts_reenter() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        exit(&mut v, VMX_REASON_PAUSE, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(rip(&v), 2);
        exit(&mut v, VMX_REASON_IRQ, 0, 0);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(rip(&v), 2);
    }

    #[test]
    fn vmcall_and_mwait_raise_ud() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        for reason in [VMX_REASON_VMCALL, VMX_REASON_MWAIT] {
            exit(&mut v, reason, 0, 3);
            assert!(v.handle_exit(&ram).unwrap().is_none());
            v.prepare_entry(&ram).unwrap();
            assert_eq!(
                entry_event(&v),
                u64::from(IRQ_INFO_VALID | IRQ_INFO_HARD_EXC | 6)
            );
            assert_eq!(rip(&v), 0);
        }
    }

    #[test]
    fn event_lost_in_delivery_is_injected_again() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        let info = IRQ_INFO_VALID | IRQ_INFO_EXT_IRQ | 0x41;
        v.vmcs_mut().set_field(VMCS_RO_IDT_VECTOR_INFO, info.into());
        exit(&mut v, VMX_REASON_IRQ, 0, 0);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), u64::from(info));
    }

    #[test]
    fn reset_state_of_the_bsp_and_an_ap() {
        let v = VmxVcpu::new(VmcsModel::new(), config()).unwrap();
        assert_eq!(v.run_state(), RunState::Running);
        let s = v.sregs().unwrap();
        assert_eq!((s.cs.selector, s.cs.base), (0xf000, 0xffff_0000));
        assert_eq!(rip(&v), 0xfff0);
        assert_eq!(s.cr0, CR0_RESET);
        assert_eq!(v.vmcs().field(VMCS_GUEST_CR0), CR0_ET | CR0_NE);
        assert_eq!(v.vmcs().field(VMCS_GUEST_CR4), CR4_VMXE);
        assert_eq!(s.cr4, 0);
        assert_eq!(v.regs().unwrap().rflags, RFLAGS_RESERVED);
        assert_eq!(s.apic_base & APIC_BASE_BSP, APIC_BASE_BSP);

        let mut ap = vcpu_with(VmxConfig {
            vcpu_id: 1,
            ..config()
        });
        assert_eq!(ap.run_state(), RunState::WaitingForSipi);
        assert_eq!(ap.sregs().unwrap().apic_base & APIC_BASE_BSP, 0);
        let mut sregs = ap.sregs().unwrap();
        sregs.cs.selector = 0x9900;
        sregs.cs.base = 0x99000;
        ap.set_sregs(&sregs).unwrap();
        assert_eq!(ap.run_state(), RunState::Running);
        assert_eq!(ap.sregs().unwrap().cs.base, 0x99000);
    }

    #[test]
    fn a_machine_reset_returns_to_the_power_on_state() {
        let fresh = VmxVcpu::new(VmcsModel::new(), config()).unwrap();
        let mut v = VmxVcpu::new(VmcsModel::new(), config()).unwrap();
        let mut sregs = v.sregs().unwrap();
        sregs.cs = crate::arch::x86_64::regs::flat_segment(0x10, true);
        sregs.cr0 |= 1;
        v.set_sregs(&sregs).unwrap();
        v.set_regs(&StandardRegisters {
            rip: 0x10_0000,
            rax: 7,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        })
        .unwrap();
        v.request_interrupt_window(true);
        v.inject_nmi().unwrap();
        v.power_on_reset().unwrap();
        assert_eq!(v.sregs().unwrap(), fresh.sregs().unwrap());
        assert_eq!(v.regs().unwrap(), fresh.regs().unwrap());
        assert!(!v.nmi && !v.irq_window_wanted);
        assert_eq!(v.run_state(), RunState::Running);

        let mut ap = vcpu_with(VmxConfig {
            vcpu_id: 1,
            ..config()
        });
        let mut sregs = ap.sregs().unwrap();
        sregs.cs.selector = 0x9900;
        sregs.cs.base = 0x99000;
        ap.set_sregs(&sregs).unwrap();
        assert_eq!(ap.run_state(), RunState::Running);
        ap.power_on_reset().unwrap();
        assert_eq!(
            ap.run_state(),
            RunState::WaitingForSipi,
            "the AP waits for SIPI again"
        );
        assert_eq!(ap.sregs().unwrap().cs.base, 0xffff_0000);
    }

    #[test]
    fn regs_round_trip() {
        let mut v = vcpu();
        let regs = StandardRegisters {
            rax: 1,
            rbx: 2,
            rcx: 3,
            rdx: 4,
            rsi: 5,
            rdi: 6,
            rsp: 7,
            rbp: 8,
            r8: 9,
            r15: 16,
            rip: 0x1000,
            rflags: RFLAGS_RESERVED | RFLAGS_IF,
            ..Default::default()
        };
        v.set_regs(&regs).unwrap();
        assert_eq!(v.regs().unwrap(), regs);
        assert_eq!(rip(&v), 0x1000);
    }

    #[test]
    fn cr8_is_the_lapic_tpr() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        // mov cr8, rdx
        set_reg(&mut v, HV_X86_RDX, 0x9);
        exit(&mut v, VMX_REASON_MOV_CR, 8 | 2 << 8, 4);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MmioWrite { addr, data }) => {
                assert_eq!((addr, data), (0xfee0_0080, &[0x90, 0, 0, 0][..]))
            }
            other => panic!("expected MmioWrite, got {other:?}"),
        }
        assert_eq!(rip(&v), 4);
        assert!(v.prepare_entry(&ram).unwrap().is_none());
        assert_eq!(rip(&v), 4);
        // mov rsi, cr8
        exit(&mut v, VMX_REASON_MOV_CR, 8 | 1 << 4 | 6 << 8, 4);
        match v.handle_exit(&ram).unwrap() {
            Some(VmExit::MmioRead { addr, data }) => {
                assert_eq!(addr, 0xfee0_0080);
                data.copy_from_slice(&[0x50, 0, 0, 0]);
            }
            other => panic!("expected MmioRead, got {other:?}"),
        }
        assert_eq!(rip(&v), 4);
        v.prepare_entry(&ram).unwrap();
        assert_eq!(reg(&v, HV_X86_RSI), 5);
        assert_eq!(rip(&v), 8);
        assert_eq!(v.sregs().unwrap().cr8, 5);
    }

    #[test]
    fn xsetbv_sets_xcr0_or_faults() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        v.vmcs_mut()
            .set_field(VMCS_GUEST_CR4, CR4_OSXSAVE | CR4_VMXE);
        set_reg(&mut v, HV_X86_RCX, 0);
        set_reg(&mut v, HV_X86_RAX, 0x7);
        set_reg(&mut v, HV_X86_RDX, 0);
        exit(&mut v, VMX_REASON_XSETBV, 0, 3);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(reg(&v, HV_X86_XCR0), 7);
        assert_eq!(rip(&v), 3);
        // x87 state cannot be disabled.
        set_reg(&mut v, HV_X86_RAX, 0x6);
        exit(&mut v, VMX_REASON_XSETBV, 0, 3);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), GP_EVENT);
        assert_eq!((reg(&v, HV_X86_XCR0), rip(&v)), (7, 3));
    }

    #[test]
    fn x2apic_enable_faults() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        set_reg(&mut v, HV_X86_RCX, MSR_APIC_BASE.into());
        set_reg(&mut v, HV_X86_RAX, 0xfee0_0c00);
        set_reg(&mut v, HV_X86_RDX, 0);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), GP_EVENT);
        assert_eq!(v.sregs().unwrap().apic_base, 0xfee0_0900);
    }

    #[test]
    fn interrupt_behind_an_exception_waits_for_if_through_a_silent_window() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        v.vmcs_mut()
            .set_field(VMCS_GUEST_RFLAGS, RFLAGS_IF | RFLAGS_RESERVED);
        v.inject_interrupt(0x31).unwrap();
        v.inject_exception(EXC_GP, Some(0));
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), GP_EVENT);
        let window = u64::from(CPU_BASED_IRQ_WND);
        assert_ne!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
        // The #GP handler runs with IF clear: nothing is injected.
        v.vmcs_mut().set_field(VMCS_GUEST_RFLAGS, RFLAGS_RESERVED);
        exit(&mut v, VMX_REASON_IO, io_qual(0x80, 1, false), 1);
        assert!(v.handle_exit(&ram).unwrap().is_some());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), 0);
        // IF set again: the window exit is ours, not the VMM's, and the interrupt goes in.
        v.vmcs_mut()
            .set_field(VMCS_GUEST_RFLAGS, RFLAGS_IF | RFLAGS_RESERVED);
        exit(&mut v, VMX_REASON_IRQ_WND, 0, 0);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), u64::from(IRQ_INFO_VALID | 0x31));
        assert_eq!(v.vmcs().field(VMCS_CTRL_CPU_BASED) & window, 0);
    }

    #[test]
    fn software_interrupt_lost_in_delivery_keeps_its_length() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        let info = IRQ_INFO_VALID | IRQ_INFO_SOFT_IRQ | 0x80;
        v.vmcs_mut().set_field(VMCS_RO_IDT_VECTOR_INFO, info.into());
        exit(&mut v, VMX_REASON_IRQ, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        assert_eq!(entry_event(&v), u64::from(info));
        assert_eq!(v.vmcs().writes_to(VMCS_CTRL_VMENTRY_INSTR_LEN), vec![2]);
    }

    #[test]
    fn ept_violation_in_an_unblocking_iret_blocks_nmis_again() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        protected32(&mut v);
        ram.put(0x3000, &[0x89, 0x08]);
        set_rip(&mut v, 0x3000);
        set_reg(&mut v, HV_X86_RAX, 0xfee0_00b0);
        v.vmcs_mut()
            .set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0xfee0_00b0);
        exit(&mut v, VMX_REASON_EPT_VIOLATION, 2 | 1 << 12, 0);
        assert!(v.handle_exit(&ram).unwrap().is_some());
        assert_ne!(
            v.vmcs().field(VMCS_GUEST_IGNORE_IRQ) & VMCS_INTERRUPTIBILITY_NMI_BLOCKING,
            0
        );
    }

    #[test]
    fn sipi_exit_starts_at_the_vector() {
        let (mut v, ram) = (
            vcpu_with(VmxConfig {
                vcpu_id: 2,
                ..config()
            }),
            Ram::new(0x1000),
        );
        exit(&mut v, VMX_REASON_INIT, 0, 0);
        assert!(matches!(v.handle_exit(&ram).unwrap(), Some(VmExit::Hlt)));
        assert_eq!(v.run_state(), RunState::WaitingForSipi);
        exit(&mut v, VMX_REASON_SIPI, 0x9a, 0);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        let s = v.sregs().unwrap();
        assert_eq!((s.cs.selector, s.cs.base, rip(&v)), (0x9a00, 0x9a000, 0));
        assert_eq!(v.run_state(), RunState::Running);
    }

    #[test]
    fn string_io_to_an_unmapped_page_raises_a_page_fault_without_an_exit() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        long_mode(&mut v, &ram);
        ram.put_u64(0x2000, 0); // nothing mapped in the first GiB
        set_rip(&mut v, 0x10);
        set_reg(&mut v, HV_X86_RDI, 0x1234);
        v.vmcs_mut().set_field(VMCS_RO_VMX_INSTR_INFO, 2 << 7);
        exit(&mut v, VMX_REASON_IO, io_qual(0x60, 1, true) | 1 << 4, 1);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.prepare_entry(&ram).unwrap();
        let pf = IRQ_INFO_VALID | IRQ_INFO_HARD_EXC | IRQ_INFO_ERROR_VALID | 14;
        assert_eq!(entry_event(&v), u64::from(pf));
        assert_eq!(v.vmcs().writes_to(VMCS_CTRL_VMENTRY_EXC_ERROR), vec![2]);
        assert_eq!(reg(&v, HV_X86_CR2), 0x1234);
        assert_eq!((rip(&v), reg(&v, HV_X86_RDI)), (0x10, 0x1234));
    }

    #[test]
    fn tsc_msr_moves_the_tsc_offset() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        set_reg(&mut v, HV_X86_RCX, MSR_TSC.into());
        set_reg(&mut v, HV_X86_RAX, 0);
        set_reg(&mut v, HV_X86_RDX, 0);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(v.vmcs().writes_to(VMCS_CTRL_TSC_OFFSET).len(), 1);
        rdmsr(&mut v, MSR_TSC);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        let tsc = (reg(&v, HV_X86_RDX) << 32) | reg(&v, HV_X86_RAX);
        // Counted from 0 a moment ago: far below the host's own count.
        assert!(
            tsc < host_tsc() / 2 || cfg!(not(target_arch = "x86_64")),
            "{tsc}"
        );
        assert_eq!(rip(&v), 4);
    }

    #[test]
    fn set_msr_takes_the_layers_msrs_only() {
        let mut v = vcpu();
        assert_eq!(
            v.set_msr(MSR_PAT, 0x0606_0606_0606_0606).unwrap(),
            Some(true)
        );
        assert_eq!(v.vmcs().field(VMCS_GUEST_IA32_PAT), 0x0606_0606_0606_0606);
        assert_eq!(v.set_msr(MSR_MTRR_CAP, 0).unwrap(), Some(false));
        assert_eq!(v.set_msr(MSR_LSTAR, 0).unwrap(), None, "native MSR");
        assert_eq!(v.set_msr(0x1234, 0).unwrap(), None);
    }

    #[test]
    fn misc_enable_changes_other_than_xd_go_to_the_vmm() {
        let (mut v, ram) = (
            vcpu_with(VmxConfig {
                ignore_unknown_msrs: true,
                ..config()
            }),
            Ram::new(0x1000),
        );
        set_reg(&mut v, HV_X86_RCX, MSR_MISC_ENABLE.into());
        set_reg(&mut v, HV_X86_RDX, 0);
        set_reg(&mut v, HV_X86_RAX, MISC_ENABLE);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        assert!(
            v.handle_exit(&ram).unwrap().is_none(),
            "unchanged: accepted"
        );
        set_reg(&mut v, HV_X86_RAX, MISC_ENABLE | 1 << 18);
        exit(&mut v, VMX_REASON_WRMSR, 0, 2);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::MsrWrite {
                index: MSR_MISC_ENABLE,
                ..
            })
        ));
    }

    #[test]
    fn host_nmi_reenters_and_other_exceptions_are_other() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        exit(&mut v, VMX_REASON_EXC_NMI, 0, 0);
        v.vmcs_mut().set_field(
            VMCS_RO_VMEXIT_IRQ_INFO,
            u64::from(IRQ_INFO_VALID | IRQ_INFO_NMI | 2),
        );
        assert!(v.handle_exit(&ram).unwrap().is_none());
        v.vmcs_mut().set_field(
            VMCS_RO_VMEXIT_IRQ_INFO,
            u64::from(IRQ_INFO_VALID | IRQ_INFO_HARD_EXC | 18),
        );
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::Other { reason: 0 })
        ));
    }

    #[test]
    fn ept_violation_on_ram_is_not_emulated() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        v.vmcs_mut().set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0x8000);
        exit(&mut v, VMX_REASON_EPT_VIOLATION, 1, 0);
        assert!(matches!(
            v.handle_exit(&ram).unwrap(),
            Some(VmExit::Other { reason: 48 })
        ));
    }

    #[test]
    fn clts_and_lmsw_edit_the_guest_cr0() {
        let (mut v, ram) = (vcpu(), Ram::new(0x1000));
        mov_to_cr(&mut v, 0, 0, CR0_PE | CR0_TS | CR0_ET);
        exit(&mut v, VMX_REASON_MOV_CR, 2 << 4, 2); // clts
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(v.sregs().unwrap().cr0, CR0_PE | CR0_ET);
        // lmsw with source 0b1010 (MP|TS, PE clear): PE stays set.
        exit(&mut v, VMX_REASON_MOV_CR, 3 << 4 | 0xa << 16, 3);
        assert!(v.handle_exit(&ram).unwrap().is_none());
        assert_eq!(v.sregs().unwrap().cr0, CR0_PE | CR0_ET | CR0_TS | 2);
        assert_eq!(rip(&v), 3 + 2 + 3);
    }

    #[test]
    fn legacy_and_pae_page_walks() {
        let ram = Ram::new(0x20000);
        let legacy = Paging {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        // PDE 0 -> page table at 0x2000, PTE 5 -> 0x9000; PDE 1 is a 4 MiB page at 0x800000.
        ram.put(0x1000, &(0x2000u32 | 1).to_le_bytes());
        ram.put(0x1004, &(0x80_0000u32 | 0x81).to_le_bytes());
        ram.put(0x2000 + 5 * 4, &(0x9000u32 | 1).to_le_bytes());
        assert_eq!(legacy.translate(&ram, 0x5abc), Some(0x9abc));
        assert_eq!(legacy.translate(&ram, 0x40_1234), Some(0x80_1234));
        assert_eq!(legacy.translate(&ram, 0x6000), None);
        let pae = Paging {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x3000,
            cr4: CR4_PAE,
            efer: 0,
        };
        // PDPTE 3 -> PD at 0x4000; PDE 0x1f7 is a 2 MiB page at 0xfee00000.
        ram.put_u64(0x3000 + 3 * 8, 0x4000 | 1);
        ram.put_u64(0x4000 + 0x1f7 * 8, 0xfee0_0000 | 0x83);
        assert_eq!(pae.translate(&ram, 0xfee0_00b0), Some(0xfee0_00b0));
        assert_eq!(pae.translate(&ram, 0x1000), None);
    }

    /// A VMCS whose RAX cannot be read, as a failing framework call.
    struct RaxFails(VmcsModel);

    impl Vmcs for RaxFails {
        fn read_field(&self, field: u32) -> Result<u64, HvError> {
            self.0.read_field(field)
        }
        fn write_field(&mut self, field: u32, value: u64) -> Result<(), HvError> {
            self.0.write_field(field, value)
        }
        fn read_reg(&self, reg: hv_x86_reg_t) -> Result<u64, HvError> {
            if reg == HV_X86_RAX {
                return Err(HvError::MissingCapability("RAX"));
            }
            self.0.read_reg(reg)
        }
        fn write_reg(&mut self, reg: hv_x86_reg_t, value: u64) -> Result<(), HvError> {
            self.0.write_reg(reg, value)
        }
        fn capability(&self, cap: hv_vmx_capability_t) -> Result<u64, HvError> {
            self.0.capability(cap)
        }
    }

    #[test]
    fn register_read_failure_during_emulation_is_an_error_not_a_guess() {
        let ram = Ram::new(0x10000);
        let mut v = VmxVcpu::new(RaxFails(VmcsModel::new()), config()).unwrap();
        let m = &mut v.vmcs_mut().0;
        m.set_field(VMCS_GUEST_CR0, CR0_PE | CR0_NE | CR0_ET);
        m.set_field(VMCS_GUEST_CS_AR, 0xc09b);
        m.set_field(VMCS_GUEST_CS_BASE, 0);
        m.set_field(VMCS_GUEST_RIP, 0x3000);
        m.set_field(VMCS_GUEST_PHYSICAL_ADDRESS, 0xfee0_00b0);
        m.set_field(VMCS_RO_EXIT_REASON, VMX_REASON_EPT_VIOLATION.into());
        ram.put(0x3000, &[0x89, 0x08]); // mov [rax], ecx
        assert!(v.handle_exit(&ram).is_err());
        assert_eq!(v.vmcs().0.field(VMCS_GUEST_RIP), 0x3000);
    }

    #[test]
    fn long_mode_page_walk_translates_4k_pages() {
        let (mut v, ram) = (vcpu(), Ram::new(0x10000));
        long_mode(&mut v, &ram);
        // Replace the first 1 GiB mapping with a 4 KiB page table chain: 0x40_0000 -> 0x7000.
        ram.put_u64(0x2000, 0x4000 | 3);
        ram.put_u64(0x4000 + 2 * 8, 0x5000 | 3);
        ram.put_u64(0x5000, 0x7000 | 3);
        assert_eq!(v.translate(&ram, 0x40_0123).unwrap(), Some(0x7123));
        assert_eq!(v.translate(&ram, 0x40_1000).unwrap(), None);
        assert_eq!(v.translate(&ram, 0xfee0_00b0).unwrap(), Some(0xfee0_00b0));
    }
}
