//! The time source every timer model reads, injected so tests are deterministic.

use std::sync::atomic::{AtomicU64, Ordering};

/// A monotonic nanosecond clock.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;
}

/// A clock that only moves when told to; for tests and for replay.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ns: AtomicU64,
}

impl ManualClock {
    pub fn new(start_ns: u64) -> Self {
        Self {
            now_ns: AtomicU64::new(start_ns),
        }
    }

    /// Moves the clock to `ns`. A clock never runs backwards, so an earlier time is ignored.
    pub fn set(&self, ns: u64) {
        self.now_ns.fetch_max(ns, Ordering::SeqCst);
    }

    /// Moves the clock forward by `delta_ns`, saturating at `u64::MAX`.
    pub fn advance(&self, delta_ns: u64) {
        // The closure always returns Some, so the update cannot fail.
        let _ = self
            .now_ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                Some(now.saturating_add(delta_ns))
            });
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::SeqCst)
    }
}

/// The host's monotonic clock, for the running VMM.
#[derive(Debug)]
pub struct MonotonicClock {
    origin: std::time::Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        // u64 nanoseconds last 584 years; saturate rather than wrap after that.
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_forward() {
        let clock = ManualClock::new(100);
        assert_eq!(clock.now_ns(), 100);
        clock.advance(50);
        assert_eq!(clock.now_ns(), 150);
        clock.set(120);
        assert_eq!(clock.now_ns(), 150, "set must not move the clock backwards");
        clock.set(1_000);
        assert_eq!(clock.now_ns(), 1_000);
        clock.advance(u64::MAX);
        assert_eq!(clock.now_ns(), u64::MAX);
    }

    #[test]
    fn monotonic_clock_does_not_go_backwards() {
        let clock = MonotonicClock::new();
        let a = clock.now_ns();
        let b = clock.now_ns();
        assert!(b >= a);
    }
}
