//! How devices raise interrupts, independent of who delivers them.
//!
//! The VMM backs these with KVM's in-kernel irqchip (KVM_IRQ_LINE / KVM_SIGNAL_MSI) or with
//! the userspace controllers in `intc`. A device never knows which.

/// One interrupt input pin (a GSI: an IOAPIC pin, and for GSIs below 16 also the PIC line).
pub trait InterruptLine: Send + Sync {
    /// Drives the line to `high`.
    fn set_level(&self, high: bool);

    /// An edge: raise, then lower. ISA devices (the 16550, the RTC) signal this way.
    fn pulse(&self) {
        self.set_level(true);
        self.set_level(false);
    }

    /// The GSI this line drives, for tables and diagnostics.
    fn gsi(&self) -> u32;
}

/// A message-signalled interrupt sender.
pub trait MsiSender: Send + Sync {
    fn send_msi(&self, address: u64, data: u32);
}

#[cfg(test)]
pub mod test_util {
    use super::InterruptLine;
    use std::sync::Mutex;

    /// Records every level change, for device unit tests.
    #[derive(Default)]
    pub struct RecordingLine {
        pub gsi: u32,
        pub levels: Mutex<Vec<bool>>,
    }

    impl InterruptLine for RecordingLine {
        fn set_level(&self, high: bool) {
            self.levels.lock().unwrap().push(high);
        }
        fn gsi(&self) -> u32 {
            self.gsi
        }
    }
}
