//! The CPUID the guest sees: what the hypervisor supports, minus what a policy hides.
//!
//! Features are hidden by name. On the build machines KVM's CPL0 emulator lacks CMPXCHG16B and
//! XSAVE/XRSTOR (DESIGN.md), so the default policy hides them and everything that depends on
//! XSAVE (AVX and later vector extensions, whose state lives in the XSAVE area).

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// Whether `index` (the subleaf in ECX) selects this entry.
    pub index_significant: bool,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One named feature bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub function: u32,
    pub index: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn feat(name: &'static str, function: u32, index: u32, reg: Reg, bit: u8) -> Feature {
    Feature {
        name,
        function,
        index,
        reg,
        bit,
    }
}

/// Features a policy can hide, by their /proc/cpuinfo names.
pub const FEATURES: &[Feature] = &[
    feat("cx16", 1, 0, Reg::Ecx, 13),
    feat("x2apic", 1, 0, Reg::Ecx, 21),
    feat("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    feat("xsave", 1, 0, Reg::Ecx, 26),
    feat("osxsave", 1, 0, Reg::Ecx, 27),
    feat("avx", 1, 0, Reg::Ecx, 28),
    feat("f16c", 1, 0, Reg::Ecx, 29),
    feat("fma", 1, 0, Reg::Ecx, 12),
    feat("monitor", 1, 0, Reg::Ecx, 3),
    feat("vmx", 1, 0, Reg::Ecx, 5),
    feat("pdcm", 1, 0, Reg::Ecx, 15),
    feat("avx2", 7, 0, Reg::Ebx, 5),
    feat("avx512f", 7, 0, Reg::Ebx, 16),
    feat("avx512dq", 7, 0, Reg::Ebx, 17),
    feat("avx512ifma", 7, 0, Reg::Ebx, 21),
    feat("avx512pf", 7, 0, Reg::Ebx, 26),
    feat("avx512er", 7, 0, Reg::Ebx, 27),
    feat("avx512cd", 7, 0, Reg::Ebx, 28),
    feat("avx512bw", 7, 0, Reg::Ebx, 30),
    feat("avx512vl", 7, 0, Reg::Ebx, 31),
    feat("avx512vbmi", 7, 0, Reg::Ecx, 1),
    feat("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    feat("avx512_vnni", 7, 0, Reg::Ecx, 11),
    feat("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    feat("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    feat("waitpkg", 7, 0, Reg::Ecx, 5),
    feat("pku", 7, 0, Reg::Ecx, 3),
    feat("la57", 7, 0, Reg::Ecx, 16),
    feat("amx_bf16", 7, 0, Reg::Edx, 22),
    feat("amx_tile", 7, 0, Reg::Edx, 24),
    feat("amx_int8", 7, 0, Reg::Edx, 25),
    feat("avx512_fp16", 7, 0, Reg::Edx, 23),
    feat("avx_vnni", 7, 1, Reg::Eax, 4),
    feat("avx512_bf16", 7, 1, Reg::Eax, 5),
];

/// Hidden by default: not emulated by this host's KVM at CPL0 (DESIGN.md), or state we do not
/// migrate (XSAVE-managed vector registers).
pub const DEFAULT_HIDDEN: &[&str] = &[
    "cx16",
    "xsave",
    "osxsave",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx512f",
    "avx512dq",
    "avx512ifma",
    "avx512pf",
    "avx512er",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512_vbmi2",
    "avx512_vnni",
    "avx512_bitalg",
    "avx512_vpopcntdq",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "avx512_fp16",
    "avx_vnni",
    "avx512_bf16",
    "waitpkg",
    "pku",
    "la57",
    "vmx",
    "monitor",
    "pdcm",
];

/// KVM's paravirtual feature leaf (KVM_CPUID_FEATURES, after the "KVMKVMKVM" signature leaf).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// KVM paravirtual features a guest must not be offered, in KVM_CPUID_FEATURES.EAX.
///
/// Every one of these has the guest make hypercalls (`vmcall`) or trust the hypervisor to
/// flush its TLB for it: PV_UNHALT (KVM_HC_KICK_CPU), PV_SEND_IPI (KVM_HC_SEND_IPI),
/// PV_SCHED_YIELD (KVM_HC_SCHED_YIELD), HC_MAP_GPA_RANGE (KVM_HC_MAP_GPA_RANGE), MMU_OP (the
/// old KVM_HC_MMU_OP) and PV_TLB_FLUSH (a preempted vCPU's flush deferred to the hypervisor).
/// On the build machines' paravirtual KVM a CPL0 `vmcall` never completes (the emulator loops
/// on it), so a guest that uses them hangs. On ordinary hardware KVM they work and only save
/// exits, so hiding them costs speed, never correctness; xhyve on Hypervisor.framework never
/// offered a KVM leaf at all. Hence one policy for every host, rather than a probe that would
/// have to run a guest `vmcall` and time it out at every start.
/// The MSR-based features (kvmclock, steal time, PV EOI, async PF) stay: no hypercall.
pub const KVM_PV_HIDDEN: u32 = 1 << 2 // MMU_OP
    | 1 << 7 // PV_UNHALT
    | 1 << 9 // PV_TLB_FLUSH
    | 1 << 11 // PV_SEND_IPI
    | 1 << 13 // PV_SCHED_YIELD
    | 1 << 16; // HC_MAP_GPA_RANGE

/// KVM paravirtual features that KVM implements in its own LAPIC, hidden when the VMM emulates
/// the LAPIC (`XHYVE_IRQCHIP=user`): KVM then refuses the async-PF MSRs (the guest takes a #GP
/// on `wrmsr` and warns) and never sets the PV EOI flag. ASYNC_PF, PV_EOI, ASYNC_PF_VMEXIT,
/// ASYNC_PF_INT.
pub const KVM_PV_NEED_HYPERVISOR_LAPIC: u32 = 1 << 4 | 1 << 6 | 1 << 10 | 1 << 14;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuidError {
    #[error("unknown CPU feature \"{0}\"")]
    UnknownFeature(String),
}

pub fn feature(name: &str) -> Result<&'static Feature, CpuidError> {
    FEATURES
        .iter()
        .find(|f| f.name == name)
        .ok_or_else(|| CpuidError::UnknownFeature(name.to_string()))
}

/// What the guest's CPUID looks like.
#[derive(Debug, Clone)]
pub struct CpuidPolicy {
    hidden: Vec<&'static Feature>,
    pub vcpus: u8,
    pub x2apic: bool,
    /// Whether the hypervisor emulates the LAPIC (KVM's in-kernel irqchip).
    pub hypervisor_lapic: bool,
}

impl CpuidPolicy {
    /// The default policy for a machine of `vcpus` processors; `x2apic` is xhyve's `-x`.
    pub fn new(vcpus: u8, x2apic: bool) -> Self {
        let mut hidden: Vec<&'static Feature> = DEFAULT_HIDDEN
            .iter()
            .filter_map(|name| feature(name).ok())
            .collect();
        if !x2apic {
            hidden.extend(feature("x2apic"));
        }
        CpuidPolicy {
            hidden,
            vcpus,
            x2apic,
            hypervisor_lapic: true,
        }
    }

    pub fn hide(&mut self, name: &str) -> Result<(), CpuidError> {
        self.hidden.push(feature(name)?);
        Ok(())
    }

    pub fn is_hidden(&self, name: &str) -> bool {
        self.hidden.iter().any(|f| f.name == name)
    }

    /// Applies the policy to the hypervisor's supported leaves for vCPU `apic_id`.
    pub fn apply(&self, supported: &[CpuidEntry], apic_id: u8) -> Vec<CpuidEntry> {
        let xsave_hidden = self.is_hidden("xsave");
        let mut out: Vec<CpuidEntry> = supported
            .iter()
            .copied()
            // Leaf 0xD describes XSAVE state; without XSAVE it must be empty.
            .filter(|e| !(xsave_hidden && e.function == 0xd))
            .collect();
        for f in &self.hidden {
            for e in out
                .iter_mut()
                .filter(|e| e.function == f.function && e.index == f.index)
            {
                let mask = !(1u32 << f.bit);
                match f.reg {
                    Reg::Eax => e.eax &= mask,
                    Reg::Ebx => e.ebx &= mask,
                    Reg::Ecx => e.ecx &= mask,
                    Reg::Edx => e.edx &= mask,
                }
            }
        }
        for e in out.iter_mut() {
            match e.function {
                1 => {
                    // Initial APIC ID and the logical processor count of the package.
                    e.ebx = (e.ebx & 0x0000_ffff)
                        | (u32::from(apic_id) << 24)
                        | (u32::from(self.vcpus) << 16);
                    // HTT: the count above is valid.
                    e.edx |= 1 << 28;
                    // Running under a hypervisor.
                    e.ecx |= 1 << 31;
                }
                0xb | 0x1f => {
                    // x2APIC ID of this processor.
                    e.edx = u32::from(apic_id);
                }
                KVM_CPUID_FEATURES => {
                    e.eax &= !KVM_PV_HIDDEN;
                    if !self.hypervisor_lapic {
                        e.eax &= !KVM_PV_NEED_HYPERVISOR_LAPIC;
                    }
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, ebx: u32, ecx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn default_policy_hides_cx16_xsave_and_x2apic() {
        let supported = [
            leaf(1, 0, 0x0800, u32::MAX),
            leaf(0xd, 0, 1, 1),
            leaf(7, 0, u32::MAX, 0),
        ];
        let out = CpuidPolicy::new(2, false).apply(&supported, 1);
        let l1 = out.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ecx & (1 << 13), 0, "cx16");
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(l1.ecx & (1 << 21), 0, "x2apic");
        assert_ne!(l1.ecx & (1 << 0), 0, "sse3 stays");
        assert_eq!(l1.ebx >> 24, 1, "apic id");
        assert_eq!((l1.ebx >> 16) & 0xff, 2, "logical count");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
        assert!(out.iter().all(|e| e.function != 0xd));
        let l7 = out.iter().find(|e| e.function == 7).unwrap();
        assert_eq!(l7.ebx & (1 << 5), 0, "avx2");
        assert_ne!(l7.ebx & 1, 0, "fsgsbase stays");
    }

    #[test]
    fn kvm_paravirtual_features_that_make_hypercalls_are_hidden() {
        let supported = [CpuidEntry {
            function: KVM_CPUID_FEATURES,
            eax: u32::MAX,
            ..Default::default()
        }];
        let eax = CpuidPolicy::new(1, false).apply(&supported, 0)[0].eax;
        for bit in [2, 7, 9, 11, 13, 16] {
            assert_eq!(eax & (1 << bit), 0, "KVM PV feature bit {bit} offered");
        }
        // kvmclock (0, 3), NOP_IO_DELAY (1), steal time (5), PV EOI (6), the stable bit (24).
        for bit in [0, 1, 3, 5, 6, 24] {
            assert_ne!(eax & (1 << bit), 0, "KVM PV feature bit {bit} hidden");
        }
    }

    #[test]
    fn kvm_lapic_features_hidden_only_from_a_userspace_lapic() {
        let supported = [CpuidEntry {
            function: KVM_CPUID_FEATURES,
            eax: u32::MAX,
            ..Default::default()
        }];
        let mut policy = CpuidPolicy::new(1, false);
        let eax = policy.apply(&supported, 0)[0].eax;
        assert_eq!(
            eax & KVM_PV_NEED_HYPERVISOR_LAPIC,
            KVM_PV_NEED_HYPERVISOR_LAPIC
        );
        policy.hypervisor_lapic = false;
        let eax = policy.apply(&supported, 0)[0].eax;
        for bit in [4, 6, 10, 14] {
            assert_eq!(eax & (1 << bit), 0, "KVM PV feature bit {bit} offered");
        }
        // kvmclock (0, 3), steal time (5) and the stable bit (24) need no LAPIC.
        for bit in [0, 3, 5, 24] {
            assert_ne!(eax & (1 << bit), 0, "KVM PV feature bit {bit} hidden");
        }
    }

    #[test]
    fn x2apic_shown_with_dash_x_and_features_hide_by_name() {
        let supported = [leaf(1, 0, 0, u32::MAX)];
        let mut policy = CpuidPolicy::new(1, true);
        assert_ne!(policy.apply(&supported, 0)[0].ecx & (1 << 21), 0);
        policy.hide("x2apic").unwrap();
        assert_eq!(policy.apply(&supported, 0)[0].ecx & (1 << 21), 0);
        assert_eq!(
            policy.hide("warp-drive"),
            Err(CpuidError::UnknownFeature("warp-drive".into()))
        );
    }
}
