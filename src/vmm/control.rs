//! Machine-wide control shared by the main thread, the vCPU threads and the devices: who asked
//! the machine to stop and why, and the poll that detects "every vCPU halted".

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
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
}
