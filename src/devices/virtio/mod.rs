//! virtio devices: the PCI transport ([`pci`]) and the device models behind it.
//!
//! A device model implements [`VirtioDevice`]: its type, features, queues and what it does
//! with a queue's buffers. The transport owns feature negotiation, device status, the queues'
//! configuration and interrupts, so a model never sees PCI.

pub mod blk;
pub mod fs_queue;
pub mod fuzz;
pub mod net;
pub mod pci;
pub mod rnd;
pub mod vsock_queue;

use virtio_queue::Queue;

use crate::vmm::memory::GuestMemory;

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
    #[error("the device's I/O thread has stopped")]
    WorkerStopped,
}

/// A virtio device model.
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
    /// Serves the available buffers of queue `index`. Returns whether any were used (so the
    /// driver may need an interrupt). Must bound its own work per call.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<bool, QueueError>;
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The features the driver accepted (legacy: on each write; modern: at DRIVER_OK).
    fn ack_features(&mut self, features: u64) {
        let _ = features;
    }
    /// A doorbell for queue `index`. A device that serves its queues on its own thread wakes
    /// it and returns true; the transport then leaves the queue alone (the thread calls
    /// [`pci::VirtioPci::service_queue`]). Runs on the vCPU thread: must not block.
    fn wake(&mut self, index: usize) -> bool {
        let _ = index;
        false
    }
}
