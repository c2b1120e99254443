//! ACPI power-management timer: a free-running 24- or 32-bit counter at 3.579545 MHz.
//!
//! The guest reads it from the PM1 timer block (`PM_TMR_BLK`, 4 bytes). The counter is a pure
//! function of the injected clock, so reads need no state beyond the start time and are
//! deterministic in tests. Raising `TMR_STS` when the top bit toggles belongs to the PM1 event
//! block; `next_msb_toggle_ns` tells its owner when that happens.

use std::sync::Arc;

use super::clock::Clock;
use crate::devices::bus::BusDevice;

/// The ACPI PM timer frequency in Hz, fixed by the ACPI specification.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// Length of the PM timer register block in bytes.
pub const PM_TIMER_LEN: u64 = 4;

const NS_PER_SEC: u128 = 1_000_000_000;

/// The counter width, reported to the guest in the FADT (`TMR_VAL_EXT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmTimerWidth {
    Bits24,
    Bits32,
}

impl PmTimerWidth {
    fn mask(self) -> u64 {
        match self {
            PmTimerWidth::Bits24 => 0x00ff_ffff,
            PmTimerWidth::Bits32 => 0xffff_ffff,
        }
    }

    fn bits(self) -> u32 {
        match self {
            PmTimerWidth::Bits24 => 24,
            PmTimerWidth::Bits32 => 32,
        }
    }
}

pub struct PmTimer {
    clock: Arc<dyn Clock>,
    width: PmTimerWidth,
    start_ns: u64,
}

impl PmTimer {
    /// A timer that reads 0 at the clock's current time.
    pub fn new(clock: Arc<dyn Clock>, width: PmTimerWidth) -> Self {
        let start_ns = clock.now_ns();
        Self {
            clock,
            width,
            start_ns,
        }
    }

    pub fn width(&self) -> PmTimerWidth {
        self.width
    }

    /// Ticks since start, not yet truncated to the counter width.
    fn ticks_at(&self, now_ns: u64) -> u64 {
        let elapsed = u128::from(now_ns.saturating_sub(self.start_ns));
        (elapsed * u128::from(PM_TIMER_HZ) / NS_PER_SEC) as u64
    }

    /// The counter value the guest sees now.
    pub fn counter(&self) -> u32 {
        (self.ticks_at(self.clock.now_ns()) & self.width.mask()) as u32
    }

    /// The first time after `now_ns` at which the counter's top bit changes, i.e. when the
    /// PM1 `TMR_STS` bit must be set.
    pub fn next_msb_toggle_ns(&self, now_ns: u64) -> u64 {
        let half_period = 1u128 << (self.width.bits() - 1);
        let ticks = u128::from(self.ticks_at(now_ns));
        let next_tick = (ticks / half_period + 1) * half_period;
        let ns = (next_tick * NS_PER_SEC).div_ceil(u128::from(PM_TIMER_HZ));
        u64::try_from(ns)
            .unwrap_or(u64::MAX)
            .saturating_add(self.start_ns)
    }
}

impl BusDevice for PmTimer {
    /// Any aligned or unaligned slice of the 4-byte register reads the matching counter bytes.
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let bytes = self.counter().to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *out = usize::try_from(at)
                .ok()
                .and_then(|at| bytes.get(at).copied())
                .unwrap_or(0xff);
        }
    }

    /// The timer is read-only.
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::clock::ManualClock;

    fn timer(width: PmTimerWidth) -> (Arc<ManualClock>, PmTimer) {
        let clock = Arc::new(ManualClock::new(5_000));
        let timer = PmTimer::new(clock.clone(), width);
        (clock, timer)
    }

    #[test]
    fn counts_at_3_579545_mhz_from_creation() {
        let (clock, timer) = timer(PmTimerWidth::Bits32);
        assert_eq!(timer.counter(), 0);
        clock.advance(1_000_000_000);
        assert_eq!(timer.counter(), 3_579_545);
        clock.advance(1_000);
        // 1 us more is 3.58 ticks, truncated.
        assert_eq!(timer.counter(), 3_579_548);
    }

    #[test]
    fn a_24_bit_counter_wraps_at_2_pow_24() {
        let (clock, timer) = timer(PmTimerWidth::Bits24);
        // 2^24 ticks = 4.687 s; go 5 s in.
        clock.advance(5_000_000_000);
        let ticks = 5 * PM_TIMER_HZ;
        assert_eq!(u64::from(timer.counter()), ticks - (1 << 24));
    }

    #[test]
    fn a_32_bit_counter_does_not_wrap_at_2_pow_24() {
        let (clock, timer) = timer(PmTimerWidth::Bits32);
        clock.advance(5_000_000_000);
        assert_eq!(u64::from(timer.counter()), 5 * PM_TIMER_HZ);
        // 2^32 ticks is about 1199.57 s.
        clock.advance(1_200_000_000_000 - 5_000_000_000);
        let ticks = 1_200 * PM_TIMER_HZ;
        assert_eq!(u64::from(timer.counter()), ticks - (1 << 32));
    }

    #[test]
    fn byte_and_dword_reads_return_the_counter_bytes() {
        let (clock, mut timer) = timer(PmTimerWidth::Bits32);
        clock.advance(1_000_000_000);
        let mut dword = [0u8; 4];
        timer.read(0x408, 0, &mut dword);
        assert_eq!(u32::from_le_bytes(dword), 3_579_545);
        let mut byte = [0u8; 1];
        timer.read(0x408, 2, &mut byte);
        assert_eq!(byte[0], (3_579_545u32 >> 16) as u8);
        // Past the end of the register.
        let mut wide = [0u8; 2];
        timer.read(0x408, 3, &mut wide);
        assert_eq!(wide, [(3_579_545u32 >> 24) as u8, 0xff]);
    }

    #[test]
    fn writes_are_ignored() {
        let (clock, mut timer) = timer(PmTimerWidth::Bits24);
        clock.advance(1_000);
        let before = timer.counter();
        timer.write(0x408, 0, &[0, 0, 0, 0]);
        assert_eq!(timer.counter(), before);
        assert_ne!(before, 0);
    }

    #[test]
    fn msb_toggle_deadline_is_the_next_half_period() {
        let (clock, timer) = timer(PmTimerWidth::Bits24);
        let now = clock.now_ns();
        let toggle = timer.next_msb_toggle_ns(now);
        // 2^23 ticks at 3.579545 MHz is 2.3435 s.
        let expected = 5_000 + ((1u128 << 23) * 1_000_000_000).div_ceil(3_579_545) as u64;
        assert_eq!(toggle, expected);
        clock.set(toggle - 1);
        assert_eq!(timer.counter() >> 23, 0);
        clock.set(toggle);
        assert_eq!(timer.counter() >> 23, 1);
        // From there the next toggle is a full half period later.
        assert!(timer.next_msb_toggle_ns(toggle) > toggle + 2_000_000_000);
    }
}
