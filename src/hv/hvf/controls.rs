//! The five VMX control words, computed from the capability MSRs as xhyve's `vmx_set_ctlreg`
//! does: bits we require must be allowed, bits we forbid must be allowed to be 0, bits the
//! processor forces on are on, wanted bits are on where allowed, and every other bit keeps the
//! value the VMCS already holds.

use super::ffi::*;
use super::vmcs::Vmcs;
use crate::hv::HvError;

/// A control bit with the name an error message gives it.
#[derive(Debug, Clone, Copy)]
pub struct Bit {
    pub mask: u32,
    /// Names the control and the word it is in, e.g. "EPT (secondary processor-based control)".
    pub name: &'static str,
}

const fn bit(mask: u32, name: &'static str) -> Bit {
    Bit { mask, name }
}

/// What we ask of one control word.
#[derive(Debug, Clone, Copy)]
pub struct ControlRequest<'a> {
    pub cap: hv_vmx_capability_t,
    pub field: u32,
    /// Must be allowed to be 1; set.
    pub required_one: &'a [Bit],
    /// Must be allowed to be 0; cleared.
    pub required_zero: &'a [Bit],
    /// Set when allowed, else left as the processor allows.
    pub wanted_one: u32,
}

/// Computes one control word from the capability value and the current VMCS value.
pub fn control_value(cap: u64, current: u32, request: &ControlRequest<'_>) -> Result<u32, HvError> {
    let must_be_one = cap as u32;
    let may_be_one = (cap >> 32) as u32;
    for b in request.required_one {
        if may_be_one & b.mask == 0 {
            return Err(HvError::MissingCapability(b.name));
        }
    }
    for b in request.required_zero {
        if must_be_one & b.mask != 0 {
            return Err(HvError::MissingCapability(b.name));
        }
    }
    let ones = request.required_one.iter().fold(0, |acc, b| acc | b.mask);
    let zeros = request.required_zero.iter().fold(0, |acc, b| acc | b.mask);
    let wanted = request.wanted_one & may_be_one & !zeros;
    let value = (current & !zeros) | ones | wanted | must_be_one;
    Ok(value & may_be_one | must_be_one)
}

/// The control words programmed into a new vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Controls {
    pub pin_based: u32,
    /// Primary processor-based controls without the window-exiting bits, which are set on demand.
    pub cpu_based: u32,
    pub cpu_based2: u32,
    pub vmexit: u32,
    /// Entry controls without "IA-32e mode guest", which follows EFER.LMA.
    pub vmentry: u32,
}

const PIN_REQUIRED: &[Bit] = &[
    bit(
        PIN_BASED_INTR,
        "external-interrupt exiting (pin-based control)",
    ),
    bit(PIN_BASED_NMI, "NMI exiting (pin-based control)"),
    bit(PIN_BASED_VIRTUAL_NMI, "virtual NMIs (pin-based control)"),
];
const PIN_ZERO: &[Bit] = &[
    bit(
        PIN_BASED_PREEMPTION_TIMER,
        "no preemption timer (pin-based control)",
    ),
    bit(
        PIN_BASED_POSTED_INTR,
        "no posted interrupts (pin-based control)",
    ),
];

const CPU_REQUIRED: &[Bit] = &[
    bit(
        CPU_BASED_SECONDARY_CTLS,
        "secondary controls (processor-based control)",
    ),
    bit(
        CPU_BASED_UNCOND_IO,
        "unconditional I/O exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_IRQ_WND,
        "interrupt-window exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_VIRTUAL_NMI_WND,
        "NMI-window exiting (processor-based control)",
    ),
    bit(CPU_BASED_MWAIT, "MWAIT exiting (processor-based control)"),
    bit(
        CPU_BASED_MONITOR,
        "MONITOR exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_CR8_LOAD,
        "CR8-load exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_CR8_STORE,
        "CR8-store exiting (processor-based control)",
    ),
];
const CPU_ZERO: &[Bit] = &[
    bit(
        CPU_BASED_CR3_LOAD,
        "no CR3-load exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_CR3_STORE,
        "no CR3-store exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_IO_BITMAPS,
        "no I/O bitmaps (processor-based control)",
    ),
    bit(
        CPU_BASED_RDTSC,
        "no RDTSC exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_TPR_SHADOW,
        "no TPR shadow (processor-based control)",
    ),
    bit(
        CPU_BASED_MOV_DR,
        "no MOV-DR exiting (processor-based control)",
    ),
    bit(
        CPU_BASED_MTF,
        "no monitor trap flag (processor-based control)",
    ),
    bit(
        CPU_BASED_INVLPG,
        "no INVLPG exiting (processor-based control)",
    ),
];
const HLT_EXITING: Bit = bit(CPU_BASED_HLT, "HLT exiting (processor-based control)");
const NO_HLT_EXITING: Bit = bit(CPU_BASED_HLT, "no HLT exiting (processor-based control)");
const PAUSE_EXITING: Bit = bit(CPU_BASED_PAUSE, "PAUSE exiting (processor-based control)");
const NO_PAUSE_EXITING: Bit = bit(
    CPU_BASED_PAUSE,
    "no PAUSE exiting (processor-based control)",
);

const CPU2_REQUIRED: &[Bit] = &[
    bit(CPU_BASED2_EPT, "EPT (secondary processor-based control)"),
    bit(
        CPU_BASED2_UNRESTRICTED,
        "unrestricted guest (secondary processor-based control)",
    ),
];
const CPU2_ZERO: &[Bit] = &[
    bit(
        CPU_BASED2_VIRTUAL_APIC,
        "no APIC-access virtualization (secondary control)",
    ),
    bit(
        CPU_BASED2_DESC_TABLE,
        "no descriptor-table exiting (secondary control)",
    ),
    bit(CPU_BASED2_WBINVD, "no WBINVD exiting (secondary control)"),
    bit(
        CPU_BASED2_PAUSE_LOOP,
        "no PAUSE-loop exiting (secondary control)",
    ),
    bit(CPU_BASED2_RDRAND, "no RDRAND exiting (secondary control)"),
    bit(CPU_BASED2_RDSEED, "no RDSEED exiting (secondary control)"),
    bit(
        CPU_BASED2_XSAVES_XRSTORS,
        "no XSAVES/XRSTORS (secondary control)",
    ),
    bit(
        CPU_BASED2_VMCS_SHADOW,
        "no VMCS shadowing (secondary control)",
    ),
];

const EXIT_REQUIRED: &[Bit] = &[
    bit(
        VMEXIT_HOST_IA32E,
        "host address-space size (VM-exit control)",
    ),
    bit(VMEXIT_LOAD_EFER, "load IA32_EFER on exit (VM-exit control)"),
];
const EXIT_ZERO: &[Bit] = &[
    bit(
        VMEXIT_SAVE_VMX_TIMER,
        "no preemption-timer save (VM-exit control)",
    ),
    bit(
        VMEXIT_LOAD_IA32_PERF_GLOBAL_CTRL,
        "no PERF_GLOBAL_CTRL load (VM-exit control)",
    ),
];

const ENTRY_REQUIRED: &[Bit] = &[bit(
    VMENTRY_LOAD_EFER,
    "load IA32_EFER on entry (VM-entry control)",
)];
const ENTRY_ZERO: &[Bit] = &[
    bit(VMENTRY_SMM, "no entry to SMM (VM-entry control)"),
    bit(
        VMENTRY_DEACTIVATE_DUAL_MONITOR,
        "no dual-monitor deactivation (VM-entry control)",
    ),
    bit(
        VMENTRY_LOAD_IA32_PERF_GLOBAL_CTRL,
        "no PERF_GLOBAL_CTRL load (VM-entry control)",
    ),
    bit(
        VMENTRY_GUEST_IA32E,
        "IA-32e mode guest settable to 0 (VM-entry control)",
    ),
];

impl Controls {
    /// Reads the capabilities and current values from `vmcs` and computes all five words.
    /// HLT and PAUSE exiting follow xhyve's `-H` and `-P`.
    pub fn negotiate(
        vmcs: &impl Vmcs,
        exit_on_hlt: bool,
        exit_on_pause: bool,
    ) -> Result<Controls, HvError> {
        let mut cpu_required = [CPU_REQUIRED[0]; 10];
        let mut cpu_zero = [CPU_ZERO[0]; 10];
        let (mut nr, mut nz) = (CPU_REQUIRED.len(), CPU_ZERO.len());
        cpu_required[..nr].copy_from_slice(CPU_REQUIRED);
        cpu_zero[..nz].copy_from_slice(CPU_ZERO);
        for (on, yes, no) in [
            (exit_on_hlt, HLT_EXITING, NO_HLT_EXITING),
            (exit_on_pause, PAUSE_EXITING, NO_PAUSE_EXITING),
        ] {
            if on {
                cpu_required[nr] = yes;
                nr += 1;
            } else {
                cpu_zero[nz] = no;
                nz += 1;
            }
        }
        let word = |request: ControlRequest<'_>| -> Result<u32, HvError> {
            let cap = vmcs.capability(request.cap)?;
            let current = vmcs.read_field(request.field)? as u32;
            control_value(cap, current, &request)
        };
        let pin_based = word(ControlRequest {
            cap: HV_VMX_CAP_PINBASED,
            field: VMCS_CTRL_PIN_BASED,
            required_one: PIN_REQUIRED,
            required_zero: PIN_ZERO,
            wanted_one: 0,
        })?;
        let cpu_based = word(ControlRequest {
            cap: HV_VMX_CAP_PROCBASED,
            field: VMCS_CTRL_CPU_BASED,
            required_one: &cpu_required[..nr],
            required_zero: &cpu_zero[..nz],
            // The framework manages the MSR bitmaps behind hv_vcpu_enable_native_msr.
            wanted_one: CPU_BASED_MSR_BITMAPS | CPU_BASED_TSC_OFFSET,
        })?;
        let cpu_based2 = word(ControlRequest {
            cap: HV_VMX_CAP_PROCBASED2,
            field: VMCS_CTRL_CPU_BASED2,
            required_one: CPU2_REQUIRED,
            required_zero: CPU2_ZERO,
            wanted_one: CPU_BASED2_VPID | CPU_BASED2_RDTSCP | CPU_BASED2_INVPCID,
        })?;
        let vmexit = word(ControlRequest {
            cap: HV_VMX_CAP_EXIT,
            field: VMCS_CTRL_VMEXIT_CONTROLS,
            required_one: EXIT_REQUIRED,
            required_zero: EXIT_ZERO,
            wanted_one: 0,
        })?;
        let vmentry = word(ControlRequest {
            cap: HV_VMX_CAP_ENTRY,
            field: VMCS_CTRL_VMENTRY_CONTROLS,
            required_one: ENTRY_REQUIRED,
            required_zero: ENTRY_ZERO,
            wanted_one: 0,
        })?;
        Ok(Controls {
            pin_based,
            // Window exiting is required to be possible, and switched on only on request.
            cpu_based: cpu_based & !(CPU_BASED_IRQ_WND | CPU_BASED_VIRTUAL_NMI_WND),
            cpu_based2,
            vmexit,
            vmentry,
        })
    }

    /// Writes the five words into the VMCS.
    pub fn program(&self, vmcs: &mut impl Vmcs) -> Result<(), HvError> {
        vmcs.write_field(VMCS_CTRL_PIN_BASED, self.pin_based.into())?;
        vmcs.write_field(VMCS_CTRL_CPU_BASED, self.cpu_based.into())?;
        vmcs.write_field(VMCS_CTRL_CPU_BASED2, self.cpu_based2.into())?;
        vmcs.write_field(VMCS_CTRL_VMEXIT_CONTROLS, self.vmexit.into())?;
        vmcs.write_field(VMCS_CTRL_VMENTRY_CONTROLS, self.vmentry.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::hvf::vmcs::{VmcsModel, CAP_ANYTHING};

    #[test]
    fn forbidden_required_control_is_an_error_naming_it() {
        let mut m = VmcsModel::new();
        // Everything allowed except EPT.
        let no_ept = CAP_ANYTHING & !(u64::from(CPU_BASED2_EPT) << 32);
        m.capabilities.insert(HV_VMX_CAP_PROCBASED2, no_ept);
        let err = Controls::negotiate(&m, true, false).unwrap_err();
        assert!(err.to_string().contains("EPT (secondary"), "{err}");
    }

    #[test]
    fn hlt_exiting_is_required_only_with_dash_h() {
        let mut m = VmcsModel::new();
        let no_hlt = CAP_ANYTHING & !(u64::from(CPU_BASED_HLT) << 32);
        m.capabilities.insert(HV_VMX_CAP_PROCBASED, no_hlt);
        let err = Controls::negotiate(&m, true, false).unwrap_err();
        assert!(err.to_string().contains("HLT exiting"), "{err}");
        let c = Controls::negotiate(&m, false, false).unwrap();
        assert_eq!(c.cpu_based & CPU_BASED_HLT, 0);
    }

    #[test]
    fn control_forced_on_that_we_need_off_is_an_error() {
        let mut m = VmcsModel::new();
        m.capabilities.insert(
            HV_VMX_CAP_PROCBASED,
            CAP_ANYTHING | u64::from(CPU_BASED_RDTSC),
        );
        let err = Controls::negotiate(&m, false, false).unwrap_err();
        assert!(err.to_string().contains("RDTSC"), "{err}");
    }

    #[test]
    fn allowed_0_bits_are_forced_on_and_wanted_bits_follow_allowed_1() {
        let mut m = VmcsModel::new();
        // Bits 1, 2 and 4 of the pin-based controls must be 1 on this "processor".
        m.capabilities
            .insert(HV_VMX_CAP_PINBASED, CAP_ANYTHING | 0x16);
        // VPID may not be 1: it is wanted, not required, so it is just left off.
        m.capabilities.insert(
            HV_VMX_CAP_PROCBASED2,
            CAP_ANYTHING & !(u64::from(CPU_BASED2_VPID) << 32),
        );
        let c = Controls::negotiate(&m, true, true).unwrap();
        assert_eq!(c.pin_based & 0x16, 0x16);
        assert_eq!(
            c.pin_based & (PIN_BASED_INTR | PIN_BASED_NMI | PIN_BASED_VIRTUAL_NMI),
            PIN_BASED_INTR | PIN_BASED_NMI | PIN_BASED_VIRTUAL_NMI
        );
        assert_eq!(c.cpu_based2 & CPU_BASED2_VPID, 0);
        assert_ne!(c.cpu_based2 & CPU_BASED2_EPT, 0);
        assert_ne!(c.cpu_based & CPU_BASED_UNCOND_IO, 0);
        assert_ne!(c.cpu_based & CPU_BASED_HLT, 0);
        assert_ne!(c.cpu_based & CPU_BASED_PAUSE, 0);
        assert_eq!(
            c.cpu_based & CPU_BASED_IRQ_WND,
            0,
            "window exits only on request"
        );
        assert_ne!(c.vmentry & VMENTRY_LOAD_EFER, 0);
        assert_eq!(c.vmentry & VMENTRY_GUEST_IA32E, 0);
    }

    #[test]
    fn unrequested_bits_keep_the_current_vmcs_value() {
        let mut m = VmcsModel::new();
        m.set_field(VMCS_CTRL_VMEXIT_CONTROLS, u64::from(VMEXIT_ACK_INTR));
        let c = Controls::negotiate(&m, false, false).unwrap();
        assert_ne!(c.vmexit & VMEXIT_ACK_INTR, 0);
        c.program(&mut m).unwrap();
        assert_eq!(
            m.writes_to(VMCS_CTRL_VMEXIT_CONTROLS),
            vec![u64::from(c.vmexit)]
        );
    }
}
