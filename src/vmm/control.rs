//! Machine-wide control shared by the main thread, the vCPU threads and the devices: who asked
//! the machine to stop and why, pausing the vCPUs, and the poll that detects "every vCPU
//! halted".

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
    pause: Mutex<PauseState>,
    pause_changed: Condvar,
}

/// vCPU pause (SIGUSR1/SIGUSR2, the control API): only the vCPUs stop; devices and timers
/// carry on, so a paused guest finds its timers due when it resumes. The machine-wide
/// pause of the device manager replaces this.
#[derive(Default)]
struct PauseState {
    paused: bool,
    /// vCPU threads waiting in [`Control::park_while_paused`].
    parked: usize,
}

/// How long `pause` waits for the vCPUs to leave the guest.
const PAUSE_ACK: Duration = Duration::from_secs(1);

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
        // Release parked vCPUs; taking the lock orders this after a parker's stop check.
        drop(lock(&self.pause));
        self.pause_changed.notify_all();
        let _ = self.wake.send(());
    }

    /// Stops every vCPU outside the guest until [`resume`](Self::resume); returns once they
    /// are all parked (or after a bound, for a vCPU stuck in a host call).
    pub fn pause(&self) {
        let vcpus = lock(&self.kickers).iter().flatten().count();
        let mut state = lock(&self.pause);
        state.paused = true;
        drop(state);
        self.kick_all();
        let deadline = std::time::Instant::now() + PAUSE_ACK;
        let mut state = lock(&self.pause);
        while state.paused && state.parked < vcpus && !self.is_stopping() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            state = match self.pause_changed.wait_timeout(state, left) {
                Ok((s, _)) => s,
                Err(p) => p.into_inner().0,
            };
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        lock(&self.pause).paused = false;
        self.pause_changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.pause).paused
    }

    /// Called by a vCPU thread between exits: waits while the machine is paused.
    pub fn park_while_paused(&self) {
        let mut state = lock(&self.pause);
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.pause_changed.notify_all();
        while state.paused && !self.is_stopping() {
            state = match self.pause_changed.wait(state) {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
        }
        state.parked -= 1;
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

/// What signals and the control API do to a running machine. `Control` pauses only the
/// vCPUs; the device manager's machine-wide pause can stand in behind the same interface.
pub trait Lifecycle: Send + Sync {
    fn pause(&self);
    fn resume(&self);
    fn is_paused(&self) -> bool;
    fn is_stopping(&self) -> bool;
    /// Stops the machine now, for `reason`.
    fn stop_now(&self, reason: StopReason);
}

impl Lifecycle for Control {
    fn pause(&self) {
        Control::pause(self)
    }
    fn resume(&self) {
        Control::resume(self)
    }
    fn is_paused(&self) -> bool {
        Control::is_paused(self)
    }
    fn is_stopping(&self) -> bool {
        Control::is_stopping(self)
    }
    fn stop_now(&self, reason: StopReason) {
        self.stop(reason);
        self.kick_all();
    }
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
    fn pause_parks_vcpus_until_resume_or_stop() {
        let (control, _woken) = Control::new(1);
        let ran = Arc::new(AtomicU64::new(0));
        let vcpu = {
            let (control, ran) = (control.clone(), ran.clone());
            std::thread::spawn(move || {
                while !control.is_stopping() {
                    control.park_while_paused();
                    ran.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        control.pause();
        assert!(control.is_paused());
        std::thread::sleep(Duration::from_millis(20));
        let before = ran.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert!(ran.load(Ordering::SeqCst) <= before + 1, "ran while paused");
        control.resume();
        std::thread::sleep(Duration::from_millis(50));
        assert!(ran.load(Ordering::SeqCst) > before + 1, "did not resume");
        control.pause();
        control.stop(StopReason::Signal(libc::SIGTERM));
        vcpu.join().unwrap();
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
}
