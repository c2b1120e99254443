//! Interrupt lines and MSIs backed by the hypervisor's interrupt controllers.
//!
//! With KVM's in-kernel irqchip, MSIs go through interrupt file descriptors (irqfd): a device
//! thread raises one with a single write(2), no ioctl and no lock. `XHYVE_IRQFD=off` keeps
//! them on KVM_SIGNAL_MSI, to compare (read once into `config::HostSettings`).
//!
//! GSI lines stay on `Vm::set_irq_line` (KVM_IRQ_LINE). Levels: the device lowers its line
//! (an ISR read) and the guest sees that at once in the IOAPIC's remote IRR and the PIC's IRR;
//! an irqfd with a resample fd would hold the line until the guest's EOI and need a
//! resampling thread. Edges: KVM injects an irqfd on an IOAPIC/PIC route from a kernel worker,
//! not in the writer's context as for MSIs; measured here, that made a pulse dearer for the
//! sender (medians 2.6-4.4 us against 1.4 us for two KVM_IRQ_LINE calls), and the UART
//! pulses on the vCPU's own exit path.

#[cfg(target_os = "linux")]
mod irqfd;

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

#[cfg(target_os = "linux")]
fn hypervisor_msi_sender(vm: &Arc<dyn Vm>, irqfd: bool) -> Arc<dyn MsiSender> {
    if irqfd {
        irqfd::IrqfdMsiSender::new(vm.clone())
    } else {
        HvMsiSender::new(vm.clone())
    }
}

#[cfg(not(target_os = "linux"))]
fn hypervisor_msi_sender(vm: &Arc<dyn Vm>, _irqfd: bool) -> Arc<dyn MsiSender> {
    HvMsiSender::new(vm.clone())
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
        let gsi = hypervisor_gsi(pin);
        if let Err(e) = self.vm.set_irq_line(gsi, high) {
            log::trace!("GSI {gsi}: {e}");
        }
    }
}

/// The hypervisor's GSI that drives IOAPIC pin `pin`. KVM's GSI 0 is ISA IRQ 0, routed to PIC
/// IRQ 0 and IOAPIC pin 2 as the MADT's override says (src/hv/kvm/routing.rs), where legacy
/// replacement sends HPET timer 0; KVM's GSI 2 is the PIC cascade and reaches nothing, so
/// raising it lost every tick of Linux's boot clockevent (and failed its timer check).
fn hypervisor_gsi(pin: u32) -> u32 {
    if pin == crate::intc::hpet::LEGACY_TIMER0_PIN {
        0
    } else {
        pin
    }
}

/// Who delivers the machine's interrupts: the hypervisor's irqchip or the VMM's own
/// (`UserIrqChip`). Devices get their lines from here and never know which.
#[derive(Clone)]
pub enum InterruptBackend {
    /// The hypervisor's irqchip; `true`: MSIs through irqfds where it has them
    /// (`XHYVE_IRQFD`).
    Hypervisor(Arc<dyn Vm>, bool),
    User(Arc<super::user_irqchip::UserIrqChip>),
}

impl InterruptBackend {
    pub fn line(&self, gsi: u32) -> Arc<dyn InterruptLine> {
        match self {
            InterruptBackend::Hypervisor(vm, _) => HvInterruptLine::new(vm.clone(), gsi),
            InterruptBackend::User(chip) => {
                super::user_irqchip::UserInterruptLine::new(chip.clone(), gsi)
            }
        }
    }

    pub fn msi_sender(&self) -> Arc<dyn MsiSender> {
        match self {
            InterruptBackend::Hypervisor(vm, irqfd) => hypervisor_msi_sender(vm, *irqfd),
            InterruptBackend::User(chip) => {
                Arc::new(super::user_irqchip::UserMsiSender(chip.clone()))
            }
        }
    }

    pub fn pin_sink(&self) -> Arc<dyn crate::intc::hpet::HpetIrqSink> {
        match self {
            InterruptBackend::Hypervisor(vm, _) => HvPinSink::new(vm.clone()),
            InterruptBackend::User(chip) => {
                Arc::new(super::user_irqchip::UserPinSink(chip.clone()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpet_pins_map_to_the_gsis_that_reach_them() {
        // Legacy replacement: timer 0 is ISA IRQ 0, timer 1 the RTC's IRQ 8.
        assert_eq!(hypervisor_gsi(crate::intc::hpet::LEGACY_TIMER0_PIN), 0);
        assert_eq!(hypervisor_gsi(crate::intc::hpet::LEGACY_TIMER1_PIN), 8);
        // Tn_INT_ROUTE_CAP pins 20-23 are their own GSIs.
        assert_eq!(hypervisor_gsi(20), 20);
        assert_eq!(hypervisor_gsi(23), 23);
    }
}
