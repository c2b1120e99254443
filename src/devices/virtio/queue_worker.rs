//! The thread that serves a virtio device's queues: the shared [`EventLoop`] with one source
//! per queue notifier, plus the device's back-end source if it has one. A device implements
//! [`VirtioQueues`] (what to do with one queue's available buffers) and embeds a
//! [`QueueWorker`], which starts the thread at activation, stops it at reset (waiting on
//! its exit, not polling), and gives the device manager a pause/resume handle.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::{ActivateError, Activation, QueueError, SharedQueue, VirtioInterrupt};
use crate::devices::bus::lock;
use crate::devices::event_loop::{
    EventHandler, EventLoop, EventSource, LoopControl, Notifier, StopSignal,
};
use crate::devices::DeviceHandle;
use crate::memory::GuestMemory;

/// A back end's own event source, served on the device's thread.
pub enum Backend {
    /// A descriptor that becomes readable when the back end has data (a tap).
    #[cfg(unix)]
    Fd(std::os::fd::RawFd),
    /// A notifier the back end's callback rings (macOS vmnet).
    Notifier(Arc<crate::devices::event_loop::Notifier>),
}

/// What a device does with its queues' buffers; runs on the device's thread.
pub trait VirtioQueues: Send + 'static {
    /// Serves the available buffers of queue `index`. Returns whether any were used (so the
    /// driver may need an interrupt). Must bound its own work per call.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError>;
    /// The signal raised while a pause or a reset waits for this thread; a device whose
    /// batches run long (a disk) keeps it and checks it between requests.
    fn set_stop_signal(&mut self, stop: StopSignal) {
        let _ = stop;
    }
    /// The features the driver accepted, before any queue is served.
    fn set_features(&mut self, features: u64) {
        let _ = features;
    }
    /// The back end's event source and the queue to serve when it fires.
    fn backend(&self) -> Option<(Backend, usize)> {
        None
    }
    /// Whether to wait on the back end now (false while the guest gave no buffer for what
    /// the back end holds: its next doorbell retries).
    fn wants_backend(&self) -> bool {
        true
    }
}

/// The event handler: queue `i` is source `i`; the back end, if any, comes last.
struct QueueLoop<Q: VirtioQueues> {
    queues: Q,
    rings: Vec<SharedQueue>,
    notifiers: Vec<Arc<Notifier>>,
    memory: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    backend_queue: Option<usize>,
    /// A queue error stopped the device until the driver resets it.
    broken: bool,
}

impl<Q: VirtioQueues> QueueLoop<Q> {
    fn serve(&mut self, index: usize) {
        if self.broken {
            return;
        }
        let Some(ring) = self.rings.get(index) else {
            return;
        };
        let mut queue = lock(ring);
        if !queue.ready() {
            return;
        }
        let result = self
            .queues
            .process_queue(index, &mut queue, &self.memory)
            .and_then(|used| Ok(used && queue.needs_notification(&self.memory)?));
        drop(queue);
        match result {
            Ok(true) => self.interrupt.signal_used_queue(index),
            Ok(false) => {}
            Err(e) => {
                self.broken = true;
                self.interrupt.queue_error(&e);
            }
        }
    }
}

impl<Q: VirtioQueues> EventHandler for QueueLoop<Q> {
    fn handle_event(&mut self, token: usize) {
        if token < self.rings.len() {
            if !self.notifiers[token].take_rung_by_vmm() {
                // The hypervisor rang it (ioeventfd): the doorbell never exited. Tests read
                // this line to tell the two paths apart.
                log::trace!("virtio doorbell {token} by eventfd");
            }
            self.serve(token);
        } else if let Some(index) = self.backend_queue {
            self.serve(index);
        }
    }

    fn wants(&self, token: usize) -> bool {
        token < self.rings.len() || self.queues.wants_backend()
    }

    fn resumed(&mut self) {
        for index in 0..self.rings.len() {
            self.serve(index);
        }
    }
}

/// A device's queue-serving thread, across activations.
pub struct QueueWorker<Q: VirtioQueues> {
    name: &'static str,
    /// The device's work while no thread runs it.
    idle: Option<Q>,
    running: Option<EventLoop<QueueLoop<Q>>>,
    control: Arc<LoopControl>,
}

impl<Q: VirtioQueues> QueueWorker<Q> {
    /// A worker for `queues`, whose thread will be called `name`.
    pub fn new(name: &'static str, mut queues: Q) -> std::io::Result<Self> {
        let control = LoopControl::new()?;
        queues.set_stop_signal(control.stop_signal());
        Ok(QueueWorker {
            name,
            idle: Some(queues),
            running: None,
            control,
        })
    }

    /// Starts the thread on what `activation` hands over.
    pub fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Some(mut queues) = self.idle.take() else {
            return Err(ActivateError::AlreadyActive);
        };
        queues.set_features(activation.features);
        let mut sources = Vec::with_capacity(activation.queues.len() + 1);
        let mut rings = Vec::with_capacity(activation.queues.len());
        let mut notifiers = Vec::with_capacity(activation.queues.len());
        for active in activation.queues {
            sources.push(EventSource::Notifier(active.notifier.clone()));
            notifiers.push(active.notifier);
            rings.push(active.queue);
        }
        let backend_queue = match queues.backend() {
            Some((backend, queue)) => {
                sources.push(match backend {
                    #[cfg(unix)]
                    Backend::Fd(fd) => EventSource::Fd(fd),
                    Backend::Notifier(n) => EventSource::Notifier(n),
                });
                Some(queue)
            }
            None => None,
        };
        let handler = QueueLoop {
            queues,
            rings,
            notifiers,
            memory: activation.memory,
            interrupt: activation.interrupt,
            backend_queue,
            broken: false,
        };
        // On failure the handler (and the device's work with it) is lost with the thread
        // that never started; the device then stays inactive until the VM ends.
        let running = EventLoop::spawn(self.name, handler, sources, self.control.clone())
            .map_err(ActivateError::Thread)?;
        self.running = Some(running);
        Ok(())
    }

    /// Stops the thread (after the request it is running) and takes the work back.
    pub fn reset(&mut self) {
        if let Some(running) = self.running.take() {
            if let Some(handler) = running.stop() {
                self.idle = Some(handler.queues);
            }
        }
    }

    pub fn is_active(&self) -> bool {
        self.running.is_some()
    }

    /// The device's work, while no thread runs it (for tests and diagnostics).
    pub fn idle(&self) -> Option<&Q> {
        self.idle.as_ref()
    }

    pub fn idle_mut(&mut self) -> Option<&mut Q> {
        self.idle.as_mut()
    }

    /// What the device manager pauses and resumes this device through.
    pub fn handle(&self) -> Box<dyn DeviceHandle> {
        Box::new(PauseHandle(self.control.clone()))
    }
}

/// Pauses and resumes a device's thread, whichever activation it belongs to.
pub struct PauseHandle(Arc<LoopControl>);

impl DeviceHandle for PauseHandle {
    fn pause(&mut self) {
        self.0.pause();
    }
    fn resume(&mut self) {
        self.0.resume();
    }
    /// Quiet for a machine reset: the loop finishes the request it runs and stops at its
    /// pause point (`LoopControl::pause` waits on the loop's acknowledgement). The transport's
    /// reset then ends the loop and releases the queues.
    fn reset(&mut self) {
        self.0.pause();
    }
}
