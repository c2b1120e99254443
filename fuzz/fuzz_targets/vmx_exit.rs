//! The VMX exit handler (`xhyve::hv::hvf::vmx::VmxVcpu`) over the in-memory `VmcsModel`: a run
//! of fuzzed exits (reason, qualification, instruction length, GPA, vectoring and instruction
//! information, guest registers and control registers), each `handle_exit` answered the way a
//! VMM would (I/O and MMIO read data, MSR values and faults from the input) and followed by
//! `prepare_entry`. Guest RAM is a 64 KiB Vec the input fills from address 0; the `GuestRam`
//! impl checks every access lies inside it and is no larger than a page.
//!
//! Layout: u16 LE RAM fill length, the RAM bytes, a config byte, then steps (see `step`).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use xhyve::hv::hvf::ffi::*;
use xhyve::hv::hvf::vmcs::VmcsModel;
use xhyve::hv::hvf::vmx::{GuestRam, VmxConfig, VmxVcpu};
use xhyve::hv::VmExit;

const RAM_SIZE: usize = 64 * 1024;
const MAX_STEPS: usize = 32;

struct VecRam(RefCell<Vec<u8>>);

impl VecRam {
    /// The slice range of an access, or None when it is not wholly inside the Vec.
    fn range(&self, gpa: u64, len: usize) -> Option<std::ops::Range<usize>> {
        assert!(len <= 4096, "guest RAM access of {len} bytes at {gpa:#x}");
        let start = usize::try_from(gpa).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.0.borrow().len()).then_some(start..end)
    }
}

impl GuestRam for VecRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.range(gpa, buf.len()) {
            Some(range) => {
                buf.copy_from_slice(&self.0.borrow()[range]);
                true
            }
            None => false,
        }
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> bool {
        match self.range(gpa, buf.len()) {
            Some(range) => {
                self.0.borrow_mut()[range].copy_from_slice(buf);
                true
            }
            None => false,
        }
    }
}

/// A little-endian reader that yields zeros once the input runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn uint(&mut self, bytes: usize) -> u64 {
        (0..bytes).fold(0, |acc, i| acc | u64::from(self.byte()) << (8 * i))
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            *byte = self.byte();
        }
    }
}

/// Exit reasons the handler treats specially, so most steps hit one.
const REASONS: [u32; 24] = [
    VMX_REASON_EXC_NMI,
    VMX_REASON_IRQ,
    VMX_REASON_TRIPLE_FAULT,
    VMX_REASON_INIT,
    VMX_REASON_SIPI,
    VMX_REASON_IRQ_WND,
    VMX_REASON_VIRTUAL_NMI_WND,
    VMX_REASON_TASK,
    VMX_REASON_CPUID,
    VMX_REASON_HLT,
    VMX_REASON_VMCALL,
    VMX_REASON_MOV_CR,
    VMX_REASON_IO,
    VMX_REASON_RDMSR,
    VMX_REASON_WRMSR,
    VMX_REASON_MWAIT,
    VMX_REASON_MONITOR,
    VMX_REASON_PAUSE,
    VMX_REASON_EPT_VIOLATION,
    VMX_REASON_EPT_VIOLATION,
    VMX_REASON_EPT_VIOLATION,
    VMX_REASON_XSETBV,
    VMX_REASON_INVVPID,
    VMX_REASON_VMFUNC,
];

/// Guest state a step may set: general registers through the register interface, the rest
/// straight into VMCS fields (the "hardware" side).
const REGS: [hv_x86_reg_t; 18] = [
    HV_X86_RIP,
    HV_X86_RFLAGS,
    HV_X86_RAX,
    HV_X86_RCX,
    HV_X86_RDX,
    HV_X86_RBX,
    HV_X86_RSI,
    HV_X86_RDI,
    HV_X86_RSP,
    HV_X86_RBP,
    HV_X86_R8,
    HV_X86_R9,
    HV_X86_R10,
    HV_X86_R11,
    HV_X86_R12,
    HV_X86_R13,
    HV_X86_R14,
    HV_X86_R15,
];
const FIELDS: [u32; 16] = [
    VMCS_GUEST_CR0,
    VMCS_GUEST_CR3,
    VMCS_GUEST_CR4,
    VMCS_CTRL_CR0_SHADOW,
    VMCS_CTRL_CR4_SHADOW,
    VMCS_GUEST_IA32_EFER,
    VMCS_GUEST_CS_AR,
    VMCS_GUEST_CS_BASE,
    VMCS_GUEST_SS_AR,
    VMCS_GUEST_DS_BASE,
    VMCS_GUEST_ES_BASE,
    VMCS_GUEST_IGNORE_IRQ,
    VMCS_GUEST_ACTIVITY_STATE,
    VMCS_RO_IO_RCX,
    VMCS_RO_IO_RSI,
    VMCS_RO_IO_RDI,
];

/// Answers an exit as a VMM would, with values from the input.
fn answer(exit: VmExit<'_>, input: &mut Input) {
    match exit {
        VmExit::IoIn { data, .. } | VmExit::MmioRead { data, .. } => input.fill(data),
        VmExit::MsrRead { value, fault, .. } => {
            *value = input.uint(8);
            *fault = input.byte() & 1;
        }
        VmExit::MsrWrite { fault, .. } => *fault = input.byte() & 1,
        _ => {}
    }
}

/// One exit: control byte (bit 0-4: reason index, bit 5: raw u16 reason instead, bit 6: entry
/// failed, bit 7: raw u64 GPA instead of a u16 one), qualification u64, instruction length,
/// GPA, IDT-vectoring info u32, exit interruption info u32, instruction info u32, guest linear
/// address u16, then a count byte (low 2 bits: register writes, bits 2-3: field writes, bits
/// 4-7: VMM actions) and those writes (index byte + u64 value) and actions.
fn step(vcpu: &mut VmxVcpu<VmcsModel>, ram: &VecRam, input: &mut Input) {
    let control = input.byte();
    let mut reason = if control & 0x20 != 0 {
        input.uint(2)
    } else {
        u64::from(REASONS[usize::from(control & 0x1f) % REASONS.len()])
    };
    if control & 0x40 != 0 {
        reason |= VMX_REASON_ENTRY_FAILED;
    }
    let qualification = input.uint(8);
    let insn_len = input.uint(1);
    let gpa = if control & 0x80 != 0 {
        input.uint(8)
    } else {
        input.uint(2) | (0x1_0000 * (input.uint(1) & 1))
    };
    let idt_vectoring = input.uint(4);
    let exit_irq_info = input.uint(4);
    let instr_info = input.uint(4);
    let linear = input.uint(2);
    let counts = input.byte();

    let model = vcpu.vmcs_mut();
    model.writes.clear();
    model.set_field(VMCS_RO_EXIT_REASON, reason);
    model.set_field(VMCS_RO_EXIT_QUALIFIC, qualification);
    model.set_field(VMCS_RO_VMEXIT_INSTR_LEN, insn_len);
    model.set_field(VMCS_GUEST_PHYSICAL_ADDRESS, gpa);
    model.set_field(VMCS_RO_IDT_VECTOR_INFO, idt_vectoring);
    model.set_field(VMCS_RO_VMEXIT_IRQ_INFO, exit_irq_info);
    model.set_field(VMCS_RO_VMX_INSTR_INFO, instr_info);
    model.set_field(VMCS_RO_GUEST_LIN_ADDR, linear);
    model.set_field(VMCS_CTRL_VMENTRY_IRQ_INFO, 0);
    for _ in 0..counts & 3 {
        let reg = REGS[usize::from(input.byte()) % REGS.len()];
        let value = input.uint(8);
        model.set_reg(reg, value);
    }
    for _ in 0..(counts >> 2) & 3 {
        let field = FIELDS[usize::from(input.byte()) % FIELDS.len()];
        let value = input.uint(8);
        model.set_field(field, value);
    }
    for _ in 0..counts >> 4 {
        let action = input.byte();
        let value = input.uint(8);
        // HvError from the model cannot happen; the VMM-facing calls are what is fuzzed.
        let _ = match action % 5 {
            0 => vcpu.inject_interrupt(value as u8),
            1 => vcpu.inject_nmi(),
            2 => {
                vcpu.request_interrupt_window(value & 1 != 0);
                Ok(())
            }
            3 => vcpu
                .set_msr(value as u32, value.rotate_left(17))
                .map(|_| ()),
            _ => {
                let _ = vcpu.ready_for_interrupt();
                let _ = vcpu.interrupts_enabled();
                Ok(())
            }
        };
    }

    if let Ok(Some(exit)) = vcpu.handle_exit(ram) {
        answer(exit, input);
    }
    // prepare_entry may hand back another access (the write half of a read-modify-write);
    // each is answered and the entry retried, as the back end's run loop does.
    for _ in 0..4 {
        match vcpu.prepare_entry(ram) {
            Ok(Some(exit)) => answer(exit, input),
            _ => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let fill = (input.uint(2) as usize).min(RAM_SIZE);
    let mut memory = vec![0u8; RAM_SIZE];
    input.fill(&mut memory[..fill.min(input.0.len())]);
    let ram = VecRam(RefCell::new(memory));
    let config_bits = input.byte();
    let config = VmxConfig {
        vcpu_id: config_bits & 1,
        cpuid: Vec::new(),
        ignore_unknown_msrs: config_bits & 2 != 0,
        exit_on_hlt: config_bits & 4 != 0,
        exit_on_pause: config_bits & 8 != 0,
    };
    let Ok(mut vcpu) = VmxVcpu::new(VmcsModel::new(), config) else {
        return;
    };
    // Fetches start in RAM rather than at the reset vector's 0xffff_fff0.
    vcpu.vmcs_mut().set_field(VMCS_GUEST_CS_BASE, 0);
    vcpu.vmcs_mut().set_field(VMCS_GUEST_RIP, 0);
    for _ in 0..MAX_STEPS {
        if input.is_empty() {
            break;
        }
        step(&mut vcpu, &ram, &mut input);
    }
});
