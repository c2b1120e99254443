//! The test guest (`test/guests`) booted by the real `xhyve` binary: exit codes, COM1, PCI
//! config space, RTC, RAM above 4 GiB, a second vCPU, strict I/O and the pid file.

#[macro_use]
mod common;

use common::{run_xhyve, IrqChip, Vm};
use std::time::{SystemTime, UNIX_EPOCH};

guest_test!(hello_over_com1, |mode| {
    Vm::multiboot("hello")
        .irqchip(mode)
        .run()
        .assert_exit(1)
        .assert_line("hello from guest");
});

/// Runs the guest command `how` and checks its announcement and xhyve's exit code.
fn guest_exit(mode: IrqChip, how: &str, code: i32) {
    Vm::multiboot(how)
        .irqchip(mode)
        .run()
        .assert_exit(code)
        .assert_line(&format!("exit {how}"));
}

guest_test!(acpi_poweroff_exits_1, |mode| guest_exit(
    mode, "poweroff", 1
));
guest_test!(reset_via_cf9_exits_0, |mode| guest_exit(mode, "reset", 0));
guest_test!(reset_via_keyboard_controller_exits_0, |mode| guest_exit(
    mode,
    "reset-kbd",
    0
));
guest_test!(halt_with_interrupts_off_exits_2, |mode| guest_exit(
    mode, "halt", 2
));
guest_test!(triple_fault_exits_3, |mode| guest_exit(
    mode,
    "triplefault",
    3
));

/// The guest's `pci ...` lines, in scan order.
fn pci_functions(mode: IrqChip, slots: &[&str]) -> Vec<String> {
    let outcome = Vm::multiboot("pciscan").irqchip(mode).pci(slots).run();
    outcome.assert_exit(1).assert_line("pciscan done");
    outcome
        .lines()
        .filter(|l| l.starts_with("pci "))
        .map(str::to_owned)
        .collect()
}

guest_test!(pci_scan_default_layout, |mode| {
    assert_eq!(
        pci_functions(mode, &["0:0,hostbridge", "31,lpc"]),
        [
            "pci 00:00.0 1275:1275 class 060000",
            "pci 00:1f.0 8086:7000 class 060100",
        ]
    );
});

guest_test!(pci_scan_other_layout, |mode| {
    // Nothing in slot 0; bus:slot:function syntax; the AMD host bridge's IDs.
    assert_eq!(
        pci_functions(mode, &["3,hostbridge", "0:7:0,lpc", "5,amd_hostbridge"]),
        [
            "pci 00:03.0 1275:1275 class 060000",
            "pci 00:05.0 1022:7432 class 060000",
            "pci 00:07.0 8086:7000 class 060100",
        ]
    );
});

/// A time zone far from UTC (and without DST), so local and UTC RTC modes differ.
const TEST_TZ: &str = "XST-5:30";
const TEST_TZ_OFFSET_SECS: i64 = 5 * 3600 + 30 * 60;
/// Guest start-up time does not count: the bounds are taken around the whole run.
const RTC_SLACK_SECS: i64 = 3;

fn unix_now() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("host clock before 1970");
    i64::try_from(since_epoch.as_secs()).expect("host clock out of range")
}

/// Days from 1970-01-01 to the proleptic Gregorian date `y-m-d`.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let shifted_month = (month + 9) % 12; // March = 0
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Parses `rtc YYYY-MM-DD HH:MM:SS` into seconds since the epoch of that wall clock.
fn parse_rtc_line(line: &str) -> Option<i64> {
    let rest = line.strip_prefix("rtc ")?;
    let (date, time) = rest.split_once(' ')?;
    let date: Vec<i64> = date
        .split('-')
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let time: Vec<i64> = time
        .split(':')
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let (&[year, month, day], &[hour, minute, second]) = (&date[..], &time[..]) else {
        return None;
    };
    let valid = (1..=12).contains(&month)
        && (1..=31).contains(&day)
        && (0..24).contains(&hour)
        && (0..60).contains(&minute)
        && (0..60).contains(&second);
    valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Boots the rtc guest under `TEST_TZ` and checks it read host time plus `offset_secs`.
fn rtc_matches_host(mode: IrqChip, extra_args: &[&str], offset_secs: i64) {
    let before = unix_now();
    let outcome = Vm::multiboot("rtc")
        .irqchip(mode)
        .env("TZ", TEST_TZ)
        .args(extra_args)
        .run();
    let after = unix_now();
    outcome.assert_exit(1);
    let line = outcome
        .lines()
        .find(|l| l.starts_with("rtc "))
        .unwrap_or_else(|| panic!("no rtc line\n{outcome}"));
    let guest = parse_rtc_line(line).unwrap_or_else(|| panic!("bad rtc line {line:?}"));
    let earliest = before + offset_secs - RTC_SLACK_SECS;
    let latest = after + offset_secs + RTC_SLACK_SECS;
    assert!(
        (earliest..=latest).contains(&guest),
        "guest RTC {line:?} is {}s from host time (allowed window {}s..{}s)\n{outcome}",
        guest - (before + offset_secs),
        -RTC_SLACK_SECS,
        after - before + RTC_SLACK_SECS,
    );
}

guest_test!(rtc_keeps_local_time, |mode| {
    rtc_matches_host(mode, &[], TEST_TZ_OFFSET_SECS);
});

guest_test!(rtc_keeps_utc_with_u, |mode| {
    rtc_matches_host(mode, &["-u"], 0);
});

/// Boots the highmem guest with `-m memory` and checks where it found RAM above 4 GiB.
fn high_ram(mode: IrqChip, memory: &str, expected_range: &str) {
    Vm::multiboot("highmem")
        .irqchip(mode)
        .memory(memory)
        .run()
        .assert_exit(1)
        .assert_line(&format!("highmem ram {expected_range}"))
        .assert_line("highmem ok");
}

guest_test!(ram_above_4g_with_5g, |mode| {
    // [0, 3G) low, the rest from 4 GiB.
    high_ram(mode, "5G", "0000000100000000-0000000180000000");
});

guest_test!(ram_above_4g_with_8g, |mode| {
    // xhyve issue #37 was a 3 GiB cap.
    high_ram(mode, "8G", "0000000100000000-0000000240000000");
});

guest_test!(second_vcpu_starts_with_init_sipi, |mode| {
    let outcome = Vm::multiboot("smp").irqchip(mode).vcpus(2).run();
    outcome.assert_exit(1);
    let lines: Vec<&str> = outcome.lines().collect();
    let cpu1 = lines.iter().position(|l| *l == "cpu1 up");
    let done = lines.iter().position(|l| *l == "smp ok");
    assert!(
        matches!((cpu1, done), (Some(a), Some(b)) if a < b),
        "expected \"cpu1 up\" then \"smp ok\"\n{outcome}"
    );
});

guest_test!(unhandled_port_reads_all_ones, |mode| {
    Vm::multiboot("ports")
        .irqchip(mode)
        .run()
        .assert_exit(1)
        .assert_line("port 0x1234 = ffffffff");
});

guest_test!(unhandled_port_with_e_exits_4, |mode| {
    let outcome = Vm::multiboot("ports").irqchip(mode).args(["-e"]).run();
    outcome.assert_exit(4);
    assert!(
        outcome.stderr.contains("0x1234") && outcome.stderr.contains("RIP"),
        "stderr should name port 0x1234 and the RIP\n{outcome}"
    );
    assert!(
        !outcome.lines().any(|l| l.starts_with("port 0x1234")),
        "the access should have stopped the guest\n{outcome}"
    );
});

guest_test!(com1_input_reaches_guest_and_pidfile_lives_with_vm, |mode| {
    let dir = std::env::temp_dir().join(format!(
        "xhyve-pidfile-{}-{}",
        std::process::id(),
        mode.env_value()
    ));
    std::fs::create_dir_all(&dir).expect("create pidfile dir");
    let pidfile = dir.join("xhyve.pid");
    let _ = std::fs::remove_file(&pidfile);

    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .args(["-F".as_ref(), pidfile.as_os_str()])
        .stdin_piped()
        .spawn();
    vm.wait_for_line("ready");
    let contents = std::fs::read_to_string(&pidfile)
        .unwrap_or_else(|e| panic!("pidfile {} while running: {e}", pidfile.display()));
    // Byte for byte as xhyve writes it: no newline (docker-machine-driver-xhyve parses it
    // with strconv.ParseInt and no trim).
    assert_eq!(
        contents,
        vm.pid().to_string(),
        "pidfile contents {contents:?}"
    );
    vm.send(b"Z");
    vm.finish().assert_exit(1).assert_line("got Z");
    assert!(
        !pidfile.exists(),
        "pidfile {} should be removed on exit",
        pidfile.display()
    );
    let _ = std::fs::remove_dir(&dir);
});

#[test]
fn missing_kernel_exits_1_naming_path() {
    if !common::kvm_usable() {
        return;
    }
    let missing = std::env::temp_dir().join("xhyve-test-no-such-dir/guest.elf");
    let mut firmware = std::ffi::OsString::from("multiboot,");
    firmware.push(&missing);
    firmware.push(",,hello");
    let outcome = Vm::with_firmware(firmware).run();
    outcome.assert_exit(1);
    assert!(
        outcome.stderr.contains(&*missing.to_string_lossy()),
        "stderr should name {}\n{outcome}",
        missing.display()
    );
}

#[test]
fn bad_memory_size_is_a_usage_error() {
    let outcome = run_xhyve(["-m", "lots", "-f", "multiboot,guest.elf,,hello"]);
    outcome.assert_exit(64);
    assert!(
        outcome.stderr.contains("lots"),
        "stderr should name the bad value\n{outcome}"
    );
}

#[test]
fn rtc_line_parser() {
    assert_eq!(parse_rtc_line("rtc 1970-01-01 00:00:00"), Some(0));
    assert_eq!(
        parse_rtc_line("rtc 2026-11-24 12:34:56"),
        Some(1_795_523_696)
    );
    assert_eq!(parse_rtc_line("rtc 2000-03-01 00:00:00"), Some(951_868_800));
    assert_eq!(parse_rtc_line("rtc 2026-13-24 12:34:56"), None);
    assert_eq!(parse_rtc_line("rtc 2026-11-24"), None);
    assert_eq!(parse_rtc_line("hello"), None);
}

guest_test!(x2apic_flag_enables_x2apic_mode, |mode| {
    Vm::multiboot("apicbase")
        .irqchip(mode)
        .run()
        .assert_exit(1)
        .assert_line("apicbase fee00900");
    Vm::multiboot("apicbase")
        .irqchip(mode)
        .args(["-x"])
        .run()
        .assert_exit(1)
        .assert_line("apicbase fee00d00");
});

guest_test!(unknown_msr_faults_unless_w, |mode| {
    // Without -w the #GP has no handler in this guest: a triple fault.
    Vm::multiboot("unknown-msr")
        .irqchip(mode)
        .run()
        .assert_exit(3)
        .assert_line("reading msr 0x2badc0de");
    Vm::multiboot("unknown-msr")
        .irqchip(mode)
        .args(["-w"])
        .run()
        .assert_exit(1)
        .assert_line("msr 0x2badc0de = 00000000");
});

guest_test!(cpu_pins_apply_to_vcpu_threads, |mode| {
    let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (first, second) = if host_cpus > 1 { (1, 0) } else { (0, 0) };
    let mut vm = Vm::multiboot("wait-input")
        .irqchip(mode)
        .vcpus(2)
        .args([
            "-p".to_string(),
            format!("0:{first}"),
            "-p".to_string(),
            format!("1:{second}"),
        ])
        .stdin_piped()
        .spawn();
    vm.wait_for_line("ready");
    let tasks = std::path::PathBuf::from(format!("/proc/{}/task", vm.pid()));
    let mut pinned = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(&tasks).expect("read /proc tasks") {
        let task = task.expect("task entry").path();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let allowed = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|v| v.trim().to_string());
        if name.trim().starts_with("vcpu") {
            pinned.insert(name.trim().to_string(), allowed.unwrap_or_default());
        }
    }
    vm.send(b"x");
    vm.finish().assert_exit(1);
    assert_eq!(
        pinned.get("vcpu0").map(String::as_str),
        Some(&*first.to_string())
    );
    assert_eq!(
        pinned.get("vcpu1").map(String::as_str),
        Some(&*second.to_string())
    );
});

guest_test!(
    hpet_counts_and_its_timer_interrupt_reaches_the_lapic,
    |mode| {
        Vm::multiboot("hpet")
            .irqchip(mode)
            .run()
            .assert_exit(1)
            .assert_line("hpet caps 8086a201 period 038d7ea4")
            .assert_line("hpet counts")
            .assert_line("hpet irq 0x40 pending");
    }
);

/// `-m 60T` used to fail with only KVM's "KVM_SET_USER_MEMORY_REGION failed: Invalid
/// argument"; the message must name -m and the size given.
#[test]
fn too_much_memory_names_m() {
    if !common::kvm_usable() {
        return;
    }
    for size in ["60T", "1P"] {
        let outcome = Vm::multiboot("hello").memory(size).run();
        outcome.assert_exit(1);
        assert!(
            outcome.stderr.contains(&format!("xhyve: -m {size}: ")),
            "{outcome}"
        );
    }
}

/// A disk image with a partial last sector works, and stderr says what the guest misses.
#[test]
fn a_partial_last_sector_is_reported() {
    if !common::kvm_usable() {
        return;
    }
    let path = std::env::temp_dir().join(format!("xhyve-partial-{}.img", std::process::id()));
    std::fs::write(&path, vec![0u8; 4096 + 100]).unwrap();
    let outcome = Vm::multiboot("hello")
        .args(["-s".into(), format!("2,virtio-blk,{}", path.display())])
        .run();
    outcome.assert_exit(1).assert_line("hello from guest");
    assert!(
        outcome
            .stderr
            .contains("not a whole number of 512-byte sectors"),
        "{outcome}"
    );
    let _ = std::fs::remove_file(&path);
}
