//! Userspace interrupt controllers and timers (xhyve's `vmm/io`), as plain models.
//!
//! No model here calls the hypervisor, sleeps or blocks: time comes from a `clock::Clock`,
//! timers report `next_deadline_ns()` and advance on `tick(now)`, and interrupts leave as
//! values or through small sink traits that the VMM connects.

/// The shortest period a guest-programmed periodic timer (HPET, LAPIC, PIT) fires at:
/// 100 us, 10 kHz. Without it a guest that programs a tiny period (a 60 ns HPET period, a
/// one-count LAPIC or PIT) makes the timer thread spin on a deadline that is always due. The
/// figure keeps every rate a real guest uses: the RTC's fastest periodic rate, 8192 Hz
/// (122 us), Linux's HZ=1000 tick and Windows' 0.5 ms multimedia timer run unchanged; only
/// rates no OS programs in practice are slowed down. KVM's in-kernel LAPIC and PIT enforce
/// a similar floor (its `min_timer_period_us`, 200 us); ours is lower so the RTC stays exact.
/// Missed periods coalesce, as for a late timer thread.
pub const MIN_PERIODIC_NS: u64 = 100_000;

/// How many periods of `period` (in any unit) make at least `min` (same unit): at least 1.
pub fn periods_at_least(period: u64, min: u64) -> u64 {
    min.div_ceil(period.max(1)).max(1)
}

pub mod clock;
pub mod hpet;
pub mod ioapic;
pub mod lapic;
pub mod msi;
pub mod pic;
pub mod pit;
pub mod pmtimer;
