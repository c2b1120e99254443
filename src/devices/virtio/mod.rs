//! virtio devices: the PCI transport ([`pci`]) and the device models behind it.
//!
//! A device implements [`VirtioDevice`]: its type, features and configuration, and
//! `activate`, which hands it its queues, their notifiers, its interrupt and guest memory
//! when the driver is ready. Most devices then serve their queues with a
//! [`queue_worker::QueueWorker`]: implement [`queue_worker::VirtioQueues`] (what to do with
//! one queue's buffers) and the worker runs it on the shared event loop, with pause and
//! kill. The transport owns feature negotiation, device status, the queues' configuration
//! and the interrupt state, so a device never sees PCI.

pub mod blk;
pub mod fs_devices;
pub mod fs_queue;
pub mod fuzz;
pub mod net;
pub mod pci;
pub mod queue_worker;
pub mod rnd;
pub mod vsock;
pub mod vsock_queue;

use std::sync::{Arc, Mutex};

use virtio_queue::Queue;

use crate::devices::event_loop::Notifier;
use crate::devices::DeviceHandle;

use crate::memory::GuestMemory;

/// Red Hat's virtio PCI vendor ID.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1AF4;

/// Device status bits (virtio 1.x, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Transport feature bits the transport offers for every device.
pub const F_RING_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const F_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Why a queue could not be served; the transport then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("buffer {addr:#x}+{len:#x} is not in guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    #[error("descriptor {head} chain has a device-readable buffer where the device writes")]
    NotWritable { head: u16 },
    #[error("host entropy source failed: {0}")]
    Entropy(std::io::Error),
    #[error("virtio-blk: {0}")]
    BlockRequest(#[from] crate::devices::virtio_blk_req::RequestError),
    #[error("{0}")]
    Activate(#[from] ActivateError),
}

/// One virtqueue, shared by the transport (which configures it) and the device's thread
/// (which serves it), each under the queue's own lock: completing a request never takes the
/// transport's lock.
pub type SharedQueue = Arc<Mutex<Queue>>;

/// How a device raises its interrupts, without the transport's lock.
pub trait VirtioInterrupt: Send + Sync {
    /// Queue `index` has new used buffers the driver asked to hear about.
    fn signal_used_queue(&self, index: usize);
    /// The driver broke the rules: the device stops (DEVICE_NEEDS_RESET) until it resets.
    fn queue_error(&self, why: &QueueError);
}

/// One queue as activation hands it over: the ring, and the notifier its doorbell rings
/// (an ioeventfd, or the transport on the exit path).
pub struct ActiveQueue {
    pub queue: SharedQueue,
    pub notifier: Arc<Notifier>,
}

/// Everything a device needs to serve its queues, handed over when the driver sets
/// DRIVER_OK.
pub struct Activation {
    pub memory: GuestMemory,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("virtio device: cannot start its thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("virtio device: already active")]
    AlreadyActive,
}

/// A virtio device as the transport sees it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (4 = entropy source).
    fn device_type(&self) -> u16;
    /// PCI class, subclass and programming interface the function presents.
    fn pci_class(&self) -> (u8, u8, u8);
    /// Device-specific feature bits (the transport adds its own).
    fn device_features(&self) -> u64;
    /// The maximum size of each queue (powers of two).
    fn queue_max_sizes(&self) -> &[u16];
    /// Bytes of device-specific configuration.
    fn config_size(&self) -> u64 {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// The driver set DRIVER_OK: the device takes its queues and starts serving them.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device. Returns once no request of the device runs any more
    /// (it waits for its thread to stop, on an event); the transport then resets the queues.
    fn reset(&mut self);
    /// The handle the device manager pauses and resumes the device through.
    fn handle(&self) -> Option<Box<dyn DeviceHandle>> {
        None
    }
}
