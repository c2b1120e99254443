//! Slow tier: a real Debian kernel booted through `-f kexec`, as bzImage and as ELF vmlinux.
//!
//! On the build machines KVM emulates ring-0 guest code (about 1.4 million instructions a
//! second), so a whole boot takes far too long for a test; these tests assert the kernel's own
//! log through its early boot: the version banner, the e820 map `-m` produced, the command
//! line, the ACPI tables, the IOAPIC, the CPU count and the serial console. One of them goes on
//! past the instructions this host's KVM cannot emulate (the kernel's `xrstor`, `int3`,
//! `popcnt`, ...), which xhyve completes itself, until the second CPU is up.
//!
//! The kernel and initrd come from `test/build-linux-guest.sh` (`./test/run` runs it). Without
//! them the tests skip, unless `XHYVE_REQUIRE_KVM=1`, which makes them fail.

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{kvm_usable, Running, Vm};

/// Generous: the Debian kernel needs about a minute of emulated ring-0 time to reach its
/// first interrupt here, and a bzImage must first decompress itself.
const MILESTONE_TIMEOUT: Duration = Duration::from_secs(420);

const CMDLINE: &str = "earlyprintk=serial console=ttyS0 xhyve.test=commas,are,kept";

fn guest_file(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("test")
        .join(name);
    if path.exists() {
        return Some(path);
    }
    if std::env::var("XHYVE_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!(
            "{} is missing: run test/build-linux-guest.sh (./test/run does)",
            path.display()
        );
    }
    eprintln!(
        "skipping: {} is missing (run test/build-linux-guest.sh)",
        path.display()
    );
    None
}

/// The kernel and initrd, or `None` to skip.
fn linux(kernel: &str, initrd: &str) -> Option<(PathBuf, PathBuf)> {
    if !kvm_usable() {
        return None;
    }
    Some((guest_file(kernel)?, guest_file(initrd)?))
}

fn kexec(kernel: &Path, initrd: &Path) -> String {
    format!("kexec,{},{},{CMDLINE}", kernel.display(), initrd.display())
}

/// Waits until the guest's console shows every needle, in any order; panics with the console
/// so far if `xhyve` exits or time runs out first.
fn wait_for_all(vm: &mut Running, needles: &[&str]) -> String {
    let deadline = Instant::now() + MILESTONE_TIMEOUT;
    loop {
        let console = vm.stdout_so_far();
        let missing: Vec<&&str> = needles.iter().filter(|n| !console.contains(**n)).collect();
        if missing.is_empty() {
            return console;
        }
        if vm.has_exited() || Instant::now() >= deadline {
            panic!("the kernel never printed {missing:?}; console:\n{console}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn vmlinux_boots_past_the_hosts_emulator_gaps_with_acpi_and_two_cpus() {
    let Some((kernel, initrd)) = linux("vmlinux", "initrd.gz") else {
        return;
    };
    let mut vm = Vm::with_firmware(kexec(&kernel, &initrd))
        .memory("1G")
        .vcpus(2)
        .args(["-A"])
        .timeout(MILESTONE_TIMEOUT)
        .spawn();
    let console = wait_for_all(
        &mut vm,
        &[
            "Linux version ",
            &format!("Command line: {CMDLINE}"),
            "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
            "BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable",
            "printk: bootconsole [earlyser0] enabled",
            "ACPI: RSDP 0x00000000000E0000",
            "ACPI: XSDT ",
            "ACPI: FACP ",
            "ACPI: DSDT ",
            "ACPI: FACS ",
            "ACPI: APIC ",
            "ACPI: MCFG ",
            "ACPI: HPET ",
            "SMBIOS 2.8 present.",
            "DMI: xhyve xhyve",
            "found SMP MP-table at [mem 0x000f0000-0x000f000f]",
            "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
            "ACPI: Using ACPI (MADT) for SMP configuration information",
            "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
            &format!("Kernel command line: {CMDLINE}"),
            "printk: console [ttyS0] enabled",
            // Past here the kernel restores extended state (xrstor) and brings up the second
            // CPU: before xhyve completed what this host's KVM cannot emulate, it stopped
            // with exit 4 on the first xrstor.
            "Freeing SMP alternatives memory",
            "smp: Brought up 1 node, 2 CPUs",
        ],
    );
    assert!(
        !console.contains("BIOS-e820: [mem 0x0000000100000000"),
        "no RAM above 4 GiB with -m 1G:\n{console}"
    );
    // The kernel is still running: SIGINT stops xhyve at once with exit 1 (an instruction
    // xhyve could not complete would have ended it with exit 4 and a diagnostic).
    vm.signal(libc::SIGINT);
    let outcome = vm.finish();
    outcome.assert_exit(1);
    assert!(
        !outcome.stderr.contains("instruction bytes at RIP"),
        "{outcome}"
    );
}

#[test]
fn vmlinux_sees_ram_above_4g() {
    let Some((kernel, initrd)) = linux("vmlinux", "initrd.gz") else {
        return;
    };
    let mut vm = Vm::with_firmware(kexec(&kernel, &initrd))
        .memory("5G")
        .args(["-A"])
        .timeout(MILESTONE_TIMEOUT)
        .spawn();
    wait_for_all(
        &mut vm,
        &[
            "BIOS-e820: [mem 0x0000000000100000-0x00000000bfffffff] usable",
            "BIOS-e820: [mem 0x0000000100000000-0x000000017fffffff] usable",
            &format!("Command line: {CMDLINE}"),
        ],
    );
}

#[test]
fn vmlinux_with_mp_table_only() {
    let Some((kernel, initrd)) = linux("vmlinux", "initrd.gz") else {
        return;
    };
    // No -A: the MP table alone describes the two CPUs and the IOAPIC.
    let mut vm = Vm::with_firmware(kexec(&kernel, &initrd))
        .memory("1G")
        .vcpus(2)
        .timeout(MILESTONE_TIMEOUT)
        .spawn();
    wait_for_all(
        &mut vm,
        &[
            "Intel MultiProcessor Specification v1.4",
            "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
            "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
        ],
    );
}

#[test]
fn vmlinux_with_acpi_and_no_mp_table() {
    let Some((kernel, initrd)) = linux("vmlinux", "initrd.gz") else {
        return;
    };
    let mut vm = Vm::with_firmware(kexec(&kernel, &initrd))
        .memory("1G")
        .vcpus(2)
        .args(["-A", "-Y"])
        .timeout(MILESTONE_TIMEOUT)
        .spawn();
    let console = wait_for_all(
        &mut vm,
        &[
            "ACPI: Using ACPI (MADT) for SMP configuration information",
            "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
        ],
    );
    assert!(
        !console.contains("MultiProcessor Specification"),
        "{console}"
    );
}

#[test]
fn bzimage_decompresses_and_boots() {
    // The cloud kernel: lz4, so it decompresses in minutes under emulation (the generic
    // kernel's xz takes far longer here).
    let Some((kernel, initrd)) = linux("cloud/vmlinuz", "cloud/initrd.gz") else {
        return;
    };
    let mut vm = Vm::with_firmware(kexec(&kernel, &initrd))
        .memory("1G")
        .args(["-A"])
        .timeout(MILESTONE_TIMEOUT)
        .spawn();
    wait_for_all(
        &mut vm,
        &[
            "Linux version ",
            &format!("Command line: {CMDLINE}"),
            "BIOS-e820: [mem 0x0000000000100000-0x000000003fffffff] usable",
            "ACPI: RSDP 0x00000000000E0000",
        ],
    );
}
