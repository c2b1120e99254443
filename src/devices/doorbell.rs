//! Doorbells served without a VM exit: the device asks the VMM to watch a notify address,
//! and the VMM rings the device from its own thread when the guest writes there
//! (ioeventfd on KVM). A device without this service keeps seeing the write as a BAR access.

use std::sync::{Mutex, Weak};

use crate::devices::pci::PciDevice;
pub use crate::hv::Doorbell;

/// A registration, to undo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DoorbellId(pub u64);

/// The VMM's doorbell service, as devices see it.
pub trait Doorbells: Send + Sync {
    /// From now on a guest write matching `doorbell` calls `target.ring_doorbell(queue)` on
    /// the service's thread instead of exiting. `None` when the hypervisor cannot do it: the
    /// write then keeps arriving through the BAR as before.
    fn register(
        &self,
        doorbell: Doorbell,
        target: Weak<Mutex<dyn PciDevice>>,
        queue: u16,
    ) -> Option<DoorbellId>;

    /// Stops watching; the address exits to the VMM again.
    fn unregister(&self, id: DoorbellId);
}
