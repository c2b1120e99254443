//! The I/O APIC at 0xFEC00000: 24 input pins, each steered by a redirection entry into an
//! interrupt message for the local APICs (82093AA datasheet; xhyve's vioapic.c).
//!
//! Pin levels are logical: `set_pin(pin, true)` means "asserted" whatever the entry's
//! polarity bit says, as the devices and xhyve treat them. Messages leave through a
//! `DeliverySink`, never while holding anything but the IOAPIC itself.

use super::msi::{
    DeliveryMode, DeliverySink, DestinationMode, InterruptRequest, Shorthand, TriggerMode,
};

pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
pub const IOAPIC_SIZE: u64 = 0x20;
pub const IOAPIC_PINS: usize = 24;

/// Version 0x11 (no EOI register, like xhyve) with the highest entry index in bits 23:16.
const VERSION: u32 = 0x11 | ((IOAPIC_PINS as u32 - 1) << 16);

const REG_SELECT: u64 = 0x00;
const REG_WINDOW: u64 = 0x10;

const INDEX_ID: u32 = 0x00;
const INDEX_VERSION: u32 = 0x01;
const INDEX_ARBITRATION: u32 = 0x02;
const INDEX_REDIRECTION: u32 = 0x10;

const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Bits the guest may write: vector, delivery/destination mode, polarity, trigger, mask and
/// destination; delivery status and remote IRR are the IOAPIC's own.
const RTE_WRITABLE: u64 = 0xFF00_0000_0001_AFFF;

#[derive(Debug, Clone)]
pub struct IoApic {
    id: u32,
    select: u32,
    redirection: [u64; IOAPIC_PINS],
    asserted: [bool; IOAPIC_PINS],
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new(0)
    }
}

impl IoApic {
    /// An IOAPIC with the given ID (xhyve's MADT says 0) and every pin masked.
    pub fn new(id: u8) -> Self {
        Self {
            id: u32::from(id & 0xF) << 24,
            select: 0,
            redirection: [RTE_MASKED; IOAPIC_PINS],
            asserted: [false; IOAPIC_PINS],
        }
    }

    /// The 64-bit redirection entry of `pin`, or `None` past the last pin.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// Drives input `pin` (logical level). Pins past the last are ignored.
    pub fn set_pin(&mut self, pin: usize, asserted: bool, sink: &mut impl DeliverySink) {
        let Some(previous) = self.asserted.get(pin).copied() else {
            return;
        };
        self.asserted[pin] = asserted;
        let entry = self.redirection[pin];
        if entry & RTE_LEVEL != 0 {
            if asserted {
                self.try_deliver(pin, sink);
            }
        } else if asserted && !previous {
            self.try_deliver(pin, sink);
        }
    }

    /// An edge on `pin`: assert then de-assert.
    pub fn pulse_pin(&mut self, pin: usize, sink: &mut impl DeliverySink) {
        self.set_pin(pin, true, sink);
        self.set_pin(pin, false, sink);
    }

    /// A local APIC's EOI broadcast for `vector`: clears remote IRR of the level-triggered
    /// entries with that vector, and re-delivers those whose pin is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8, sink: &mut impl DeliverySink) {
        for pin in 0..IOAPIC_PINS {
            let entry = self.redirection[pin];
            if entry & RTE_REMOTE_IRR == 0 || (entry & 0xFF) as u8 != vector {
                continue;
            }
            self.redirection[pin] &= !RTE_REMOTE_IRR;
            if self.asserted[pin] {
                self.try_deliver(pin, sink);
            }
        }
    }

    /// Guest read of the MMIO window. Accesses other than 32-bit reads of IOREGSEL or
    /// IOWIN read as zero.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let value = match offset {
            REG_SELECT => self.select,
            REG_WINDOW => self.read_indirect(self.select),
            _ => return,
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Guest write of the MMIO window; a write may deliver (unmasking an asserted
    /// level-triggered pin).
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], sink: &mut impl DeliverySink) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_SELECT => self.select = value & 0xFF,
            REG_WINDOW => self.write_indirect(self.select, value, sink),
            _ => {}
        }
    }

    fn read_indirect(&self, index: u32) -> u32 {
        match index {
            INDEX_ID | INDEX_ARBITRATION => self.id,
            INDEX_VERSION => VERSION,
            _ => match Self::entry_half(index) {
                Some((pin, high)) => {
                    let entry = self.redirection[pin];
                    if high {
                        (entry >> 32) as u32
                    } else {
                        entry as u32
                    }
                }
                None => 0,
            },
        }
    }

    fn write_indirect(&mut self, index: u32, value: u32, sink: &mut impl DeliverySink) {
        if index == INDEX_ID {
            self.id = value & 0x0F00_0000;
            return;
        }
        let Some((pin, high)) = Self::entry_half(index) else {
            return;
        };
        let old = self.redirection[pin];
        let written = if high {
            (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
        } else {
            (old & !0xFFFF_FFFF) | u64::from(value)
        };
        let mut entry = (written & RTE_WRITABLE) | (old & !RTE_WRITABLE);
        // Remote IRR only means something for level-triggered entries.
        if entry & RTE_LEVEL == 0 {
            entry &= !RTE_REMOTE_IRR;
        }
        self.redirection[pin] = entry;
        let unmasked_level = entry & (RTE_MASKED | RTE_LEVEL) == RTE_LEVEL;
        if unmasked_level && self.asserted[pin] {
            self.try_deliver(pin, sink);
        }
    }

    /// Maps an indirect index to (pin, high half).
    fn entry_half(index: u32) -> Option<(usize, bool)> {
        let offset = index.checked_sub(INDEX_REDIRECTION)? as usize;
        let pin = offset / 2;
        (pin < IOAPIC_PINS).then_some((pin, offset % 2 == 1))
    }

    fn try_deliver(&mut self, pin: usize, sink: &mut impl DeliverySink) {
        let entry = self.redirection[pin];
        if entry & RTE_MASKED != 0 {
            return;
        }
        let level = entry & RTE_LEVEL != 0;
        if level && entry & RTE_REMOTE_IRR != 0 {
            return;
        }
        let Some(request) = Self::request_for(entry) else {
            return;
        };
        if level {
            self.redirection[pin] |= RTE_REMOTE_IRR;
        }
        sink.deliver(request);
    }

    /// The message a redirection entry sends; `None` for the reserved delivery mode.
    fn request_for(entry: u64) -> Option<InterruptRequest> {
        let delivery_mode = DeliveryMode::from_bits((entry >> 8) as u32)?;
        Some(InterruptRequest {
            vector: entry as u8,
            delivery_mode,
            destination_mode: if entry & (1 << 11) != 0 {
                DestinationMode::Logical
            } else {
                DestinationMode::Physical
            },
            trigger_mode: if entry & RTE_LEVEL != 0 {
                TriggerMode::Level
            } else {
                TriggerMode::Edge
            },
            assert: true,
            shorthand: Shorthand::None,
            destination: (entry >> 56) as u32,
            wide_destination: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_reg(ioapic: &mut IoApic, index: u32, value: u32, sink: &mut Vec<InterruptRequest>) {
        ioapic.mmio_write(REG_SELECT, &index.to_le_bytes(), sink);
        ioapic.mmio_write(REG_WINDOW, &value.to_le_bytes(), sink);
    }

    fn read_reg(ioapic: &mut IoApic, index: u32) -> u32 {
        let mut sink = Vec::new();
        ioapic.mmio_write(REG_SELECT, &index.to_le_bytes(), &mut sink);
        let mut data = [0u8; 4];
        ioapic.mmio_read(REG_WINDOW, &mut data);
        u32::from_le_bytes(data)
    }

    fn program(ioapic: &mut IoApic, pin: u32, low: u32, high: u32) -> Vec<InterruptRequest> {
        let mut sink = Vec::new();
        write_reg(ioapic, INDEX_REDIRECTION + 2 * pin + 1, high, &mut sink);
        write_reg(ioapic, INDEX_REDIRECTION + 2 * pin, low, &mut sink);
        sink
    }

    #[test]
    fn identification_registers() {
        let mut ioapic = IoApic::new(0);
        assert_eq!(read_reg(&mut ioapic, INDEX_VERSION), 0x0017_0011);
        let mut sink = Vec::new();
        write_reg(&mut ioapic, INDEX_ID, 0xFF00_00FF, &mut sink);
        assert_eq!(read_reg(&mut ioapic, INDEX_ID), 0x0F00_0000);
        assert_eq!(read_reg(&mut ioapic, INDEX_ARBITRATION), 0x0F00_0000);
        write_reg(&mut ioapic, INDEX_VERSION, 0, &mut sink);
        assert_eq!(read_reg(&mut ioapic, INDEX_VERSION), 0x0017_0011);
        assert_eq!(read_reg(&mut ioapic, 0x03), 0);
        assert!(sink.is_empty());
    }

    #[test]
    fn entries_reset_masked_and_keep_read_only_bits() {
        let mut ioapic = IoApic::new(0);
        for pin in 0..IOAPIC_PINS as u32 {
            assert_eq!(
                read_reg(&mut ioapic, INDEX_REDIRECTION + 2 * pin),
                RTE_MASKED as u32
            );
        }
        // Delivery status and remote IRR cannot be set by the guest.
        program(&mut ioapic, 3, 0x0001_FFFF, 0xFFFF_FFFF);
        assert_eq!(read_reg(&mut ioapic, INDEX_REDIRECTION + 6), 0x0001_AFFF);
        assert_eq!(read_reg(&mut ioapic, INDEX_REDIRECTION + 7), 0xFF00_0000);
        // Past the last pin reads zero and writes go nowhere.
        let past = INDEX_REDIRECTION + 2 * IOAPIC_PINS as u32;
        let mut sink = Vec::new();
        write_reg(&mut ioapic, past, 0x30, &mut sink);
        assert_eq!(read_reg(&mut ioapic, past), 0);
    }

    #[test]
    fn edge_pin_delivers_on_rising_edge_only() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 4, 0x0000_0934, 0x0200_0000); // logical, lowest prio, vec 0x34
        let mut sink = Vec::new();
        ioapic.set_pin(4, true, &mut sink);
        ioapic.set_pin(4, true, &mut sink);
        assert_eq!(sink.len(), 1);
        let req = sink[0];
        assert_eq!(req.vector, 0x34);
        assert_eq!(req.delivery_mode, DeliveryMode::LowestPriority);
        assert_eq!(req.destination_mode, DestinationMode::Logical);
        assert_eq!(req.trigger_mode, TriggerMode::Edge);
        assert_eq!(req.destination, 2);
        ioapic.set_pin(4, false, &mut sink);
        ioapic.pulse_pin(4, &mut sink);
        assert_eq!(sink.len(), 2);
    }

    #[test]
    fn masked_pin_does_not_deliver() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 1, 0x0001_0031, 0);
        let mut sink = Vec::new();
        ioapic.pulse_pin(1, &mut sink);
        assert!(sink.is_empty());
        // Unmasking an edge pin does not replay a past edge.
        assert!(program(&mut ioapic, 1, 0x0000_0031, 0).is_empty());
    }

    #[test]
    fn level_pin_uses_remote_irr_until_eoi() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 9, 0x0000_A041, 0x0100_0000); // level, active low, vec 0x41
        let mut sink = Vec::new();
        ioapic.set_pin(9, true, &mut sink);
        assert_eq!(sink.len(), 1);
        assert_eq!(sink[0].trigger_mode, TriggerMode::Level);
        assert_eq!(sink[0].destination, 1);
        assert_ne!(ioapic.redirection_entry(9).unwrap() & RTE_REMOTE_IRR, 0);
        // Still asserted, but remote IRR holds further messages back.
        ioapic.set_pin(9, true, &mut sink);
        assert_eq!(sink.len(), 1);
        // EOI for another vector changes nothing.
        ioapic.end_of_interrupt(0x42, &mut sink);
        assert_eq!(sink.len(), 1);
        // EOI while still asserted re-delivers.
        ioapic.end_of_interrupt(0x41, &mut sink);
        assert_eq!(sink.len(), 2);
        // De-assert, EOI: remote IRR clears and nothing is sent.
        ioapic.set_pin(9, false, &mut sink);
        ioapic.end_of_interrupt(0x41, &mut sink);
        assert_eq!(sink.len(), 2);
        assert_eq!(ioapic.redirection_entry(9).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn unmasking_an_asserted_level_pin_delivers() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 20, 0x0001_8050, 0);
        let mut sink = Vec::new();
        ioapic.set_pin(20, true, &mut sink);
        assert!(sink.is_empty());
        let sent = program(&mut ioapic, 20, 0x0000_8050, 0);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].vector, 0x50);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 5, 0x0000_8035, 0);
        let mut sink = Vec::new();
        ioapic.set_pin(5, true, &mut sink);
        assert_ne!(ioapic.redirection_entry(5).unwrap() & RTE_REMOTE_IRR, 0);
        program(&mut ioapic, 5, 0x0000_0035, 0);
        assert_eq!(ioapic.redirection_entry(5).unwrap() & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn eoi_serves_every_pin_sharing_the_vector() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 16, 0x0000_8060, 0);
        program(&mut ioapic, 17, 0x0000_8060, 0);
        let mut sink = Vec::new();
        ioapic.set_pin(16, true, &mut sink);
        ioapic.set_pin(17, true, &mut sink);
        assert_eq!(sink.len(), 2);
        ioapic.end_of_interrupt(0x60, &mut sink);
        assert_eq!(sink.len(), 4);
    }

    #[test]
    fn nmi_and_extint_entries_pass_their_mode() {
        let mut ioapic = IoApic::new(0);
        program(&mut ioapic, 0, 0x0000_0700, 0);
        program(&mut ioapic, 2, 0x0000_0400, 0);
        let mut sink = Vec::new();
        ioapic.pulse_pin(0, &mut sink);
        ioapic.pulse_pin(2, &mut sink);
        assert_eq!(sink[0].delivery_mode, DeliveryMode::ExtInt);
        assert_eq!(sink[1].delivery_mode, DeliveryMode::Nmi);
        // Reserved delivery mode 3 sends nothing.
        program(&mut ioapic, 3, 0x0000_0330, 0);
        ioapic.pulse_pin(3, &mut sink);
        assert_eq!(sink.len(), 2);
    }

    #[test]
    fn out_of_range_pins_and_odd_accesses_are_harmless() {
        let mut ioapic = IoApic::new(0);
        let mut sink = Vec::new();
        ioapic.set_pin(IOAPIC_PINS, true, &mut sink);
        ioapic.set_pin(usize::MAX, true, &mut sink);
        ioapic.mmio_write(REG_SELECT, &[0x10], &mut sink);
        ioapic.mmio_write(0x08, &0x10u32.to_le_bytes(), &mut sink);
        let mut byte = [0xAAu8; 1];
        ioapic.mmio_read(REG_WINDOW, &mut byte);
        assert_eq!(byte, [0]);
        let mut word = [0xAAu8; 4];
        ioapic.mmio_read(0x04, &mut word);
        assert_eq!(word, [0; 4]);
        assert!(sink.is_empty());
    }
}
