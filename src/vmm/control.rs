//! Machine-wide control shared by the main thread, the vCPU threads and the devices: who asked
//! the machine to stop and why, and the poll that detects "every vCPU halted".

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use super::exit::StopReason;
use crate::devices::bus::lock;
use crate::devices::power::{PowerControl, PowerEvent};
use crate::hv::{RunState, VcpuKicker};

/// A vCPU's state as last sampled for the halt poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SampledState {
    Running = 0,
    WaitingForSipi = 1,
    HaltedInterruptsOff = 2,
}

struct Sample {
    generation: AtomicU64,
    state: AtomicU8,
}

/// Produces the last bytes the guest wrote to its serial console, for failure reports.
pub type SerialTail = Box<dyn Fn() -> Vec<u8> + Send + Sync>;

pub struct Control {
    stop: Mutex<Option<StopReason>>,
    stopping: AtomicBool,
    wake: Sender<()>,
    kickers: Mutex<Vec<Option<Arc<dyn VcpuKicker>>>>,
    poll_generation: AtomicU64,
    samples: Vec<Sample>,
    serial_tail: Mutex<Option<SerialTail>>,
    /// Set while the machine's vCPUs must stay out of the guest (`pause_vcpus`); read with
    /// one atomic load on every pass of the vCPU loop.
    pause_requested: AtomicBool,
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
}

/// How many vCPU threads are out of the guest for a pause.
#[derive(Default)]
struct PauseState {
    /// Parked at the top of their loop.
    parked: u8,
    /// Blocked in the VMM's own HLT or wait-for-SIPI (user irqchip): not running guest code,
    /// and they park before they run it again.
    idle: u8,
}

impl Control {
    pub fn new(vcpus: u8) -> (Arc<Control>, Receiver<()>) {
        let (wake, woken) = crossbeam_channel::unbounded();
        let control = Control {
            stop: Mutex::new(None),
            stopping: AtomicBool::new(false),
            wake,
            kickers: Mutex::new(vec![None; usize::from(vcpus)]),
            poll_generation: AtomicU64::new(0),
            samples: (0..vcpus)
                .map(|_| Sample {
                    generation: AtomicU64::new(0),
                    state: AtomicU8::new(0),
                })
                .collect(),
            serial_tail: Mutex::new(None),
            pause_requested: AtomicBool::new(false),
            pause: Mutex::new(PauseState::default()),
            pause_changed: Condvar::new(),
        };
        (Arc::new(control), woken)
    }

    /// Records why the machine stops (the first reason wins) and wakes the main thread.
    pub fn stop(&self, reason: StopReason) {
        let mut stop = lock(&self.stop);
        if stop.is_none() {
            *stop = Some(reason);
        }
        drop(stop);
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.wake.send(());
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        lock(&self.stop).clone()
    }

    pub fn register_kicker(&self, id: u8, kicker: Arc<dyn VcpuKicker>) {
        if let Some(slot) = lock(&self.kickers).get_mut(usize::from(id)) {
            *slot = Some(kicker);
        }
    }

    pub fn kick_all(&self) {
        for kicker in lock(&self.kickers).iter().flatten() {
            kicker.kick();
        }
    }

    pub fn set_serial_tail(&self, tail: SerialTail) {
        *lock(&self.serial_tail) = Some(tail);
    }

    pub fn serial_tail(&self) -> Vec<u8> {
        lock(&self.serial_tail)
            .as_ref()
            .map(|f| f())
            .unwrap_or_default()
    }

    /// The halt poll generation a kicked vCPU should answer.
    pub fn poll_generation(&self) -> u64 {
        self.poll_generation.load(Ordering::SeqCst)
    }

    /// A vCPU's answer to poll `generation`.
    pub fn report(&self, id: u8, generation: u64, state: RunState, interrupts_enabled: bool) {
        let sampled = match state {
            RunState::WaitingForSipi => SampledState::WaitingForSipi,
            RunState::Halted if !interrupts_enabled => SampledState::HaltedInterruptsOff,
            _ => SampledState::Running,
        };
        if let Some(s) = self.samples.get(usize::from(id)) {
            s.state.store(sampled as u8, Ordering::SeqCst);
            s.generation.store(generation, Ordering::SeqCst);
        }
    }

    /// One round of the halt poll: kick every vCPU, wait for each to report its state, and
    /// say whether every started vCPU is halted with interrupts off (xhyve's "halt").
    ///
    /// KVM's in-kernel irqchip keeps HLT inside KVM_RUN, so the VMM must ask; the generation
    /// counter makes sure every answer was sampled after this round's kick.
    pub fn poll_all_halted(&self, wait: Duration) -> bool {
        let generation = self.poll_generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.kick_all();
        let deadline = std::time::Instant::now() + wait;
        loop {
            let answered = self
                .samples
                .iter()
                .all(|s| s.generation.load(Ordering::SeqCst) >= generation);
            if answered {
                break;
            }
            if std::time::Instant::now() >= deadline || self.is_stopping() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let states: Vec<u8> = self
            .samples
            .iter()
            .map(|s| s.state.load(Ordering::SeqCst))
            .collect();
        states.contains(&(SampledState::HaltedInterruptsOff as u8))
            && states.iter().all(|&s| s != SampledState::Running as u8)
    }
}

/// Pausing the vCPUs.
impl Control {
    /// Whether a vCPU must park before it enters the guest.
    pub fn pause_requested(&self) -> bool {
        self.pause_requested.load(Ordering::SeqCst)
    }

    /// Stops every vCPU from running guest code: returns once each of the `vcpus` threads
    /// is parked (or idle in the VMM's HLT/SIPI wait, which parks before the guest runs
    /// again), or the machine stops.
    pub fn pause_vcpus(&self, vcpus: u8) {
        self.pause_requested.store(true, Ordering::SeqCst);
        let mut state = lock(&self.pause);
        loop {
            if state.parked.saturating_add(state.idle) >= vcpus || self.is_stopping() {
                return;
            }
            drop(state);
            // A vCPU inside the guest leaves it only when kicked; kick until all are out.
            self.kick_all();
            state = lock(&self.pause);
            state = match self
                .pause_changed
                .wait_timeout(state, Duration::from_millis(10))
            {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Lets parked vCPUs run the guest again.
    pub fn resume_vcpus(&self) {
        let _state = lock(&self.pause);
        self.pause_requested.store(false, Ordering::SeqCst);
        self.pause_changed.notify_all();
    }

    /// Called by a vCPU thread at a point where it is out of the guest: waits while a pause
    /// is requested (or until the machine stops).
    pub fn park(&self) {
        let mut state = lock(&self.pause);
        if !self.pause_requested() {
            return;
        }
        state.parked += 1;
        self.pause_changed.notify_all();
        while self.pause_requested() && !self.is_stopping() {
            state = match self
                .pause_changed
                .wait_timeout(state, Duration::from_millis(50))
            {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.parked -= 1;
    }

    /// A vCPU thread blocks in the VMM's HLT or SIPI wait until the guard drops.
    pub fn idle(&self) -> IdleGuard<'_> {
        lock(&self.pause).idle += 1;
        self.pause_changed.notify_all();
        IdleGuard(self)
    }
}

/// Counts a vCPU as out of the guest while it lives (see [`Control::idle`]).
pub struct IdleGuard<'a>(&'a Control);

impl Drop for IdleGuard<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.pause);
        state.idle = state.idle.saturating_sub(1);
    }
}

/// What signals and the control API do to a running machine (the machine handle pauses
/// the vCPUs and the devices).
pub trait Lifecycle: Send + Sync {
    fn pause(&self);
    fn resume(&self);
    fn is_paused(&self) -> bool;
    fn is_stopping(&self) -> bool;
    /// Stops the machine now, for `reason`.
    fn stop_now(&self, reason: StopReason);
}

impl PowerControl for Control {
    fn request(&self, event: PowerEvent) {
        self.stop(StopReason::Guest(event));
        self.kick_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_reason_wins_and_wakes_main() {
        let (control, woken) = Control::new(1);
        assert!(!control.is_stopping());
        control.request(PowerEvent::Reset);
        control.stop(StopReason::Signal(libc::SIGINT));
        assert!(control.is_stopping());
        assert_eq!(
            control.stop_reason(),
            Some(StopReason::Guest(PowerEvent::Reset))
        );
        assert!(woken.try_recv().is_ok());
    }

    #[test]
    fn halt_needs_every_started_vcpu_halted_with_interrupts_off() {
        let (control, _woken) = Control::new(3);
        // Nobody answers: not halted.
        assert!(!control.poll_all_halted(Duration::from_millis(5)));
        let g = control.poll_generation() + 1;
        // Answers given ahead for the next round, as kicked vCPUs would.
        control.report(0, g, RunState::Halted, false);
        control.report(1, g, RunState::WaitingForSipi, false);
        control.report(2, g, RunState::Halted, false);
        assert!(control.poll_all_halted(Duration::from_millis(5)));
        let g = g + 1;
        control.report(0, g, RunState::Halted, false);
        control.report(1, g, RunState::WaitingForSipi, false);
        control.report(2, g, RunState::Halted, true);
        assert!(!control.poll_all_halted(Duration::from_millis(5)));
        let g = g + 1;
        for id in 0..3 {
            control.report(id, g, RunState::WaitingForSipi, false);
        }
        assert!(
            !control.poll_all_halted(Duration::from_millis(5)),
            "nobody ever ran"
        );
    }

    /// Fake vCPU threads that count their trips into the "guest" and park as the real loop
    /// does: a pause stops every trip, a resume lets them go on.
    #[test]
    fn pause_parks_every_vcpu_and_resume_releases_them() {
        use std::sync::atomic::AtomicUsize;
        let (control, _woken) = Control::new(2);
        let trips: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
        let mut threads = Vec::new();
        for id in 0..2 {
            let control = control.clone();
            let trips = trips.clone();
            threads.push(std::thread::spawn(move || {
                while !control.is_stopping() {
                    if control.pause_requested() {
                        control.park();
                        continue;
                    }
                    trips[id].fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        // A third vCPU sits in the VMM's HLT: it counts as out of the guest.
        let idle = control.idle();
        control.pause_vcpus(3);
        let before: Vec<usize> = trips.iter().map(|t| t.load(Ordering::SeqCst)).collect();
        std::thread::sleep(Duration::from_millis(30));
        let after: Vec<usize> = trips.iter().map(|t| t.load(Ordering::SeqCst)).collect();
        assert_eq!(before, after, "a vCPU ran while paused");
        drop(idle);
        control.resume_vcpus();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while trips[0].load(Ordering::SeqCst) == after[0]
            || trips[1].load(Ordering::SeqCst) == after[1]
        {
            assert!(std::time::Instant::now() < deadline, "not resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        // A stop releases parked vCPUs too.
        control.pause_vcpus(2);
        control.stop(StopReason::Fatal("test".into()));
        for t in threads {
            t.join().unwrap();
        }
    }
}
