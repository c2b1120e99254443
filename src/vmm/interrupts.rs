//! Interrupt lines and MSIs backed by the hypervisor's interrupt controllers.

use std::sync::Arc;

use crate::devices::irq::{InterruptLine, MsiSender};
use crate::hv::Vm;

/// A GSI driven through `Vm::set_irq_line` (KVM_IRQ_LINE with the in-kernel irqchip).
pub struct HvInterruptLine {
    vm: Arc<dyn Vm>,
    gsi: u32,
}

impl HvInterruptLine {
    pub fn new(vm: Arc<dyn Vm>, gsi: u32) -> Arc<Self> {
        Arc::new(HvInterruptLine { vm, gsi })
    }
}

impl InterruptLine for HvInterruptLine {
    fn set_level(&self, high: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, high) {
            log::trace!("GSI {}: {e}", self.gsi);
        }
    }

    fn gsi(&self) -> u32 {
        self.gsi
    }
}

pub struct HvMsiSender {
    vm: Arc<dyn Vm>,
}

impl HvMsiSender {
    pub fn new(vm: Arc<dyn Vm>) -> Arc<Self> {
        Arc::new(HvMsiSender { vm })
    }
}

impl MsiSender for HvMsiSender {
    fn send_msi(&self, address: u64, data: u32) {
        if let Err(e) = self.vm.signal_msi(address, data) {
            log::trace!("MSI {address:#x}/{data:#x}: {e}");
        }
    }
}

/// IOAPIC pins driven by the VMM's own timers (the HPET), through the hypervisor.
pub struct HvPinSink {
    vm: Arc<dyn Vm>,
}

impl HvPinSink {
    pub fn new(vm: Arc<dyn Vm>) -> Arc<Self> {
        Arc::new(HvPinSink { vm })
    }
}

impl crate::intc::hpet::HpetIrqSink for HvPinSink {
    fn set_pin_level(&self, pin: u32, high: bool) {
        if let Err(e) = self.vm.set_irq_line(pin, high) {
            log::trace!("GSI {pin}: {e}");
        }
    }
}

/// Who delivers the machine's interrupts: the hypervisor's irqchip or the VMM's own
/// (`UserIrqChip`). Devices get their lines from here and never know which.
#[derive(Clone)]
pub enum InterruptBackend {
    Hypervisor(Arc<dyn Vm>),
    User(Arc<super::user_irqchip::UserIrqChip>),
}

impl InterruptBackend {
    pub fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        match self {
            InterruptBackend::Hypervisor(vm) => HvInterruptLine::new(vm.clone(), gsi),
            InterruptBackend::User(chip) => {
                super::user_irqchip::UserInterruptLine::new(chip.clone(), gsi)
            }
        }
    }

    pub fn msi_sender(&self) -> Arc<dyn MsiSender> {
        match self {
            InterruptBackend::Hypervisor(vm) => HvMsiSender::new(vm.clone()),
            InterruptBackend::User(chip) => {
                Arc::new(super::user_irqchip::UserMsiSender(chip.clone()))
            }
        }
    }

    pub fn pin_sink(&self) -> Arc<dyn crate::intc::hpet::HpetIrqSink> {
        match self {
            InterruptBackend::Hypervisor(vm) => HvPinSink::new(vm.clone()),
            InterruptBackend::User(chip) => {
                Arc::new(super::user_irqchip::UserPinSink(chip.clone()))
            }
        }
    }
}
