//! Drives the VMM's own timer devices (the HPET on KVM; later every `intc` timer): one thread
//! sleeps until the earliest deadline any device reports and then ticks the devices due.
//!
//! A guest that reprograms a timer does so through a register write on a vCPU thread; the
//! [`Rearming`] wrapper wakes the timer thread after every write so that it recomputes its
//! deadline. Nothing here runs on the vCPU exit path beyond one uncontended notify.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::devices::bus::{lock, BusDevice};
use crate::intc::clock::Clock;

/// A device that needs to be told when time passes.
pub trait Timed: Send {
    /// When the device next needs `tick`, on the shared clock.
    fn next_deadline_ns(&self) -> Option<u64>;
    fn tick(&mut self, now_ns: u64);
}

impl Timed for crate::intc::hpet::Hpet {
    fn next_deadline_ns(&self) -> Option<u64> {
        crate::intc::hpet::Hpet::next_deadline_ns(self)
    }
    fn tick(&mut self, now_ns: u64) {
        crate::intc::hpet::Hpet::tick(self, now_ns)
    }
}

impl Timed for crate::devices::rtc::Rtc {
    fn next_deadline_ns(&self) -> Option<u64> {
        crate::devices::rtc::Rtc::next_deadline_ns(self)
    }
    fn tick(&mut self, now_ns: u64) {
        crate::devices::rtc::Rtc::tick(self, now_ns)
    }
}

#[derive(Default)]
struct Wake {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Wake {
    fn notify(&self) {
        *lock(&self.generation) += 1;
        self.changed.notify_one();
    }
}

/// Wakes the timer thread so that it recomputes its deadline: for devices whose timers move
/// other than through a `Rearming` bus device (the LAPIC timers, programmed through the
/// vCPU's own LAPIC page).
#[derive(Clone)]
pub struct TimerWaker(Arc<Wake>);

impl TimerWaker {
    pub fn wake(&self) {
        self.0.notify();
    }
}

/// A bus device whose writes may move a timer deadline.
pub struct Rearming<D> {
    device: Arc<Mutex<D>>,
    wake: Arc<Wake>,
}

impl<D: BusDevice + Timed> BusDevice for Rearming<D> {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.device).read(base, offset, data);
    }

    /// Wakes the timer thread only when the write moved the deadline: a wake is a syscall,
    /// and most register writes (latch commands, status reads' side effects) move nothing.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let mut device = lock(&self.device);
        let before = device.next_deadline_ns();
        device.write(base, offset, data);
        let moved = device.next_deadline_ns() != before;
        drop(device);
        if moved {
            self.wake.notify();
        }
    }
}

/// A machine reset of a timed device; the timer thread then looks at its deadline again.
impl<D: crate::devices::PowerOnReset> crate::devices::PowerOnReset for Rearming<D> {
    fn power_on_reset(&mut self) {
        lock(&self.device).power_on_reset();
        self.wake.notify();
    }
}

/// The timer thread's set of devices.
pub struct TimerService {
    clock: Arc<dyn Clock>,
    devices: Vec<Arc<Mutex<dyn Timed>>>,
    wake: Arc<Wake>,
}

impl TimerService {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        TimerService {
            clock,
            devices: Vec::new(),
            wake: Arc::default(),
        }
    }

    /// Registers `device` and returns the bus device to insert for its registers.
    pub fn add<D: Timed + BusDevice + 'static>(&mut self, device: D) -> Rearming<D> {
        let device = Arc::new(Mutex::new(device));
        self.devices.push(device.clone());
        Rearming {
            device,
            wake: self.wake.clone(),
        }
    }

    /// Registers a device that is programmed elsewhere; it must call the `waker` when its
    /// deadline moves.
    pub fn add_timed(&mut self, device: Arc<Mutex<dyn Timed>>) {
        self.devices.push(device);
    }

    pub fn waker(&self) -> TimerWaker {
        TimerWaker(self.wake.clone())
    }

    /// Starts the timer thread, if any device needs one. It runs until the process exits.
    pub fn start(self) -> std::io::Result<()> {
        if self.devices.is_empty() {
            return Ok(());
        }
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || loop {
                self.run_once(Duration::from_secs(1));
            })
            .map(|_| ())
    }

    /// Ticks every device that is due, then sleeps until the next deadline, a register
    /// write, or `idle` passes.
    fn run_once(&self, idle: Duration) {
        // Note the wake generation before the scan: a write that lands during the scan (on a
        // device already looked at) bumps it, and the wait below then returns at once instead
        // of sleeping through the new deadline.
        let seen = *lock(&self.wake.generation);
        let now = self.clock.now_ns();
        let mut next: Option<u64> = None;
        for device in &self.devices {
            let mut device = lock(device);
            if device.next_deadline_ns().is_some_and(|d| d <= now) {
                device.tick(now);
            }
            if let Some(d) = device.next_deadline_ns() {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        }
        let wait = next.map_or(idle, |d| {
            Duration::from_nanos(d.saturating_sub(now)).min(idle)
        });
        let generation = lock(&self.wake.generation);
        let _ = self
            .wake
            .changed
            .wait_timeout_while(generation, wait, |g| *g == seen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intc::clock::ManualClock;

    struct Alarm {
        at: Option<u64>,
        fired: Vec<u64>,
    }

    impl Timed for Alarm {
        fn next_deadline_ns(&self) -> Option<u64> {
            self.at
        }
        fn tick(&mut self, now_ns: u64) {
            self.fired.push(now_ns);
            self.at = None;
        }
    }

    impl BusDevice for Alarm {
        fn read(&mut self, _: u64, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            self.at = Some(u64::from(data[0]) * 1000);
        }
    }

    #[test]
    fn ticks_what_is_due_and_rearms_on_writes() {
        let clock = Arc::new(ManualClock::new(0));
        let mut service = TimerService::new(clock.clone());
        let mut regs = service.add(Alarm {
            at: None,
            fired: vec![],
        });
        let alarm = regs.device.clone();
        regs.write(0, 0, &[5]);
        clock.set(4_000);
        service.run_once(Duration::ZERO);
        assert!(lock(&alarm).fired.is_empty());
        clock.set(5_000);
        service.run_once(Duration::ZERO);
        assert_eq!(lock(&alarm).fired, vec![5_000]);
        clock.set(9_000);
        service.run_once(Duration::ZERO);
        assert_eq!(lock(&alarm).fired.len(), 1, "one-shot fired once");
    }

    #[test]
    fn only_writes_that_move_the_deadline_wake_the_thread() {
        let clock = Arc::new(ManualClock::new(0));
        let mut service = TimerService::new(clock);
        let mut regs = service.add(Alarm {
            at: None,
            fired: vec![],
        });
        let generation = || *lock(&service.wake.generation);
        regs.write(0, 0, &[5]);
        assert_eq!(generation(), 1);
        regs.write(0, 0, &[5]);
        assert_eq!(generation(), 1, "same deadline: no wake");
        regs.write(0, 0, &[6]);
        assert_eq!(generation(), 2);
    }

    #[test]
    fn the_waker_wakes_the_sleeping_thread() {
        let clock = Arc::new(ManualClock::new(0));
        let mut service = TimerService::new(clock);
        let alarm = Arc::new(Mutex::new(Alarm {
            at: None,
            fired: vec![],
        }));
        service.add_timed(alarm);
        let waker = service.waker();
        let start = std::time::Instant::now();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            waker.wake();
        });
        service.run_once(Duration::from_secs(10));
        t.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "woken by the waker"
        );
    }

    /// Arms another device's deadline from inside the scan, as a vCPU's register write can
    /// land while the timer thread walks the devices.
    struct WriterDuringScan {
        other: Arc<Mutex<Alarm>>,
        waker: TimerWaker,
        done: bool,
    }

    impl Timed for WriterDuringScan {
        fn next_deadline_ns(&self) -> Option<u64> {
            None
        }
        fn tick(&mut self, _now_ns: u64) {}
    }

    impl WriterDuringScan {
        fn write_once(&mut self) {
            if !self.done {
                self.done = true;
                lock(&self.other).at = Some(0);
                self.waker.wake();
            }
        }
    }

    /// A device whose deadline query performs that concurrent write.
    struct ScanHook(Arc<Mutex<WriterDuringScan>>);

    impl Timed for ScanHook {
        fn next_deadline_ns(&self) -> Option<u64> {
            lock(&self.0).write_once();
            None
        }
        fn tick(&mut self, _now_ns: u64) {}
    }

    /// A deadline armed (and the thread woken) after its device was scanned but before the
    /// thread sleeps must not be slept through: it used to wait for the idle timeout (1 s
    /// in service), so HPET and RTC interrupts came up to a second late.
    #[test]
    fn a_write_during_the_scan_is_not_missed() {
        let clock = Arc::new(ManualClock::new(1_000));
        let mut service = TimerService::new(clock);
        let alarm = Arc::new(Mutex::new(Alarm {
            at: None,
            fired: vec![],
        }));
        service.add_timed(alarm.clone());
        let writer = Arc::new(Mutex::new(WriterDuringScan {
            other: alarm.clone(),
            waker: service.waker(),
            done: false,
        }));
        service.add_timed(Arc::new(Mutex::new(ScanHook(writer))));
        let start = std::time::Instant::now();
        service.run_once(Duration::from_secs(3));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "slept {:?} with a deadline already due",
            start.elapsed()
        );
        service.run_once(Duration::ZERO);
        assert_eq!(lock(&alarm).fired, vec![1_000]);
    }

    #[test]
    fn a_write_wakes_the_sleeping_thread() {
        let clock = Arc::new(ManualClock::new(0));
        let mut service = TimerService::new(clock);
        let mut regs = service.add(Alarm {
            at: None,
            fired: vec![],
        });
        let start = std::time::Instant::now();
        let waker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            regs.write(0, 0, &[1]);
        });
        service.run_once(Duration::from_secs(10));
        waker.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "woken by the write"
        );
    }
}
