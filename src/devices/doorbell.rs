//! Doorbells served without a VM exit: a device asks the VMM to have the hypervisor signal
//! a queue's notifier when the guest writes a notify address (ioeventfd on KVM); the
//! device's thread waits on that notifier. A device without this service keeps seeing the
//! write as a BAR access, and rings the notifier itself.

use std::os::fd::RawFd;

pub use crate::hv::Doorbell;

/// A registration, to undo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DoorbellId(pub u64);

/// The VMM's doorbell service, as devices see it.
pub trait Doorbells: Send + Sync {
    /// From now on a guest write matching `doorbell` signals `notifier_fd` (a notifier's
    /// eventfd) instead of exiting. `None` when the hypervisor cannot do it: the write then
    /// keeps arriving through the BAR as before.
    fn register(&self, doorbell: Doorbell, notifier_fd: RawFd) -> Option<DoorbellId>;

    /// Stops watching; the address exits to the VMM again.
    fn unregister(&self, id: DoorbellId);
}
