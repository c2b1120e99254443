//! Machine-wide control shared by the main thread, the vCPU threads and the devices: who asked
//! the machine to stop and why, and the poll that detects "every vCPU halted".

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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
    /// Bumped by each machine reset (`reset_vcpus`); a parked vCPU thread that has not yet
    /// applied the latest one does, before it leaves its park. Read only while parked.
    reset_generation: AtomicU64,
    /// Set while a machine reset waits for the vCPU threads: a vCPU idle in the VMM's HLT
    /// or SIPI wait leaves it to park and take the reset.
    resetting: AtomicBool,
}

/// How many vCPU threads are out of the guest for a pause.
#[derive(Default)]
struct PauseState {
    /// Parked at the top of their loop.
    parked: u8,
    /// Blocked in the VMM's own HLT or wait-for-SIPI (user irqchip): not running guest code,
    /// and they park before they run it again.
    idle: u8,
    /// vCPU threads that applied the current machine reset.
    reset_done: u8,
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
            reset_generation: AtomicU64::new(0),
            resetting: AtomicBool::new(false),
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
            // A vCPU inside the guest leaves it only when kicked; kick until all are out.
            state = self.kick_and_wait(state);
        }
    }

    /// Kicks every vCPU (without holding the pause lock, which their parks take), then
    /// waits up to 10 ms for a change of the pause state.
    fn kick_and_wait<'a>(
        &'a self,
        state: MutexGuard<'a, PauseState>,
    ) -> MutexGuard<'a, PauseState> {
        drop(state);
        self.kick_all();
        let state = lock(&self.pause);
        match self
            .pause_changed
            .wait_timeout(state, Duration::from_millis(10))
        {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Lets parked vCPUs run the guest again.
    pub fn resume_vcpus(&self) {
        let _state = lock(&self.pause);
        self.pause_requested.store(false, Ordering::SeqCst);
        self.pause_changed.notify_all();
    }

    /// Called by a vCPU thread at a point where it is out of the guest: waits while a pause
    /// is requested (or until the machine stops). A machine reset asked for meanwhile
    /// (`reset_vcpus`) is applied here, by this thread, with `reset`: `seen` is the last
    /// reset generation the thread applied. Returns whether it applied one (the thread then
    /// starts its loop over: the vCPU is not where it was).
    pub fn park(&self, seen: &mut u64, reset: &mut dyn FnMut()) -> bool {
        let mut state = lock(&self.pause);
        if !self.pause_requested() {
            return false;
        }
        state.parked += 1;
        self.pause_changed.notify_all();
        let mut applied = false;
        while self.pause_requested() && !self.is_stopping() {
            let generation = self.reset_generation.load(Ordering::SeqCst);
            if generation != *seen {
                *seen = generation;
                drop(state);
                reset();
                applied = true;
                state = lock(&self.pause);
                state.reset_done = state.reset_done.saturating_add(1);
                self.pause_changed.notify_all();
                continue;
            }
            state = match self
                .pause_changed
                .wait_timeout(state, Duration::from_millis(50))
            {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        state.parked -= 1;
        applied
    }

    /// The reset generation a vCPU thread starts with (it has nothing to apply).
    pub fn reset_generation(&self) -> u64 {
        self.reset_generation.load(Ordering::SeqCst)
    }

    /// Whether a machine reset waits for the vCPU threads (see `resetting`).
    pub fn resetting(&self) -> bool {
        self.resetting.load(Ordering::SeqCst)
    }

    /// Announces a machine reset before the devices and interrupt controllers are reset:
    /// from here on a vCPU woken in the VMM's HLT or SIPI wait goes to its park instead of
    /// judging the half-reset controllers. `reset_vcpus` ends it.
    pub fn begin_reset(&self) {
        self.resetting.store(true, Ordering::SeqCst);
    }

    /// With the vCPUs paused (`pause_vcpus`): has each of the `vcpus` threads reset its
    /// vCPU, in its park, and returns once all have (true) or the machine stops (false).
    /// Threads idle in the VMM's HLT or SIPI wait are woken to park first.
    pub fn reset_vcpus(&self, vcpus: u8) -> bool {
        let mut state = lock(&self.pause);
        state.reset_done = 0;
        self.resetting.store(true, Ordering::SeqCst);
        self.reset_generation.fetch_add(1, Ordering::SeqCst);
        self.pause_changed.notify_all();
        let done = loop {
            if state.reset_done >= vcpus {
                break true;
            }
            if self.is_stopping() {
                break false;
            }
            // A kick wakes a vCPU from the VMM's HLT or SIPI wait; a parked one ignores it.
            state = self.kick_and_wait(state);
        };
        self.resetting.store(false, Ordering::SeqCst);
        done
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
    /// Resets the machine in place, as a reset button would: same process and devices,
    /// the guest starts again from its boot entry. A paused machine stays paused.
    fn reset(&self) -> Result<(), ResetError>;
    /// Stops the machine now, for `reason`.
    fn stop_now(&self, reason: StopReason);
}

/// Why a machine reset did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("the VM is stopping")]
    Stopping,
    /// The guest could not be loaded again; the machine stops (its memory is torn).
    #[error("cannot load the guest again: {0}")]
    Reload(#[source] Box<super::machine::VmmError>),
    /// The hypervisor refused its interrupt controllers' reset; the machine stops.
    #[error("cannot reset the interrupt controllers: {0}")]
    IrqChip(#[source] crate::hv::HvError),
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
                let mut seen = control.reset_generation();
                while !control.is_stopping() {
                    if control.pause_requested() {
                        control.park(&mut seen, &mut || {});
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

    /// The reset handshake: each paused vCPU thread applies the reset itself, exactly once
    /// per reset, before it may run again; one idle in the VMM's HLT wait is woken for it.
    #[test]
    fn each_parked_vcpu_applies_a_reset_once_before_it_runs_again() {
        use std::sync::atomic::AtomicUsize;
        let (control, _woken) = Control::new(2);
        let resets: Arc<Vec<AtomicUsize>> = Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
        let trips_after_reset: Arc<Vec<AtomicUsize>> =
            Arc::new((0..2).map(|_| AtomicUsize::new(0)).collect());
        // vCPU 1 sleeps in a fake VMM HLT until the reset asks it out.
        let halt = Arc::new((Mutex::new(()), Condvar::new()));
        struct Wake(Arc<(Mutex<()>, Condvar)>);
        impl VcpuKicker for Wake {
            fn kick(&self) {
                let _guard = self.0 .0.lock().unwrap();
                self.0 .1.notify_all();
            }
        }
        control.register_kicker(1, Arc::new(Wake(halt.clone())));
        let mut threads = Vec::new();
        for id in 0..2usize {
            let control = control.clone();
            let resets = resets.clone();
            let trips = trips_after_reset.clone();
            let halt = halt.clone();
            threads.push(std::thread::spawn(move || {
                let mut seen = control.reset_generation();
                let mut halted = id == 1;
                while !control.is_stopping() {
                    if control.pause_requested() {
                        let applied = control.park(&mut seen, &mut || {
                            resets[id].fetch_add(1, Ordering::SeqCst);
                        });
                        if applied {
                            halted = false;
                        }
                        continue;
                    }
                    if halted {
                        let _idle = control.idle();
                        let guard = halt.0.lock().unwrap();
                        if !control.resetting() {
                            let _ = halt.1.wait_timeout(guard, Duration::from_millis(500));
                        }
                        continue;
                    }
                    if resets[id].load(Ordering::SeqCst) > 0 {
                        trips[id].fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }));
        }
        control.pause_vcpus(2);
        assert!(control.reset_vcpus(2));
        assert!(!control.resetting());
        for id in 0..2 {
            assert_eq!(resets[id].load(Ordering::SeqCst), 1, "vCPU {id} reset once");
            assert_eq!(
                trips_after_reset[id].load(Ordering::SeqCst),
                0,
                "ran while paused"
            );
        }
        control.resume_vcpus();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while trips_after_reset
            .iter()
            .any(|t| t.load(Ordering::SeqCst) == 0)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "not resumed after the reset"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // A plain pause applies nothing.
        control.pause_vcpus(2);
        control.resume_vcpus();
        for id in 0..2 {
            assert_eq!(resets[id].load(Ordering::SeqCst), 1);
        }
        // A stop ends a reset that waits.
        control.pause_vcpus(2);
        control.stop(StopReason::Fatal("test".into()));
        assert!(!control.reset_vcpus(3), "a third vCPU never answers");
        for t in threads {
            t.join().unwrap();
        }
    }
}
