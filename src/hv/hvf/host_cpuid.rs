//! The CPUID leaves a Hypervisor.framework guest starts from: the host's own (the framework
//! has no "supported CPUID" call; xhyve also starts from the host's and masks). The policy
//! in `crate::arch::x86_64::cpuid` and the VMX layer then hide what we do not emulate. Portable: the
//! walk over leaves and subleaves is tested on Linux with the real and a scripted CPUID.

use crate::arch::x86_64::cpuid::CpuidEntry;

/// Highest basic and extended leaves collected; beyond them a CPU reports reserved zeros.
const MAX_BASIC: u32 = 0x20;
const MAX_EXTENDED: u32 = 0x8000_0020;
/// Cap on the subleaves of one leaf, against a CPU that never reports an end.
const MAX_SUBLEAVES: u32 = 64;

/// Every leaf and subleaf `cpuid(function, index) -> [eax, ebx, ecx, edx]` reports.
pub fn collect(cpuid: impl Fn(u32, u32) -> [u32; 4]) -> Vec<CpuidEntry> {
    let mut entries = Vec::new();
    for range in [0, 0x8000_0000] {
        let top = match range {
            0 => cpuid(0, 0)[0].min(MAX_BASIC),
            _ => cpuid(range, 0)[0].clamp(range, MAX_EXTENDED),
        };
        for function in range..=top {
            push_leaf(&cpuid, function, &mut entries);
        }
    }
    entries
}

fn push_leaf(cpuid: &impl Fn(u32, u32) -> [u32; 4], function: u32, out: &mut Vec<CpuidEntry>) {
    let entry = |index: u32, index_significant: bool| {
        let [eax, ebx, ecx, edx] = cpuid(function, index);
        CpuidEntry {
            function,
            index,
            index_significant,
            eax,
            ebx,
            ecx,
            edx,
        }
    };
    match function {
        // Cache parameters: until the cache type (EAX[4:0]) is "no more caches".
        4 => {
            for index in 0..MAX_SUBLEAVES {
                let e = entry(index, true);
                if e.eax & 0x1f == 0 {
                    break;
                }
                out.push(e);
            }
        }
        // Topology: until the level type (ECX[15:8]) is invalid; subleaf 0 always.
        0xb | 0x1f => {
            for index in 0..MAX_SUBLEAVES {
                let e = entry(index, true);
                if index > 0 && (e.ecx >> 8) & 0xff == 0 {
                    break;
                }
                out.push(e);
            }
        }
        // Structured features, processor trace: subleaf 0's EAX is the last subleaf.
        7 | 0x14 => {
            let first = entry(0, true);
            let last = first.eax.min(MAX_SUBLEAVES - 1);
            out.push(first);
            out.extend((1..=last).map(|index| entry(index, true)));
        }
        // XSAVE: 0 and 1, then one subleaf per state component the CPU supports.
        0xd => {
            let first = entry(0, true);
            let components = u64::from(first.eax) | (u64::from(first.edx) << 32);
            out.push(first);
            out.push(entry(1, true));
            out.extend(
                (2..MAX_SUBLEAVES)
                    .filter(|&i| components & (1 << i) != 0)
                    .map(|index| entry(index, true)),
            );
        }
        _ => out.push(entry(0, false)),
    }
}

/// The CPUID of the CPU this runs on.
#[cfg(target_arch = "x86_64")]
pub fn host() -> Vec<CpuidEntry> {
    collect(|function, index| {
        // Older toolchains declare __cpuid_count unsafe, newer ones safe.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
        let r = unsafe { std::arch::x86_64::__cpuid_count(function, index) };
        [r.eax, r.ebx, r.ecx, r.edx]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU with basic leaves up to 0xd, extended up to 0x80000001, three caches, two
    /// topology levels, leaf 7 with one extra subleaf and XSAVE components 0, 1, 2 and 5.
    fn scripted(function: u32, index: u32) -> [u32; 4] {
        match (function, index) {
            (0, _) => [0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69],
            (4, 0..=2) => [0x21 + index, 0, 0, 0],
            (4, _) => [0, 0, 0, 0],
            (7, 0) => [1, 0xaa, 0, 0],
            (7, 1) => [0x10, 0, 0, 0],
            (0xb, 0) => [1, 2, 0x100, 0],
            (0xb, 1) => [4, 8, 0x201, 0],
            (0xb, _) => [0, 0, index, 0],
            (0xd, 0) => [0b10_0111, 0x240, 0x340, 0],
            (0xd, i) => [i, 0, 0, 0],
            (0x8000_0000, _) => [0x8000_0001, 0, 0, 0],
            (f, _) => [f, 0, 0, 0],
        }
    }

    fn subleaves(entries: &[CpuidEntry], function: u32) -> Vec<u32> {
        entries
            .iter()
            .filter(|e| e.function == function)
            .map(|e| e.index)
            .collect()
    }

    #[test]
    fn walks_every_leaf_and_the_subleaves_each_kind_reports() {
        let entries = collect(scripted);
        let functions: Vec<u32> = entries.iter().map(|e| e.function).collect();
        assert!(functions.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(subleaves(&entries, 4), vec![0, 1, 2]);
        assert_eq!(subleaves(&entries, 7), vec![0, 1]);
        assert_eq!(subleaves(&entries, 0xb), vec![0, 1]);
        assert_eq!(subleaves(&entries, 0xd), vec![0, 1, 2, 5]);
        assert_eq!(
            subleaves(&entries, 0xe),
            Vec::<u32>::new(),
            "past the basic maximum"
        );
        assert_eq!(subleaves(&entries, 0x8000_0001), vec![0]);
        assert_eq!(subleaves(&entries, 0x8000_0002), Vec::<u32>::new());
        let leaf1 = entries.iter().find(|e| e.function == 1).unwrap();
        assert!(!leaf1.index_significant);
        assert!(entries
            .iter()
            .filter(|e| [4, 7, 0xb, 0xd].contains(&e.function))
            .all(|e| e.index_significant));
        let vendor = entries[0];
        assert_eq!(
            (vendor.ebx, vendor.edx, vendor.ecx),
            (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
        );
    }

    #[test]
    fn a_cpu_reporting_absurd_maxima_is_capped() {
        let entries = collect(|function, index| match function {
            0 => [u32::MAX, 0, 0, 0],
            0x8000_0000 => [u32::MAX, 0, 0, 0],
            7 => [u32::MAX, 0, 0, 0],
            0xb => [0, 0, 0x100 | index, 0],
            _ => [0x1f, 0, 0, 0],
        });
        assert_eq!(subleaves(&entries, 7).len(), MAX_SUBLEAVES as usize);
        assert_eq!(subleaves(&entries, 0xb).len(), MAX_SUBLEAVES as usize);
        assert!(
            entries
                .iter()
                .all(|e| e.function <= MAX_BASIC
                    || (0x8000_0000..=MAX_EXTENDED).contains(&e.function))
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_host_has_a_vendor_and_feature_leaf() {
        let entries = host();
        assert_eq!((entries[0].function, entries[0].index), (0, 0));
        assert!(entries.iter().any(|e| e.function == 1));
        assert!(entries.iter().any(|e| e.function == 0x8000_0000));
    }
}
