//! Interrupt delivery and routing, in both interrupt-controller modes.
//!
//! This host delivers interrupts to ring-0 code only in real mode (DESIGN.md), so end-to-end
//! delivery runs in a real-mode guest; routing is read back from the controllers' registers
//! by a protected-mode guest with interrupts off.

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
