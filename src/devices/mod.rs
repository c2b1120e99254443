//! Emulated hardware on the port and MMIO buses.

pub mod ahci;
pub mod bus;
pub mod console_log;
pub mod doorbell;
pub mod event_loop;
pub mod irq;
pub mod pci;
pub mod power;
pub mod power_mgmt;
pub mod rtc;
pub mod serial;
pub mod terminal;
pub mod virtio;
pub mod virtio_blk_req;

use std::sync::Arc;

use pci::SharedPciDevice;

/// What the device manager keeps of a device besides its place on a bus: the owner of its
/// threads. Dropping it stops them (no thread outlives its device).
pub trait DeviceHandle: Send {
    /// Stops touching guest memory and raising interrupts: a request in flight finishes,
    /// the rest wait in their queues. Returns once the device is quiet.
    fn pause(&mut self) {}
    /// Serves again whatever the guest queued meanwhile.
    fn resume(&mut self) {}
    // No `reset`: a guest's reset of one device reaches the device through its own
    // registers (virtio status 0, AHCI GHC.HR), and a machine reset ends the process, as in
    // xhyve (see `DeviceManager`).
    /// The machine is going away: stop the threads and release the host resources that
    /// belong to the device but not to its PCI function (which the buses keep alive).
    fn shutdown(&mut self) {}
}

/// A PCI function as a device's builder returns it.
pub struct BuiltDevice {
    pub function: SharedPciDevice,
    pub handle: Option<Box<dyn DeviceHandle>>,
}

impl BuiltDevice {
    /// A function with no threads of its own.
    pub fn plain(function: SharedPciDevice) -> Self {
        BuiltDevice {
            function,
            handle: None,
        }
    }

    pub fn with_handle(function: SharedPciDevice, handle: impl DeviceHandle + 'static) -> Self {
        BuiltDevice {
            function,
            handle: Some(Box::new(handle)),
        }
    }

    /// A function built on its own mutex type, e.g. `Arc<Mutex<VirtioPci<D>>>`.
    pub fn shared<T: pci::PciDevice + 'static>(function: Arc<std::sync::Mutex<T>>) -> Self {
        Self::plain(function)
    }
}
