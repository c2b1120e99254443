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
    /// A machine reset (the control API's `Reset`) is under way: returns once the device's
    /// threads are quiet, a request in flight finished (waited for on the thread's own
    /// event, never polled), and what the handle owns beyond its PCI function is back at its
    /// power-on state. The PCI function itself is reset next, by the PCI bus
    /// ([`pci::PciDevice::reset`]). A guest's reset of one device does not come here: it goes
    /// through the device's registers (virtio status 0, AHCI GHC.HR).
    fn reset(&mut self) {}
    /// The machine is going away: stop the threads and release the host resources that
    /// belong to the device but not to its PCI function (which the buses keep alive).
    fn shutdown(&mut self) {}
}

/// A device model off PCI (UART, RTC, HPET, PIT, ACPI PM, i8042) that a machine reset
/// puts back in its power-on state.
pub trait PowerOnReset: Send {
    fn power_on_reset(&mut self);
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
