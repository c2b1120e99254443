//! The MSRs a vCPU starts with, as firmware leaves them.

use super::layout::LAPIC_BASE;

const MSR_IA32_APIC_BASE: u32 = 0x1b;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MSRs as firmware leaves them at boot: fast strings on, MTRRs on with write-back default,
/// syscall MSRs clear, and the APIC base (in x2APIC mode with `-x`).
pub fn boot_msrs(id: u8, x2apic: bool) -> Vec<(u32, u64)> {
    let mut apic_base = LAPIC_BASE | (1 << 11);
    if id == 0 {
        apic_base |= 1 << 8;
    }
    if x2apic {
        apic_base |= 1 << 10;
    }
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
        (MSR_IA32_APIC_BASE, apic_base),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_base_marks_the_bsp_and_x2apic() {
        let base = |id, x2| {
            boot_msrs(id, x2)
                .into_iter()
                .find(|&(i, _)| i == MSR_IA32_APIC_BASE)
                .unwrap()
                .1
        };
        assert_eq!(base(0, false), 0xfee0_0900);
        assert_eq!(base(1, false), 0xfee0_0800);
        assert_eq!(base(0, true), 0xfee0_0d00);
    }
}
