//! Our own declarations of the Hypervisor.framework (Intel) interface: types, error codes,
//! register ids, VMCS field encodings, VMX exit reasons and the `extern "C"` functions.
//!
//! The C declarations these mirror are written out in `vendor-headers/Hypervisor/`. Everything
//! but the `extern` block is plain data and compiles on every target, so the VMX layer and its
//! tests build on Linux.

#![allow(non_camel_case_types)]

use std::ffi::c_void;

/// A `mach_error_t`.
pub type hv_return_t = i32;
pub type hv_vcpuid_t = u32;
pub type hv_vm_options_t = u64;
pub type hv_vcpu_options_t = u64;
pub type hv_memory_flags_t = u64;
pub type hv_uvaddr_t = *const c_void;
pub type hv_gpaddr_t = u64;

// The framework's error codes are `err_sub(0x3ba) | err_system(0x3e)` plus a small number.
pub const HV_SUCCESS: hv_return_t = 0;
pub const HV_ERROR: hv_return_t = 0xfae9_4001_u32 as i32;
pub const HV_BUSY: hv_return_t = 0xfae9_4002_u32 as i32;
pub const HV_BAD_ARGUMENT: hv_return_t = 0xfae9_4003_u32 as i32;
pub const HV_NO_RESOURCES: hv_return_t = 0xfae9_4005_u32 as i32;
pub const HV_NO_DEVICE: hv_return_t = 0xfae9_4006_u32 as i32;
pub const HV_DENIED: hv_return_t = 0xfae9_4007_u32 as i32;
pub const HV_UNSUPPORTED: hv_return_t = 0xfae9_400f_u32 as i32;

/// The framework's name for an error code, for messages.
pub fn hv_error_name(code: hv_return_t) -> &'static str {
    match code {
        HV_SUCCESS => "HV_SUCCESS",
        HV_ERROR => "HV_ERROR",
        HV_BUSY => "HV_BUSY",
        HV_BAD_ARGUMENT => "HV_BAD_ARGUMENT",
        HV_NO_RESOURCES => "HV_NO_RESOURCES",
        HV_NO_DEVICE => "HV_NO_DEVICE",
        HV_DENIED => "HV_DENIED",
        HV_UNSUPPORTED => "HV_UNSUPPORTED",
        _ => "unknown Hypervisor.framework error",
    }
}

pub const HV_VM_DEFAULT: hv_vm_options_t = 0;
pub const HV_VCPU_DEFAULT: hv_vcpu_options_t = 0;

pub const HV_MEMORY_READ: hv_memory_flags_t = 1 << 0;
pub const HV_MEMORY_WRITE: hv_memory_flags_t = 1 << 1;
pub const HV_MEMORY_EXEC: hv_memory_flags_t = 1 << 2;

/// Register ids of `hv_vcpu_read_register`/`hv_vcpu_write_register`, in header order.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum hv_x86_reg_t {
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
    HV_X86_CS,
    HV_X86_SS,
    HV_X86_DS,
    HV_X86_ES,
    HV_X86_FS,
    HV_X86_GS,
    HV_X86_IDT_BASE,
    HV_X86_IDT_LIMIT,
    HV_X86_GDT_BASE,
    HV_X86_GDT_LIMIT,
    HV_X86_LDTR,
    HV_X86_LDT_BASE,
    HV_X86_LDT_LIMIT,
    HV_X86_LDT_AR,
    HV_X86_TR,
    HV_X86_TSS_BASE,
    HV_X86_TSS_LIMIT,
    HV_X86_TSS_AR,
    HV_X86_CR0,
    HV_X86_CR1,
    HV_X86_CR2,
    HV_X86_CR3,
    HV_X86_CR4,
    HV_X86_DR0,
    HV_X86_DR1,
    HV_X86_DR2,
    HV_X86_DR3,
    HV_X86_DR4,
    HV_X86_DR5,
    HV_X86_DR6,
    HV_X86_DR7,
    HV_X86_TPR,
    HV_X86_XCR0,
    HV_X86_REGISTERS_MAX,
}
pub use hv_x86_reg_t::*;

/// Capability ids of `hv_vmx_read_capability`. Each value holds the allowed-0 settings in the
/// low 32 bits (a set bit must be 1) and the allowed-1 settings in the high 32 bits.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum hv_vmx_capability_t {
    HV_VMX_CAP_PINBASED = 0,
    HV_VMX_CAP_PROCBASED = 1,
    HV_VMX_CAP_PROCBASED2 = 2,
    HV_VMX_CAP_ENTRY = 3,
    HV_VMX_CAP_EXIT = 4,
    HV_VMX_CAP_PREEMPTION_TIMER = 32,
}
pub use hv_vmx_capability_t::*;

// VMCS field encodings (Intel SDM vol. 3, appendix B), with the framework's names.
pub const VMCS_VPID: u32 = 0x0000;
pub const VMCS_GUEST_ES: u32 = 0x0800;
pub const VMCS_GUEST_CS: u32 = 0x0802;
pub const VMCS_GUEST_SS: u32 = 0x0804;
pub const VMCS_GUEST_DS: u32 = 0x0806;
pub const VMCS_GUEST_FS: u32 = 0x0808;
pub const VMCS_GUEST_GS: u32 = 0x080a;
pub const VMCS_GUEST_LDTR: u32 = 0x080c;
pub const VMCS_GUEST_TR: u32 = 0x080e;
pub const VMCS_CTRL_IO_BITMAP_A: u32 = 0x2000;
pub const VMCS_CTRL_IO_BITMAP_B: u32 = 0x2002;
pub const VMCS_CTRL_MSR_BITMAPS: u32 = 0x2004;
pub const VMCS_CTRL_TSC_OFFSET: u32 = 0x2010;
pub const VMCS_CTRL_EPTP: u32 = 0x201a;
pub const VMCS_GUEST_PHYSICAL_ADDRESS: u32 = 0x2400;
pub const VMCS_GUEST_LINK_POINTER: u32 = 0x2800;
pub const VMCS_GUEST_IA32_DEBUGCTL: u32 = 0x2802;
pub const VMCS_GUEST_IA32_PAT: u32 = 0x2804;
pub const VMCS_GUEST_IA32_EFER: u32 = 0x2806;
pub const VMCS_GUEST_PDPTE0: u32 = 0x280a;
pub const VMCS_GUEST_PDPTE1: u32 = 0x280c;
pub const VMCS_GUEST_PDPTE2: u32 = 0x280e;
pub const VMCS_GUEST_PDPTE3: u32 = 0x2810;
pub const VMCS_CTRL_PIN_BASED: u32 = 0x4000;
pub const VMCS_CTRL_CPU_BASED: u32 = 0x4002;
pub const VMCS_CTRL_EXC_BITMAP: u32 = 0x4004;
pub const VMCS_CTRL_CR3_COUNT: u32 = 0x400a;
pub const VMCS_CTRL_VMEXIT_CONTROLS: u32 = 0x400c;
pub const VMCS_CTRL_VMENTRY_CONTROLS: u32 = 0x4012;
pub const VMCS_CTRL_VMENTRY_IRQ_INFO: u32 = 0x4016;
pub const VMCS_CTRL_VMENTRY_EXC_ERROR: u32 = 0x4018;
pub const VMCS_CTRL_VMENTRY_INSTR_LEN: u32 = 0x401a;
pub const VMCS_CTRL_TPR_THRESHOLD: u32 = 0x401c;
pub const VMCS_CTRL_CPU_BASED2: u32 = 0x401e;
pub const VMCS_RO_INSTR_ERROR: u32 = 0x4400;
pub const VMCS_RO_EXIT_REASON: u32 = 0x4402;
pub const VMCS_RO_VMEXIT_IRQ_INFO: u32 = 0x4404;
pub const VMCS_RO_VMEXIT_IRQ_ERROR: u32 = 0x4406;
pub const VMCS_RO_IDT_VECTOR_INFO: u32 = 0x4408;
pub const VMCS_RO_IDT_VECTOR_ERROR: u32 = 0x440a;
pub const VMCS_RO_VMEXIT_INSTR_LEN: u32 = 0x440c;
pub const VMCS_RO_VMX_INSTR_INFO: u32 = 0x440e;
pub const VMCS_GUEST_ES_LIMIT: u32 = 0x4800;
pub const VMCS_GUEST_CS_LIMIT: u32 = 0x4802;
pub const VMCS_GUEST_SS_LIMIT: u32 = 0x4804;
pub const VMCS_GUEST_DS_LIMIT: u32 = 0x4806;
pub const VMCS_GUEST_FS_LIMIT: u32 = 0x4808;
pub const VMCS_GUEST_GS_LIMIT: u32 = 0x480a;
pub const VMCS_GUEST_LDTR_LIMIT: u32 = 0x480c;
pub const VMCS_GUEST_TR_LIMIT: u32 = 0x480e;
pub const VMCS_GUEST_GDTR_LIMIT: u32 = 0x4810;
pub const VMCS_GUEST_IDTR_LIMIT: u32 = 0x4812;
pub const VMCS_GUEST_ES_AR: u32 = 0x4814;
pub const VMCS_GUEST_CS_AR: u32 = 0x4816;
pub const VMCS_GUEST_SS_AR: u32 = 0x4818;
pub const VMCS_GUEST_DS_AR: u32 = 0x481a;
pub const VMCS_GUEST_FS_AR: u32 = 0x481c;
pub const VMCS_GUEST_GS_AR: u32 = 0x481e;
pub const VMCS_GUEST_LDTR_AR: u32 = 0x4820;
pub const VMCS_GUEST_TR_AR: u32 = 0x4822;
/// The guest interruptibility state (STI / MOV SS / SMI / NMI blocking).
pub const VMCS_GUEST_IGNORE_IRQ: u32 = 0x4824;
pub const VMCS_GUEST_ACTIVITY_STATE: u32 = 0x4826;
pub const VMCS_GUEST_IA32_SYSENTER_CS: u32 = 0x482a;
pub const VMCS_CTRL_CR0_MASK: u32 = 0x6000;
pub const VMCS_CTRL_CR4_MASK: u32 = 0x6002;
pub const VMCS_CTRL_CR0_SHADOW: u32 = 0x6004;
pub const VMCS_CTRL_CR4_SHADOW: u32 = 0x6006;
pub const VMCS_RO_EXIT_QUALIFIC: u32 = 0x6400;
pub const VMCS_RO_IO_RCX: u32 = 0x6402;
pub const VMCS_RO_IO_RSI: u32 = 0x6404;
pub const VMCS_RO_IO_RDI: u32 = 0x6406;
pub const VMCS_RO_IO_RIP: u32 = 0x6408;
pub const VMCS_RO_GUEST_LIN_ADDR: u32 = 0x640a;
pub const VMCS_GUEST_CR0: u32 = 0x6800;
pub const VMCS_GUEST_CR3: u32 = 0x6802;
pub const VMCS_GUEST_CR4: u32 = 0x6804;
pub const VMCS_GUEST_ES_BASE: u32 = 0x6806;
pub const VMCS_GUEST_CS_BASE: u32 = 0x6808;
pub const VMCS_GUEST_SS_BASE: u32 = 0x680a;
pub const VMCS_GUEST_DS_BASE: u32 = 0x680c;
pub const VMCS_GUEST_FS_BASE: u32 = 0x680e;
pub const VMCS_GUEST_GS_BASE: u32 = 0x6810;
pub const VMCS_GUEST_LDTR_BASE: u32 = 0x6812;
pub const VMCS_GUEST_TR_BASE: u32 = 0x6814;
pub const VMCS_GUEST_GDTR_BASE: u32 = 0x6816;
pub const VMCS_GUEST_IDTR_BASE: u32 = 0x6818;
pub const VMCS_GUEST_DR7: u32 = 0x681a;
pub const VMCS_GUEST_RSP: u32 = 0x681c;
pub const VMCS_GUEST_RIP: u32 = 0x681e;
pub const VMCS_GUEST_RFLAGS: u32 = 0x6820;
pub const VMCS_GUEST_DEBUG_EXC: u32 = 0x6822;
pub const VMCS_GUEST_SYSENTER_ESP: u32 = 0x6824;
pub const VMCS_GUEST_SYSENTER_EIP: u32 = 0x6826;

// Basic VM-exit reasons (the low 16 bits of VMCS_RO_EXIT_REASON).
pub const VMX_REASON_EXC_NMI: u32 = 0;
pub const VMX_REASON_IRQ: u32 = 1;
pub const VMX_REASON_TRIPLE_FAULT: u32 = 2;
pub const VMX_REASON_INIT: u32 = 3;
pub const VMX_REASON_SIPI: u32 = 4;
pub const VMX_REASON_IO_SMI: u32 = 5;
pub const VMX_REASON_OTHER_SMI: u32 = 6;
pub const VMX_REASON_IRQ_WND: u32 = 7;
pub const VMX_REASON_VIRTUAL_NMI_WND: u32 = 8;
pub const VMX_REASON_TASK: u32 = 9;
pub const VMX_REASON_CPUID: u32 = 10;
pub const VMX_REASON_GETSEC: u32 = 11;
pub const VMX_REASON_HLT: u32 = 12;
pub const VMX_REASON_INVD: u32 = 13;
pub const VMX_REASON_INVLPG: u32 = 14;
pub const VMX_REASON_RDPMC: u32 = 15;
pub const VMX_REASON_RDTSC: u32 = 16;
pub const VMX_REASON_RSM: u32 = 17;
pub const VMX_REASON_VMCALL: u32 = 18;
pub const VMX_REASON_MOV_CR: u32 = 28;
pub const VMX_REASON_MOV_DR: u32 = 29;
pub const VMX_REASON_IO: u32 = 30;
pub const VMX_REASON_RDMSR: u32 = 31;
pub const VMX_REASON_WRMSR: u32 = 32;
pub const VMX_REASON_VMENTRY_GUEST: u32 = 33;
pub const VMX_REASON_VMENTRY_MSR: u32 = 34;
pub const VMX_REASON_MWAIT: u32 = 36;
pub const VMX_REASON_MTF: u32 = 37;
pub const VMX_REASON_MONITOR: u32 = 39;
pub const VMX_REASON_PAUSE: u32 = 40;
pub const VMX_REASON_VMENTRY_MC: u32 = 41;
pub const VMX_REASON_TPR_THRESHOLD: u32 = 43;
pub const VMX_REASON_APIC_ACCESS: u32 = 44;
pub const VMX_REASON_VIRTUALIZED_EOI: u32 = 45;
pub const VMX_REASON_GDTR_IDTR: u32 = 46;
pub const VMX_REASON_LDTR_TR: u32 = 47;
pub const VMX_REASON_EPT_VIOLATION: u32 = 48;
pub const VMX_REASON_EPT_MISCONFIG: u32 = 49;
pub const VMX_REASON_EPT_INVEPT: u32 = 50;
pub const VMX_REASON_RDTSCP: u32 = 51;
pub const VMX_REASON_VMX_TIMER_EXPIRED: u32 = 52;
pub const VMX_REASON_INVVPID: u32 = 53;
pub const VMX_REASON_WBINVD: u32 = 54;
pub const VMX_REASON_XSETBV: u32 = 55;
pub const VMX_REASON_APIC_WRITE: u32 = 56;
pub const VMX_REASON_RDRAND: u32 = 57;
pub const VMX_REASON_INVPCID: u32 = 58;
pub const VMX_REASON_VMFUNC: u32 = 59;
pub const VMX_REASON_RDSEED: u32 = 61;
pub const VMX_REASON_XSAVES: u32 = 63;
pub const VMX_REASON_XRSTORS: u32 = 64;
/// Bit 31 of the exit reason: the VM entry failed.
pub const VMX_REASON_ENTRY_FAILED: u64 = 1 << 31;

// Pin-based VM-execution controls.
pub const PIN_BASED_INTR: u32 = 1 << 0;
pub const PIN_BASED_NMI: u32 = 1 << 3;
pub const PIN_BASED_VIRTUAL_NMI: u32 = 1 << 5;
pub const PIN_BASED_PREEMPTION_TIMER: u32 = 1 << 6;
pub const PIN_BASED_POSTED_INTR: u32 = 1 << 7;

// Primary processor-based VM-execution controls.
pub const CPU_BASED_IRQ_WND: u32 = 1 << 2;
pub const CPU_BASED_TSC_OFFSET: u32 = 1 << 3;
pub const CPU_BASED_HLT: u32 = 1 << 7;
pub const CPU_BASED_INVLPG: u32 = 1 << 9;
pub const CPU_BASED_MWAIT: u32 = 1 << 10;
pub const CPU_BASED_RDPMC: u32 = 1 << 11;
pub const CPU_BASED_RDTSC: u32 = 1 << 12;
pub const CPU_BASED_CR3_LOAD: u32 = 1 << 15;
pub const CPU_BASED_CR3_STORE: u32 = 1 << 16;
pub const CPU_BASED_CR8_LOAD: u32 = 1 << 19;
pub const CPU_BASED_CR8_STORE: u32 = 1 << 20;
pub const CPU_BASED_TPR_SHADOW: u32 = 1 << 21;
pub const CPU_BASED_VIRTUAL_NMI_WND: u32 = 1 << 22;
pub const CPU_BASED_MOV_DR: u32 = 1 << 23;
pub const CPU_BASED_UNCOND_IO: u32 = 1 << 24;
pub const CPU_BASED_IO_BITMAPS: u32 = 1 << 25;
pub const CPU_BASED_MTF: u32 = 1 << 27;
pub const CPU_BASED_MSR_BITMAPS: u32 = 1 << 28;
pub const CPU_BASED_MONITOR: u32 = 1 << 29;
pub const CPU_BASED_PAUSE: u32 = 1 << 30;
pub const CPU_BASED_SECONDARY_CTLS: u32 = 1 << 31;

// Secondary processor-based VM-execution controls.
pub const CPU_BASED2_VIRTUAL_APIC: u32 = 1 << 0;
pub const CPU_BASED2_EPT: u32 = 1 << 1;
pub const CPU_BASED2_DESC_TABLE: u32 = 1 << 2;
pub const CPU_BASED2_RDTSCP: u32 = 1 << 3;
pub const CPU_BASED2_X2APIC: u32 = 1 << 4;
pub const CPU_BASED2_VPID: u32 = 1 << 5;
pub const CPU_BASED2_WBINVD: u32 = 1 << 6;
pub const CPU_BASED2_UNRESTRICTED: u32 = 1 << 7;
pub const CPU_BASED2_APIC_REG_VIRT: u32 = 1 << 8;
pub const CPU_BASED2_VIRT_INTR_DELIVERY: u32 = 1 << 9;
pub const CPU_BASED2_PAUSE_LOOP: u32 = 1 << 10;
pub const CPU_BASED2_RDRAND: u32 = 1 << 11;
pub const CPU_BASED2_INVPCID: u32 = 1 << 12;
pub const CPU_BASED2_VMFUNC: u32 = 1 << 13;
pub const CPU_BASED2_VMCS_SHADOW: u32 = 1 << 14;
pub const CPU_BASED2_RDSEED: u32 = 1 << 16;
pub const CPU_BASED2_EPT_VE: u32 = 1 << 18;
pub const CPU_BASED2_XSAVES_XRSTORS: u32 = 1 << 20;

// VM-exit controls.
pub const VMEXIT_SAVE_DBG_CONTROLS: u32 = 1 << 2;
pub const VMEXIT_HOST_IA32E: u32 = 1 << 9;
pub const VMEXIT_LOAD_IA32_PERF_GLOBAL_CTRL: u32 = 1 << 12;
pub const VMEXIT_ACK_INTR: u32 = 1 << 15;
pub const VMEXIT_SAVE_IA32_PAT: u32 = 1 << 18;
pub const VMEXIT_LOAD_IA32_PAT: u32 = 1 << 19;
pub const VMEXIT_SAVE_EFER: u32 = 1 << 20;
pub const VMEXIT_LOAD_EFER: u32 = 1 << 21;
pub const VMEXIT_SAVE_VMX_TIMER: u32 = 1 << 22;

// VM-entry controls.
pub const VMENTRY_LOAD_DBG_CONTROLS: u32 = 1 << 2;
pub const VMENTRY_GUEST_IA32E: u32 = 1 << 9;
pub const VMENTRY_SMM: u32 = 1 << 10;
pub const VMENTRY_DEACTIVATE_DUAL_MONITOR: u32 = 1 << 11;
pub const VMENTRY_LOAD_IA32_PERF_GLOBAL_CTRL: u32 = 1 << 13;
pub const VMENTRY_LOAD_IA32_PAT: u32 = 1 << 14;
pub const VMENTRY_LOAD_EFER: u32 = 1 << 15;

// VM-entry interruption-information field (and the exit/IDT-vectoring ones, same layout).
pub const IRQ_INFO_VECTOR_MASK: u32 = 0xff;
pub const IRQ_INFO_EXT_IRQ: u32 = 0 << 8;
pub const IRQ_INFO_NMI: u32 = 2 << 8;
pub const IRQ_INFO_HARD_EXC: u32 = 3 << 8;
pub const IRQ_INFO_SOFT_IRQ: u32 = 4 << 8;
pub const IRQ_INFO_PRIV_SOFT_EXC: u32 = 5 << 8;
pub const IRQ_INFO_SOFT_EXC: u32 = 6 << 8;
pub const IRQ_INFO_TYPE_MASK: u32 = 7 << 8;
pub const IRQ_INFO_ERROR_VALID: u32 = 1 << 11;
pub const IRQ_INFO_VALID: u32 = 1 << 31;

// Guest interruptibility state.
pub const VMCS_INTERRUPTIBILITY_STI_BLOCKING: u64 = 1 << 0;
pub const VMCS_INTERRUPTIBILITY_MOVSS_BLOCKING: u64 = 1 << 1;
pub const VMCS_INTERRUPTIBILITY_SMI_BLOCKING: u64 = 1 << 2;
pub const VMCS_INTERRUPTIBILITY_NMI_BLOCKING: u64 = 1 << 3;

#[cfg(target_os = "macos")]
#[link(name = "Hypervisor", kind = "framework")]
extern "C" {
    pub fn hv_vm_create(flags: hv_vm_options_t) -> hv_return_t;
    pub fn hv_vm_destroy() -> hv_return_t;
    pub fn hv_vm_map(
        uva: hv_uvaddr_t,
        gpa: hv_gpaddr_t,
        size: usize,
        flags: hv_memory_flags_t,
    ) -> hv_return_t;
    pub fn hv_vm_unmap(gpa: hv_gpaddr_t, size: usize) -> hv_return_t;
    pub fn hv_vm_protect(gpa: hv_gpaddr_t, size: usize, flags: hv_memory_flags_t) -> hv_return_t;
    pub fn hv_vm_sync_tsc(tsc: u64) -> hv_return_t;

    pub fn hv_vcpu_create(vcpu: *mut hv_vcpuid_t, flags: hv_vcpu_options_t) -> hv_return_t;
    pub fn hv_vcpu_destroy(vcpu: hv_vcpuid_t) -> hv_return_t;
    pub fn hv_vcpu_read_register(
        vcpu: hv_vcpuid_t,
        reg: hv_x86_reg_t,
        value: *mut u64,
    ) -> hv_return_t;
    pub fn hv_vcpu_write_register(vcpu: hv_vcpuid_t, reg: hv_x86_reg_t, value: u64) -> hv_return_t;
    pub fn hv_vcpu_read_fpstate(vcpu: hv_vcpuid_t, buffer: *mut c_void, size: usize)
        -> hv_return_t;
    pub fn hv_vcpu_write_fpstate(
        vcpu: hv_vcpuid_t,
        buffer: *const c_void,
        size: usize,
    ) -> hv_return_t;
    pub fn hv_vcpu_enable_native_msr(vcpu: hv_vcpuid_t, msr: u32, enable: bool) -> hv_return_t;
    pub fn hv_vcpu_read_msr(vcpu: hv_vcpuid_t, msr: u32, value: *mut u64) -> hv_return_t;
    pub fn hv_vcpu_write_msr(vcpu: hv_vcpuid_t, msr: u32, value: u64) -> hv_return_t;
    pub fn hv_vcpu_flush(vcpu: hv_vcpuid_t) -> hv_return_t;
    pub fn hv_vcpu_invalidate_tlb(vcpu: hv_vcpuid_t) -> hv_return_t;
    pub fn hv_vcpu_run(vcpu: hv_vcpuid_t) -> hv_return_t;
    pub fn hv_vcpu_interrupt(vcpus: *mut hv_vcpuid_t, vcpu_count: u32) -> hv_return_t;
    pub fn hv_vcpu_get_exec_time(vcpu: hv_vcpuid_t, time: *mut u64) -> hv_return_t;

    pub fn hv_vmx_read_capability(field: hv_vmx_capability_t, value: *mut u64) -> hv_return_t;
    pub fn hv_vmx_vcpu_read_vmcs(vcpu: hv_vcpuid_t, field: u32, value: *mut u64) -> hv_return_t;
    pub fn hv_vmx_vcpu_write_vmcs(vcpu: hv_vcpuid_t, field: u32, value: u64) -> hv_return_t;
}
