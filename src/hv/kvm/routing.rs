//! KVM's GSI routing table (KVM_SET_GSI_ROUTING), which replaces the kernel's default table as
//! a whole: the IOAPIC and PIC routes our MADT and MP table describe, plus one route per MSI
//! message that an irqfd raises.
//!
//! KVM's default table sends GSI 0 (the in-kernel PIT) to IOAPIC pin 0, but our tables declare
//! the ISA override IRQ 0 -> GSI 2, as PCs do. A guest that follows them (Linux does) would get
//! no timer, so GSI 0 goes to pin 2 here, and pin 2's own GSI (the PIC cascade) to nothing.
//! Whatever drives ISA IRQ 0 (the PIT, the HPET's legacy timer 0) must raise GSI 0.

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};

/// IOAPIC pins, each the GSI of the same number.
pub const IOAPIC_PINS: u32 = 24;
/// GSIs below this also drive a PIC line (ISA IRQs).
const PIC_LINES: u32 = 16;
/// ISA IRQ 0, the PIT, which the MADT overrides to IOAPIC pin 2.
const TIMER_IRQ: u32 = 0;
/// The master PIC's cascade input, and the IOAPIC pin the timer takes.
const CASCADE_GSI: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MsiRoute {
    gsi: u32,
    address: u64,
    data: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingError {
    #[error("no GSI left for MSI route {0} (KVM allows {KVM_MAX_IRQ_ROUTES} routes)")]
    Full(usize),
    #[error("GSI {0} is not an MSI route")]
    NotMsi(u32),
}

/// The table as we want KVM to hold it.
#[derive(Debug, Default)]
pub struct GsiRoutes {
    msi: Vec<MsiRoute>,
}

impl GsiRoutes {
    /// Adds a route for one MSI message on a fresh GSI above the IOAPIC's pins.
    pub fn add_msi(&mut self, address: u64, data: u32) -> Result<u32, RoutingError> {
        let gsi = IOAPIC_PINS + self.msi.len() as u32;
        if self.len() >= KVM_MAX_IRQ_ROUTES {
            return Err(RoutingError::Full(self.msi.len()));
        }
        self.msi.push(MsiRoute { gsi, address, data });
        Ok(gsi)
    }

    pub fn retarget_msi(&mut self, gsi: u32, address: u64, data: u32) -> Result<(), RoutingError> {
        let route = self
            .msi
            .iter_mut()
            .find(|r| r.gsi == gsi)
            .ok_or(RoutingError::NotMsi(gsi))?;
        route.address = address;
        route.data = data;
        Ok(())
    }

    /// Undoes the last `add_msi`, when KVM refused the table or the irqfd.
    pub fn remove_last_msi(&mut self) {
        self.msi.pop();
    }

    fn len(&self) -> usize {
        // Every GSI below 24 but the cascade to the IOAPIC, below 16 but the cascade to a PIC.
        (IOAPIC_PINS - 1 + PIC_LINES - 1) as usize + self.msi.len()
    }

    /// The entries: every GSI below 24 to its IOAPIC pin, below 16 also to the PIC, except
    /// that GSI 0 reaches IOAPIC pin 2 (the MADT's override) and GSI 2, the cascade, nothing;
    /// then the MSI routes.
    pub fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut entries = Vec::with_capacity(self.len());
        for gsi in 0..IOAPIC_PINS {
            if gsi == CASCADE_GSI {
                continue;
            }
            let pin = if gsi == TIMER_IRQ { CASCADE_GSI } else { gsi };
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, pin));
            if gsi < PIC_LINES {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_entry(gsi, chip, gsi % 8));
            }
        }
        for route in &self.msi {
            let mut entry = kvm_irq_routing_entry {
                gsi: route.gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = route.address as u32;
            entry.u.msi.address_hi = (route.address >> 32) as u32;
            entry.u.msi.data = route.data;
            entries.push(entry);
        }
        entries
    }

    /// The table in the form KVM_SET_GSI_ROUTING takes.
    pub fn to_kvm(&self) -> Result<KvmIrqRouting, RoutingError> {
        KvmIrqRouting::from_entries(&self.entries()).map_err(|_| RoutingError::Full(self.msi.len()))
    }
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = irqchip;
    entry.u.irqchip.pin = pin;
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (gsi, type, chip or address_lo, pin or data) of every entry.
    fn summary(routes: &GsiRoutes) -> Vec<(u32, u32, u32, u32)> {
        routes
            .entries()
            .iter()
            .map(|e| {
                // SAFETY: `type_` says which union member the entry holds.
                let (a, b) = unsafe {
                    if e.type_ == KVM_IRQ_ROUTING_MSI {
                        (e.u.msi.address_lo, e.u.msi.data)
                    } else {
                        (e.u.irqchip.irqchip, e.u.irqchip.pin)
                    }
                };
                (e.gsi, e.type_, a, b)
            })
            .collect()
    }

    #[test]
    fn the_default_routes_follow_the_madt() {
        let table = summary(&GsiRoutes::default());
        assert_eq!(table.len(), 38);
        let gsi = |n: u32| -> Vec<_> { table.iter().filter(|e| e.0 == n).copied().collect() };
        let irqchip = KVM_IRQ_ROUTING_IRQCHIP;
        assert_eq!(
            gsi(0),
            vec![
                (0, irqchip, KVM_IRQCHIP_IOAPIC, 2),
                (0, irqchip, KVM_IRQCHIP_PIC_MASTER, 0)
            ]
        );
        assert_eq!(gsi(2), vec![]);
        assert_eq!(
            gsi(4),
            vec![
                (4, irqchip, KVM_IRQCHIP_IOAPIC, 4),
                (4, irqchip, KVM_IRQCHIP_PIC_MASTER, 4)
            ]
        );
        assert_eq!(
            gsi(9),
            vec![
                (9, irqchip, KVM_IRQCHIP_IOAPIC, 9),
                (9, irqchip, KVM_IRQCHIP_PIC_SLAVE, 1)
            ]
        );
        assert_eq!(gsi(23), vec![(23, irqchip, KVM_IRQCHIP_IOAPIC, 23)]);
    }

    #[test]
    fn msi_routes_get_fresh_gsis_and_follow_retargeting() {
        let mut routes = GsiRoutes::default();
        assert_eq!(routes.add_msi(0xFEE0_0000, 0x41), Ok(24));
        assert_eq!(routes.add_msi(0xFEE0_1000, 0x42), Ok(25));
        routes.retarget_msi(24, 0xFEE0_2000, 0x51).unwrap();
        assert_eq!(routes.retarget_msi(3, 0, 0), Err(RoutingError::NotMsi(3)));
        let table = summary(&routes);
        assert_eq!(
            &table[38..],
            &[
                (24, KVM_IRQ_ROUTING_MSI, 0xFEE0_2000, 0x51),
                (25, KVM_IRQ_ROUTING_MSI, 0xFEE0_1000, 0x42)
            ]
        );
        routes.remove_last_msi();
        assert_eq!(routes.add_msi(0xFEE0_0000, 0x43), Ok(25));
        assert_eq!(routes.to_kvm().unwrap().as_slice().len(), 40);
    }
}
