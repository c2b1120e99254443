//! The event loop every device thread runs: it waits on the device's notifiers (queue
//! doorbells, a back end's descriptor) and on its control events (pause, kill), and hands
//! each event to the device's [`EventHandler`].
//!
//! Portable: a [`Notifier`] is an eventfd on Linux (so KVM can signal it directly as an
//! ioeventfd) and a pipe elsewhere (vmm-sys-util's `event` module), and the loop waits in
//! poll(2), which both have. A device has at most a handful of descriptors, so poll costs
//! no more than epoll here.
//!
//! Pause and kill go through [`LoopControl`], which outlives any one loop: a device's loop
//! stops at a reset and a new one starts at the next activation, paused if the machine is.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// A wake-up a device thread can wait on: rung by a vCPU (a doorbell on the exit path), by
/// the hypervisor (an ioeventfd), or by a back end's callback.
#[derive(Debug)]
pub struct Notifier {
    consumer: EventConsumer,
    notifier: EventNotifier,
    /// Rung by the VMM (`notify`) since the last [`Notifier::take_rung_by_vmm`]: tells a
    /// doorbell on the exit path from one the hypervisor delivered (for tracing).
    by_vmm: AtomicBool,
}

impl Notifier {
    pub fn new() -> io::Result<Arc<Notifier>> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?;
        Ok(Arc::new(Notifier {
            consumer,
            notifier,
            by_vmm: AtomicBool::new(false),
        }))
    }

    /// Rings it. Never blocks, never allocates: safe on a vCPU's exit path. A full counter
    /// (or pipe) already means "wake up", so a failed write loses nothing.
    pub fn notify(&self) {
        self.by_vmm.store(true, Ordering::Relaxed);
        let _ = self.notifier.notify();
    }

    /// Whether `notify` rang it since the last call (else the hypervisor did).
    pub fn take_rung_by_vmm(&self) -> bool {
        self.by_vmm.swap(false, Ordering::Relaxed)
    }

    /// The descriptor that becomes readable when rung: what the loop polls, and what KVM
    /// signals as an ioeventfd (on Linux it is the eventfd itself).
    pub fn fd(&self) -> RawFd {
        self.consumer.as_raw_fd()
    }

    /// Takes every ring so far (one service pass covers them all). An eventfd hands its
    /// whole count to one read; a pipe holds one 8-byte token per ring, so it is read dry.
    pub fn drain(&self) {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            let _ = self.consumer.consume();
        } else {
            while self.consumer.consume().is_ok() {}
        }
    }
}

/// What the loop watches besides its control events.
pub enum EventSource {
    /// A notifier, drained by the loop before the handler runs.
    Notifier(Arc<Notifier>),
    /// A descriptor the handler owns and reads itself (a tap), polled while the handler
    /// [`wants`](EventHandler::wants) it.
    Fd(RawFd),
}

/// A device's work, run on its own thread.
pub trait EventHandler: Send + 'static {
    /// Source `token` (its index in the sources the loop was given) fired.
    fn handle_event(&mut self, token: usize);
    /// Whether to wait on source `token` now (a receive path with no guest buffer stops
    /// listening to its back end until the guest gives one).
    fn wants(&self, token: usize) -> bool {
        let _ = token;
        true
    }
    /// The loop resumed after a pause: serve what a handler left queued when the pause
    /// stopped it. (Rings during the pause stay pending on their notifiers.)
    fn resumed(&mut self) {}
}

#[derive(Debug, Default)]
struct ControlState {
    /// The machine asked the device to pause.
    paused: bool,
    /// The running loop reached its pause point.
    pause_acked: bool,
    /// The running loop must return.
    kill: bool,
    /// A loop is running (between spawn and its return).
    running: bool,
}

/// Raised while a pause or a kill waits for the device's thread: a handler with a long
/// batch (a disk's ring of requests) checks it between requests and leaves the rest queued.
#[derive(Clone, Debug, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, stop: bool) {
        self.0.store(stop, Ordering::Release);
    }
}

/// Pause, resume and kill for a device's event loops: shared by the device (which starts
/// and stops loops) and the device manager's handle (which pauses and resumes).
pub struct LoopControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    wake: Arc<Notifier>,
    stop: StopSignal,
}

impl LoopControl {
    pub fn new() -> io::Result<Arc<LoopControl>> {
        Ok(Arc::new(LoopControl {
            state: Mutex::new(ControlState::default()),
            changed: Condvar::new(),
            wake: Notifier::new()?,
            stop: StopSignal::default(),
        }))
    }

    /// What a handler checks between the requests of a batch.
    pub fn stop_signal(&self) -> StopSignal {
        self.stop.clone()
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, ControlState>) -> MutexGuard<'a, ControlState> {
        self.changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Pauses the device; returns once its loop (if one runs) has finished the event it was
    /// handling and stopped. Events that arrive meanwhile stay pending on their notifiers.
    pub fn pause(&self) {
        let mut state = self.lock();
        state.paused = true;
        self.stop.set(true);
        self.wake.notify();
        while state.running && !state.pause_acked && !state.kill {
            state = self.wait(state);
        }
    }

    /// Lets the device run again.
    pub fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        state.pause_acked = false;
        self.stop.set(state.kill);
        self.changed.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Asks the running loop to return (it finishes the event it is handling first).
    fn kill(&self) {
        let mut state = self.lock();
        state.kill = true;
        self.stop.set(true);
        self.wake.notify();
        self.changed.notify_all();
    }

    /// Called by the loop at its control event: blocks while paused. `None` when killed,
    /// else whether it was paused.
    fn checkpoint(&self) -> Option<bool> {
        self.wake.drain();
        let mut state = self.lock();
        let mut was_paused = false;
        while state.paused && !state.kill {
            was_paused = true;
            if !state.pause_acked {
                state.pause_acked = true;
                self.changed.notify_all();
            }
            state = self.wait(state);
        }
        (!state.kill).then_some(was_paused)
    }

    fn started(&self) {
        let mut state = self.lock();
        state.running = true;
        state.kill = false;
        state.pause_acked = false;
        self.stop.set(state.paused);
    }

    fn finished(&self) {
        let mut state = self.lock();
        state.running = false;
        state.kill = false;
        state.pause_acked = false;
        self.stop.set(state.paused);
        self.changed.notify_all();
    }
}

/// A running event loop. [`EventLoop::stop`] (or dropping it) kills it and joins the thread.
pub struct EventLoop<H: EventHandler> {
    control: Arc<LoopControl>,
    thread: Option<JoinHandle<H>>,
}

impl<H: EventHandler> EventLoop<H> {
    /// Starts a thread named `name` that runs `handler` on `sources`.
    pub fn spawn(
        name: &str,
        handler: H,
        sources: Vec<EventSource>,
        control: Arc<LoopControl>,
    ) -> io::Result<Self> {
        control.started();
        let looping = control.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let handler = run(handler, &sources, &looping);
                looping.finished();
                handler
            });
        match thread {
            Ok(thread) => Ok(EventLoop {
                control,
                thread: Some(thread),
            }),
            Err(e) => {
                control.finished();
                Err(e)
            }
        }
    }

    /// Kills the loop, waits for its thread (which finishes the event it is handling), and
    /// returns the handler; `None` if the thread panicked.
    pub fn stop(mut self) -> Option<H> {
        self.join()
    }

    fn join(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        self.control.kill();
        // A handler never stops its own loop, so this join cannot wait on itself.
        thread.join().ok()
    }
}

impl<H: EventHandler> Drop for EventLoop<H> {
    fn drop(&mut self) {
        self.join();
    }
}

/// The token of the control event, after the device's own sources.
fn run<H: EventHandler>(mut handler: H, sources: &[EventSource], control: &LoopControl) -> H {
    // One poll set for the life of the loop: no allocation per event.
    let mut fds: Vec<libc::pollfd> = sources
        .iter()
        .map(|source| libc::pollfd {
            fd: match source {
                EventSource::Notifier(n) => n.fd(),
                EventSource::Fd(fd) => *fd,
            },
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    fds.push(libc::pollfd {
        fd: control.wake.fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    let control_index = sources.len();
    match control.checkpoint() {
        None => return handler,
        Some(true) => handler.resumed(),
        Some(false) => {}
    }
    loop {
        for (token, pollfd) in fds[..control_index].iter_mut().enumerate() {
            let fd = match &sources[token] {
                EventSource::Notifier(n) => n.fd(),
                EventSource::Fd(fd) => *fd,
            };
            // poll(2) skips negative descriptors.
            pollfd.fd = if handler.wants(token) { fd } else { -1 };
            pollfd.revents = 0;
        }
        fds[control_index].revents = 0;
        // SAFETY: `fds` is a live, initialised array of `fds.len()` pollfd structs that poll
        // only reads and writes within; every descriptor in it is owned by a source or the
        // control, both of which outlive this call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("device event loop stops: poll: {error}");
            return handler;
        }
        if fds[control_index].revents != 0 {
            match control.checkpoint() {
                None => return handler,
                Some(true) => handler.resumed(),
                Some(false) => {}
            }
        }
        for token in 0..control_index {
            if fds[token].revents == 0 {
                continue;
            }
            if let EventSource::Notifier(n) = &sources[token] {
                n.drain();
            }
            handler.handle_event(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    struct Recorder {
        events: mpsc::Sender<usize>,
        gate: Arc<Mutex<()>>,
    }

    impl EventHandler for Recorder {
        fn handle_event(&mut self, token: usize) {
            let _held = self.gate.lock().unwrap();
            let _ = self.events.send(token);
        }
    }

    fn recorder() -> (Recorder, mpsc::Receiver<usize>, Arc<Mutex<()>>) {
        let (events, received) = mpsc::channel();
        let gate = Arc::new(Mutex::new(()));
        (
            Recorder {
                events,
                gate: gate.clone(),
            },
            received,
            gate,
        )
    }

    #[test]
    fn notifiers_reach_the_handler_with_their_token() {
        let (handler, received, _gate) = recorder();
        let a = Notifier::new().unwrap();
        let b = Notifier::new().unwrap();
        let sources = vec![
            EventSource::Notifier(a.clone()),
            EventSource::Notifier(b.clone()),
        ];
        let control = LoopControl::new().unwrap();
        let event_loop = EventLoop::spawn("test-loop", handler, sources, control).unwrap();
        b.notify();
        assert_eq!(received.recv_timeout(Duration::from_secs(5)), Ok(1));
        a.notify();
        a.notify();
        assert_eq!(received.recv_timeout(Duration::from_secs(5)), Ok(0));
        assert!(event_loop.stop().is_some());
        // The two notifies may have been served as one event or as two; drop what is left
        // before checking that the stopped thread answers nothing.
        while received.try_recv().is_ok() {}
        // The thread is gone: nothing answers any more.
        a.notify();
        assert!(received.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn pause_waits_for_the_running_event_and_holds_later_ones_until_resume() {
        let (handler, received, gate) = recorder();
        let n = Notifier::new().unwrap();
        let control = LoopControl::new().unwrap();
        let _loop = EventLoop::spawn(
            "test-pause",
            handler,
            vec![EventSource::Notifier(n.clone())],
            control.clone(),
        )
        .unwrap();
        // The handler blocks inside an event; pause must wait for it.
        let held = gate.lock().unwrap();
        n.notify();
        std::thread::sleep(Duration::from_millis(20));
        let pausing = {
            let control = control.clone();
            std::thread::spawn(move || control.pause())
        };
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !pausing.is_finished(),
            "pause returned with an event running"
        );
        drop(held);
        pausing.join().unwrap();
        assert_eq!(received.recv_timeout(Duration::from_secs(5)), Ok(0));
        // Paused: a new ring waits.
        n.notify();
        assert!(received.recv_timeout(Duration::from_millis(100)).is_err());
        control.resume();
        assert_eq!(received.recv_timeout(Duration::from_secs(5)), Ok(0));
    }

    #[test]
    fn a_loop_started_while_paused_waits_for_resume_and_stop_still_works() {
        let (handler, received, _gate) = recorder();
        let n = Notifier::new().unwrap();
        let control = LoopControl::new().unwrap();
        control.pause();
        n.notify();
        let event_loop = EventLoop::spawn(
            "test-paused",
            handler,
            vec![EventSource::Notifier(n.clone())],
            control.clone(),
        )
        .unwrap();
        assert!(received.recv_timeout(Duration::from_millis(100)).is_err());
        assert!(event_loop.stop().is_some(), "a paused loop can be killed");
        control.resume();
    }
}
