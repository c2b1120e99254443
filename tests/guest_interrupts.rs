//! Interrupt delivery and routing, in both interrupt-controller modes.
//!
//! This host delivers interrupts to ring-0 code only in real mode (DESIGN.md), so end-to-end
//! delivery runs in a real-mode guest, or in a long-mode guest that waits in ring 3 (the `lm-*`
//! tests); routing is read back from the controllers' registers by a protected-mode guest with
//! interrupts off.

#[macro_use]
mod common;

use common::{IrqChip, Vm};
use std::time::Instant;

/// "rm-pit N ticks in US us" -> (N, US).
fn parse_rm_pit(line: &str) -> Option<(u32, u32)> {
    let rest = line.strip_prefix("rm-pit ")?;
    let (ticks, rest) = rest.split_once(" ticks in ")?;
    let us = rest.strip_suffix(" us")?;
    Some((ticks.parse().ok()?, us.parse().ok()?))
}

guest_test!(
    pit_interrupts_reach_a_real_mode_handler_at_their_rate,
    |mode| {
        let outcome = Vm::multiboot("rm-pit").irqchip(mode).run();
        outcome.assert_exit(1);
        let (ticks, us) = outcome
            .lines()
            .find_map(parse_rm_pit)
            .unwrap_or_else(|| panic!("no rm-pit line\n{outcome}"));
        assert_eq!(ticks, 50, "{outcome}");
        // 50 periods of 10 ms, timed by the PM timer from the first tick to the last. Ticks the
        // VMM delivers late stretch the interval; on a loaded 2-core host a few ms of scheduling
        // delay per period is possible, never a shorter interval: allow -2% .. +20%.
        assert!(
            (490_000..=600_000).contains(&us),
            "50 ticks at 100 Hz took {us} us\n{outcome}"
        );
        eprintln!("{mode:?}: 50 PIT ticks at 100 Hz in {us} us");
    }
);

/// "rm-rtc N ticks in US us" -> (N, US).
fn parse_rm_rtc(line: &str) -> Option<(u32, u32)> {
    parse_rm_pit(&line.replace("rm-rtc ", "rm-pit "))
}

guest_test!(
    rtc_periodic_interrupts_reach_a_real_mode_handler_at_their_rate,
    |mode| {
        let outcome = Vm::multiboot("rm-rtc").irqchip(mode).run();
        outcome.assert_exit(1);
        let (ticks, us) = outcome
            .lines()
            .find_map(parse_rm_rtc)
            .unwrap_or_else(|| panic!("no rm-rtc line\n{outcome}"));
        assert_eq!(ticks, 32, "{outcome}");
        // The handler read register C with IRQF and PF set: the interrupt came from the RTC's
        // periodic flag, not from anything else on IRQ 8.
        outcome.assert_line("rm-rtc register c c0");
        // 32 periods of 15.625 ms (64 Hz) = 500 ms between the first and last handler runs on
        // the PM timer. The VMM's timer thread keeps the period's phase, so lateness does not
        // accumulate; only the first and the last tick's lateness count, either way, and a
        // period the host missed entirely is dropped (+15.6 ms). On a loaded 2-core host allow
        // -10% .. +20%: still far from the neighbouring rates (250 ms at 128 Hz, 1 s at 32 Hz).
        assert!(
            (450_000..=600_000).contains(&us),
            "32 RTC ticks at 64 Hz took {us} us\n{outcome}"
        );
        eprintln!("{mode:?}: 32 RTC periodic ticks at 64 Hz in {us} us");
    }
);

/// "rm-lapic N ticks in US us" -> (N, US).
fn parse_rm_lapic(line: &str) -> Option<(u32, u32)> {
    parse_rm_pit(&line.replace("rm-lapic ", "rm-pit "))
}

guest_test!(
    lapic_timer_interrupts_reach_a_real_mode_handler_at_their_rate,
    |mode| {
        let outcome = Vm::multiboot("rm-lapic").irqchip(mode).run();
        outcome.assert_exit(1);
        let (ticks, us) = outcome
            .lines()
            .find_map(parse_rm_lapic)
            .unwrap_or_else(|| panic!("no rm-lapic line\n{outcome}"));
        assert_eq!(ticks, 20, "{outcome}");
        // The guest programs divide-by-16 and an initial count of 625,000. KVM's LAPIC counts
        // at 1 GHz (10 ms periods); ours at 100 MHz as xhyve's does (100 ms periods). Guests
        // calibrate the rate, so the modes may differ; each must keep its own.
        let expected_us = match mode {
            IrqChip::Kernel => 20 * 10_000,
            IrqChip::User => 20 * 100_000,
        };
        // Periodic timers re-arm from their deadline, so only the first and the last tick's
        // lateness count: -10% .. +20% of the span, as for the RTC.
        let range = expected_us * 9 / 10..=expected_us * 12 / 10;
        assert!(
            range.contains(&us),
            "20 LAPIC timer ticks took {us} us, expected {expected_us}\n{outcome}"
        );
        eprintln!("{mode:?}: 20 LAPIC timer ticks in {us} us (nominal {expected_us})");
    }
);

guest_test!(
    hpet_interrupts_reach_a_real_mode_handler_through_the_ioapic_at_their_rate,
    |mode| {
        let outcome = Vm::multiboot("rm-hpet").irqchip(mode).run();
        outcome.assert_exit(1);
        let (ticks, us) = outcome
            .lines()
            .find_map(|l| parse_rm_pit(&l.replace("rm-hpet ", "rm-pit ")))
            .unwrap_or_else(|| panic!("no rm-hpet line\n{outcome}"));
        assert_eq!(ticks, 20, "{outcome}");
        // 20 periods of 10 ms = 200 ms. The HPET re-arms periodic comparators from the
        // comparator, not from when it fired, so as for the RTC only the first and last
        // tick's lateness count: -10% .. +20%.
        assert!(
            (180_000..=240_000).contains(&us),
            "20 HPET ticks at 100 Hz took {us} us\n{outcome}"
        );
        eprintln!("{mode:?}: 20 HPET periodic ticks at 100 Hz in {us} us");
    }
);

guest_test!(an_ipi_runs_the_handler_on_the_other_cpu, |mode| {
    // The AP waits in real mode; the BSP sends three fixed IPIs of one vector, each after the
    // last was handled.
    let outcome = Vm::multiboot("rm-ipi").irqchip(mode).vcpus(2).run();
    outcome
        .assert_exit(1)
        .assert_line("rm-ipi cpu1 waiting")
        .assert_line("rm-ipi handled 3");
    // Our LAPIC (user mode) holds the vector in the ISR while the handler runs, so the second
    // and third IPIs arrive only because the handler's EOI retired the first (checked: with
    // the EOI removed, user mode handles 1). KVM's in-kernel LAPIC on this host (kvm_pvm,
    // real mode) shows the ISR bit clear inside the handler and delivers repeats without an
    // EOI, so there the test proves delivery only.
    if mode == IrqChip::User {
        outcome.assert_line("rm-ipi in service in the handler 1");
    }
});

guest_test!(
    pm_timer_runs_at_its_nominal_rate_against_the_host_clock,
    |mode| {
        let mut vm = Vm::multiboot("pm-rate").irqchip(mode).spawn();
        vm.wait_for_line("pm-rate start");
        let start = Instant::now();
        vm.wait_for_line("pm-rate end");
        let host_ms = start.elapsed().as_millis();
        let outcome = vm.finish();
        outcome.assert_exit(1);
        // The guest waited 7,159,090 PM ticks: 2000 ms at 3.579545 MHz. The host sees each
        // marker up to 20 ms late (the harness polls output every 20 ms), plus serial and pipe
        // latency on a loaded host: +-5% (100 ms) holds that and still catches a PM timer off by
        // a clock-domain mistake (a 1.19 MHz or 1 GHz count, or ms for us).
        assert!(
            (1900..=2100).contains(&host_ms),
            "2000 ms of PM timer took {host_ms} ms on the host\n{outcome}"
        );
        eprintln!("{mode:?}: 2000 ms of PM timer in {host_ms} ms of host time");
    }
);

guest_test!(routing_reads_back_from_the_controllers, |mode| {
    let mut vm = Vm::multiboot("routing").irqchip(mode).args(["-A"]).spawn();
    vm.wait_for_line("ready");
    vm.signal(libc::SIGTERM);
    vm.finish()
        .assert_exit(1)
        .assert_line("masked pin vector pending 0")
        .assert_line("pic irr irq4 1")
        .assert_line("level pin remote irr before 0")
        .assert_line("level pin remote irr 1")
        .assert_line("level pin vector pending 1");
});

#[test]
fn rm_pit_line_parser() {
    assert_eq!(
        parse_rm_pit("rm-pit 50 ticks in 500123 us"),
        Some((50, 500_123))
    );
    assert_eq!(
        parse_rm_rtc("rm-rtc 32 ticks in 500000 us"),
        Some((32, 500_000))
    );
    assert_eq!(parse_rm_pit("rm-pit 50 ticks"), None);
}

// Long mode, waiting in ring 3 (test/guests/ring3.h): the only way a protected/long-mode guest
// takes interrupts on this host. The handlers run at CPL0, count, EOI and iretq back.

// Tolerances of the long-mode rates: -10% .. +40% of the nominal span. Wider than the
// real-mode tests' because the ring-3 waiter cannot halt (hlt is CPL0, and CPL0 cannot take
// interrupts here), so each VM keeps a host core busy while it waits and the VMM's timer
// thread is sometimes late by a period or more: 20 HPET periods measured 190-200 ms alone,
// 240-310 ms with two such VMs at once on the 2-core host (real-mode guests, which halt,
// stayed at 210 ms), and one 50-tick PIT run took +63% while other work loaded the host to
// 7. So the spinning tests of this file run one at a time (`one_spinner`), late ticks get
// +40%, and a rate outside that gets one more run.
// KVM's in-kernel PIT re-injects late ticks back to back, which shortens the span instead
// (measured -7% when the guest started the PIT before its 30 ms of table setup). A wrong
// clock domain or divider is still far outside: 2x, 10x, 1/2.

/// Serialises the guests that spin in ring 3 (see above). A failed test poisons the lock;
/// the others still run.
fn one_spinner() -> std::sync::MutexGuard<'static, ()> {
    static SPINNER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SPINNER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// 50 PIT periods of 10 ms.
const LM_PIT_US: std::ops::RangeInclusive<u32> = 450_000..=700_000;

/// "<name> N ticks in US us" -> (N, US).
fn parse_ticks(line: &str, name: &str) -> Option<(u32, u32)> {
    parse_rm_pit(&line.replacen(&format!("{name} "), "rm-pit ", 1))
}

/// Runs a long-mode timer test and checks its tick count, its rate (first to last handler run
/// on the PM timer, within `us_range`) and its EOIs. A rate outside the range gets one more
/// run: a load spike on the shared host stretches one run (above), a wrong rate fails both.
fn long_mode_timer(
    mode: IrqChip,
    cmdline: &str,
    name: &str,
    ticks: u32,
    us_range: std::ops::RangeInclusive<u32>,
) -> common::Outcome {
    let mut attempts = Vec::new();
    loop {
        let outcome = {
            let _spinning = one_spinner();
            Vm::multiboot(cmdline).irqchip(mode).run()
        };
        outcome.assert_exit(1);
        let (got, us) = outcome
            .lines()
            .find_map(|l| parse_ticks(l, name))
            .unwrap_or_else(|| panic!("no {name} line\n{outcome}"));
        assert_eq!(got, ticks, "{outcome}");
        // Each tick after the first arrived only after the previous handler's EOI (edge
        // interrupts of one vector wait while it is in service), and after the last EOI
        // nothing is left in service.
        outcome.assert_line(&format!("{name} in service after eoi 0"));
        // Our LAPIC shows the vector in service inside the handler. KVM's in-kernel LAPIC on
        // this host (kvm_pvm) shows the ISR bit clear there, as in the real-mode `rm-ipi` test.
        if mode == IrqChip::User && !cmdline.contains("pic") {
            outcome.assert_line(&format!("{name} in service in the handler 1"));
        }
        attempts.push(us);
        if us_range.contains(&us) {
            eprintln!("{mode:?}: {ticks} {name} ticks in {us} us (runs: {attempts:?})");
            return outcome;
        }
        assert!(
            attempts.len() < 2,
            "{ticks} {name} ticks took {attempts:?} us in two runs, expected {us_range:?}\n{outcome}"
        );
    }
}

guest_test!(
    pit_interrupts_through_the_8259_reach_a_ring3_waiting_long_mode_guest,
    |mode| {
        long_mode_timer(mode, "lm-pit pic", "lm-pit", 50, LM_PIT_US);
    }
);

// The PIT through IOAPIC pin 2, where the MADT's interrupt source override (ISA IRQ 0 ->
// GSI 2) and the MP table put it. KVM's in-kernel PIT raises GSI 0, which our GSI routing
// table sends to pin 2 (KVM's default table would send it to pin 0).
guest_test!(
    pit_interrupts_through_ioapic_pin_2_reach_a_ring3_waiting_long_mode_guest,
    |mode| {
        long_mode_timer(mode, "lm-pit", "lm-pit", 50, LM_PIT_US);
    }
);

guest_test!(
    rtc_periodic_interrupts_reach_a_ring3_waiting_long_mode_guest,
    |mode| {
        // 32 periods of 15.625 ms = 500 ms; still clear of 128 Hz (250 ms) and 32 Hz (1 s).
        let outcome = long_mode_timer(mode, "lm-rtc", "lm-rtc", 32, 450_000..=700_000);
        // IRQF | PF: the interrupts came from the periodic flag, and the handler's read of C
        // re-armed it (without it the RTC raises no further IRQ 8 and the count falls short).
        outcome.assert_line("lm-rtc register c c0");
    }
);

guest_test!(
    lapic_timer_interrupts_reach_a_ring3_waiting_long_mode_guest,
    |mode| {
        // Divide 16, count 625,000: 10 ms periods on KVM's LAPIC (1 GHz), 100 ms on ours
        // (100 MHz, as xhyve).
        let expected_us = match mode {
            IrqChip::Kernel => 20 * 10_000,
            IrqChip::User => 20 * 100_000,
        };
        long_mode_timer(
            mode,
            "lm-lapic",
            "lm-lapic",
            20,
            expected_us * 9 / 10..=expected_us * 7 / 5,
        );
    }
);

guest_test!(
    hpet_interrupts_reach_a_ring3_waiting_long_mode_guest,
    |mode| {
        // 20 periods of 10 ms.
        long_mode_timer(mode, "lm-hpet", "lm-hpet", 20, 180_000..=280_000);
    }
);

guest_test!(
    a_level_pin_still_high_after_eoi_is_delivered_again_in_long_mode,
    |mode| {
        // The SCI (GSI 9, level) after the power button: the handler EOIs without clearing
        // PWRBTN_STS, so the IOAPIC must deliver again while the line stays high. The third
        // run masks the pin before its EOI.
        let _spinning = one_spinner();
        let mut vm = Vm::multiboot("lm-level").irqchip(mode).args(["-A"]).spawn();
        vm.wait_for_line("ready");
        vm.signal(libc::SIGTERM);
        let outcome = vm.finish();
        outcome
            .assert_exit(1)
            .assert_line("lm-level masked 1")
            .assert_line("lm-level line still high 1");
        let deliveries: u32 = outcome
            .lines()
            .find_map(|l| l.strip_prefix("lm-level deliveries ")?.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no deliveries line
{outcome}"
                )
            });
        if mode == IrqChip::User {
            // Exactly three: each repeat waited for the previous handler's EOI, and the
            // third run's mask stopped them. Remote IRR was set while the handler ran and
            // the last EOI cleared it although the line is still high (masked: not re-sent).
            assert_eq!(deliveries, 3, "{outcome}");
            outcome
                .assert_line("lm-level remote irr in the handler 1")
                .assert_line("lm-level in service in the handler 1")
                .assert_line("lm-level remote irr after eoi 0");
        } else {
            // This host's in-kernel LAPIC (kvm_pvm) shows no ISR bit in the handler and
            // remote IRR either way (measured 1 and 0), and a fourth delivery can already be
            // pending when the third handler masks the pin: the repeats are the proof.
            assert!((3..=4).contains(&deliveries), "{outcome}");
        }
    }
);

#[test]
fn ticks_line_parser() {
    assert_eq!(
        parse_ticks("lm-hpet 20 ticks in 200000 us", "lm-hpet"),
        Some((20, 200_000))
    );
    assert_eq!(parse_ticks("lm-pit 50 ticks in 1 us", "lm-hpet"), None);
}

guest_test!(
    an_ipi_runs_the_handler_on_the_other_cpu_waiting_in_ring3,
    |mode| {
        // cpu1 goes to long mode (lm_ap.S, its own TSS) and waits in ring 3; the BSP sends three
        // fixed IPIs, each after the last was handled. The handler reads its CPU's APIC ID.
        let outcome = {
            let _spinning = one_spinner();
            Vm::multiboot("lm-ipi").irqchip(mode).vcpus(2).run()
        };
        outcome
            .assert_exit(1)
            .assert_line("lm-ipi cpu1 waiting")
            .assert_line("lm-ipi handled 3")
            .assert_line("lm-ipi handler on apic 1")
            .assert_line("lm-ipi cpu1 left ring 3 1");
        // As for rm-ipi: our LAPIC holds the vector in service while the handler runs, so the
        // second and third IPIs arrive only because the handler's EOI retired the first; KVM's
        // in-kernel LAPIC on this host shows the ISR bit clear inside the handler.
        if mode == IrqChip::User {
            outcome.assert_line("lm-ipi in service in the handler 1");
        }
    }
);
