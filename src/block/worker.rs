//! An I/O thread per disk, so a vCPU that rings a doorbell never waits for the host disk.
//!
//! The vCPU thread submits a job (a small value: which request, where its buffers are) into
//! a bounded channel, which does not allocate; the worker runs the handler on it, and the
//! handler signals completion itself (used ring + interrupt, or a channel in tests).

use crossbeam_channel::{bounded, Sender, TrySendError};
use std::io;
use std::thread::JoinHandle;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError<J> {
    /// The queue is full; the job is handed back so the caller can retry or fail it.
    #[error("I/O queue is full")]
    Full(J),
    /// The worker has stopped (its handler panicked); the job is handed back.
    #[error("I/O worker has stopped")]
    Stopped(J),
}

/// A thread that runs jobs of type `J` in submission order.
pub struct IoWorker<J: Send + 'static> {
    sender: Option<Sender<J>>,
    thread: Option<JoinHandle<()>>,
}

impl<J: Send + 'static> IoWorker<J> {
    /// Starts a thread named `name` running `handler` on each job; at most `depth` jobs wait.
    pub fn spawn<F>(name: &str, depth: usize, mut handler: F) -> io::Result<Self>
    where
        F: FnMut(J) + Send + 'static,
    {
        let (sender, receiver) = bounded::<J>(depth.max(1));
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                for job in receiver {
                    handler(job);
                }
            })?;
        Ok(IoWorker {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Queues `job` without blocking (the vCPU path).
    pub fn submit(&self, job: J) -> Result<(), SubmitError<J>> {
        let Some(sender) = &self.sender else {
            return Err(SubmitError::Stopped(job));
        };
        sender.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) => SubmitError::Full(job),
            TrySendError::Disconnected(job) => SubmitError::Stopped(job),
        })
    }

    /// Queues `job`, waiting for room (for callers that are not vCPUs).
    pub fn submit_wait(&self, job: J) -> Result<(), SubmitError<J>> {
        let Some(sender) = &self.sender else {
            return Err(SubmitError::Stopped(job));
        };
        sender
            .send(job)
            .map_err(|e| SubmitError::Stopped(e.into_inner()))
    }
}

impl<J: Send + 'static> Drop for IoWorker<J> {
    /// Lets queued jobs finish, then stops the thread.
    fn drop(&mut self) {
        self.sender.take();
        if let Some(thread) = self.thread.take() {
            // A handler may drop the last owner of its own worker; it cannot join itself.
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::test_util::TempImage;
    use crate::block::{BlockBackend, BlockOptions, RawImage};
    use std::sync::mpsc;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn jobs_run_off_the_submitting_thread_in_order() {
        let (done_tx, done_rx) = mpsc::channel();
        let worker = IoWorker::spawn("test-io", 4, move |n: u32| {
            let name = std::thread::current().name().map(str::to_string);
            done_tx.send((n, name)).unwrap();
        })
        .unwrap();
        for n in 0..3 {
            worker.submit_wait(n).unwrap();
        }
        for n in 0..3 {
            let (got, thread) = done_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(got, n);
            assert_eq!(thread.as_deref(), Some("test-io"));
        }
    }

    #[test]
    fn a_full_queue_hands_the_job_back() {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let worker = IoWorker::spawn("test-full", 1, move |_: u32| {
            let _ = gate_rx.recv();
        })
        .unwrap();
        // The worker takes the first job and blocks in it; the second fills the queue.
        worker.submit(1).unwrap();
        let mut queued = 0;
        let mut refused = None;
        for n in 2..10 {
            match worker.submit(n) {
                Ok(()) => queued += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        assert!(queued <= 2, "queued {queued} jobs into a queue of depth 1");
        assert!(matches!(refused, Some(SubmitError::Full(_))));
        drop(gate_tx);
    }

    #[test]
    fn a_dead_worker_reports_stopped() {
        let worker = IoWorker::spawn("test-dead", 1, |_: u32| panic!("handler failed")).unwrap();
        worker.submit_wait(1).unwrap();
        let mut result = Ok(());
        for _ in 0..500 {
            result = worker.submit(2);
            if matches!(result, Err(SubmitError::Stopped(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(result, Err(SubmitError::Stopped(2)));
    }

    #[test]
    fn a_handler_may_drop_its_own_worker() {
        // A device's worker holds the device weakly; if it ends up dropping the last owner,
        // the worker is dropped on its own thread and must not try to join itself.
        let slot: Arc<std::sync::Mutex<Option<IoWorker<u32>>>> = Arc::default();
        let (done_tx, done_rx) = mpsc::channel();
        let handler_slot = Arc::clone(&slot);
        let worker = IoWorker::spawn("test-self-drop", 1, move |_: u32| {
            drop(handler_slot.lock().unwrap().take());
            done_tx.send(()).unwrap();
        })
        .unwrap();
        *slot.lock().unwrap() = Some(worker);
        if let Some(worker) = slot.lock().unwrap().as_ref() {
            worker.submit_wait(1).unwrap();
        }
        assert!(
            done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the handler did not survive dropping its worker"
        );
        assert!(slot.lock().unwrap().is_none());
    }

    #[test]
    fn disk_writes_complete_through_a_channel() {
        let img = TempImage::new("worker", 1 << 20);
        let disk = Arc::new(RawImage::open(&BlockOptions::new(&img.path)).unwrap());
        let (done_tx, done_rx) = mpsc::channel();
        let worker_disk = Arc::clone(&disk);
        let worker = IoWorker::spawn("test-disk", 8, move |(offset, byte): (u64, u8)| {
            let result = worker_disk.write_at(offset, &[byte; 512]);
            done_tx.send((offset, result.is_ok())).unwrap();
        })
        .unwrap();
        worker.submit((0, 0xAB)).unwrap();
        worker.submit((4096, 0xCD)).unwrap();
        worker.submit((1 << 20, 0xEF)).unwrap();
        let mut results: Vec<_> = (0..3)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        results.sort();
        assert_eq!(results, vec![(0, true), (4096, true), (1 << 20, false)]);
        drop(worker);
        let mut buf = [0u8; 512];
        disk.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0xCD; 512]);
        assert_eq!(disk.size(), 1 << 20);
    }
}
