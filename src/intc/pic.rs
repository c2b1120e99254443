//! The PC's pair of Intel 8259A interrupt controllers (master at 0x20, slave at 0xA0, the
//! slave cascaded into master IR2) plus the PIIX edge/level control registers (ELCR) at
//! 0x4D0/0x4D1.
//!
//! The model is pure state: devices drive inputs with `set_irq_level`, the guest programs it
//! through `read_port`/`write_port` (or the `BusDevice` impl), and the vCPU side asks
//! `intr_asserted` after any of those and takes the vector with `intack` when it injects the
//! interrupt. Nothing here blocks or allocates.

use crate::devices::bus::{read_byte_ports, write_byte_ports, BusDevice, BytePorts};

pub const MASTER_PORT: u16 = 0x20;
pub const SLAVE_PORT: u16 = 0xa0;
pub const ELCR_PORT: u16 = 0x4d0;

/// The master input the slave's INT output is wired to.
const CASCADE_LINE: u8 = 2;
/// Inputs the PIIX forces to edge mode: IRQ 0, 1, 2 (timer, keyboard, cascade) and IRQ 8,
/// 13 (RTC, FPU).
const MASTER_ELCR_WRITABLE: u8 = 0xf8;
const SLAVE_ELCR_WRITABLE: u8 = 0xde;

const ICW1: u8 = 0x10;
const ICW1_NEEDS_ICW4: u8 = 0x01;
const ICW1_SINGLE: u8 = 0x02;
const OCW3: u8 = 0x08;
const OCW3_POLL: u8 = 0x04;
const OCW3_READ_REGISTER: u8 = 0x02;
const OCW3_READ_ISR: u8 = 0x01;
const OCW3_SET_SPECIAL_MASK: u8 = 0x40;
const OCW3_SPECIAL_MASK: u8 = 0x20;
const ICW4_AUTO_EOI: u8 = 0x02;
const ICW4_SPECIAL_FULLY_NESTED: u8 = 0x10;
const POLL_PENDING: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum InitStep {
    /// ICW1 has never been written: the chip raises nothing.
    #[default]
    Uninitialized,
    Icw2,
    Icw3,
    Icw4,
    Ready,
}

/// One 8259A.
#[derive(Debug, Clone)]
struct Chip {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Set bits are level-triggered inputs.
    elcr: u8,
    elcr_writable: u8,
    /// Current input levels, to find rising edges.
    pins: u8,
    vector_base: u8,
    step: InitStep,
    needs_icw4: bool,
    single: bool,
    cascade_config: u8,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    /// The input with the lowest priority; the one after it has the highest.
    lowest_priority: u8,
}

impl Chip {
    fn new(elcr_writable: u8) -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0,
            elcr: 0,
            elcr_writable,
            pins: 0,
            vector_base: 0,
            step: InitStep::Uninitialized,
            needs_icw4: false,
            single: false,
            cascade_config: 0,
            auto_eoi: false,
            rotate_on_auto_eoi: false,
            special_fully_nested: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            lowest_priority: 7,
        }
    }

    /// The set bit of `bits` with the highest priority under the current rotation.
    fn highest_priority(&self, bits: u8) -> Option<u8> {
        (1..=8)
            .map(|k| (self.lowest_priority + k) & 7)
            .find(|&line| bits & (1 << line) != 0)
    }

    /// Lower is more urgent.
    fn rank(&self, line: u8) -> u8 {
        line.wrapping_sub(self.lowest_priority).wrapping_sub(1) & 7
    }

    /// The input this chip would signal now, given extra request bits driven from outside
    /// (the slave's INT on the master's cascade line).
    fn pending(&self, extra_requests: u8, is_master: bool) -> Option<u8> {
        if self.step != InitStep::Ready {
            return None;
        }
        let requests = (self.irr | extra_requests) & !self.imr;
        if self.special_mask {
            return self.highest_priority(requests & !self.isr);
        }
        let line = self.highest_priority(requests)?;
        match self.highest_priority(self.isr) {
            None => Some(line),
            Some(busy) if self.rank(busy) > self.rank(line) => Some(line),
            // A more urgent slave input may nest inside a slave interrupt in service.
            Some(busy)
                if is_master
                    && self.special_fully_nested
                    && busy == CASCADE_LINE
                    && line == CASCADE_LINE =>
            {
                Some(line)
            }
            Some(_) => None,
        }
    }

    /// The CPU acknowledged `line`.
    fn acknowledge(&mut self, line: u8) {
        let bit = 1 << line;
        // A level input stays requested while its pin is high; an edge is consumed.
        self.irr &= !bit | (self.elcr & self.pins);
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.lowest_priority = line;
            }
        } else {
            self.isr |= bit;
        }
    }

    fn set_pin(&mut self, line: u8, high: bool) {
        let bit = 1 << line;
        let rising = high && self.pins & bit == 0;
        if high {
            self.pins |= bit;
        } else {
            self.pins &= !bit;
        }
        if self.elcr & bit != 0 {
            self.irr = (self.irr & !bit) | (self.pins & bit);
        } else if rising {
            self.irr |= bit;
        }
    }

    fn write_elcr(&mut self, value: u8) {
        self.elcr = value & self.elcr_writable;
        self.irr = (self.irr & !self.elcr) | (self.pins & self.elcr);
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1 != 0 {
            self.start_init(value);
        } else if value & OCW3 != 0 {
            self.write_ocw3(value);
        } else {
            self.write_ocw2(value);
        }
    }

    fn start_init(&mut self, icw1: u8) {
        // The edge-sense latches reset: an edge input already high must fall and rise again.
        self.irr = self.pins & self.elcr;
        self.isr = 0;
        self.imr = 0;
        self.special_mask = false;
        self.special_fully_nested = false;
        self.auto_eoi = false;
        self.rotate_on_auto_eoi = false;
        self.read_isr = false;
        self.poll = false;
        self.lowest_priority = 7;
        self.needs_icw4 = icw1 & ICW1_NEEDS_ICW4 != 0;
        self.single = icw1 & ICW1_SINGLE != 0;
        self.step = InitStep::Icw2;
    }

    fn write_ocw2(&mut self, value: u8) {
        let line = value & 7;
        match value >> 5 {
            // Non-specific EOI, optionally rotating.
            0b001 | 0b101 => {
                if let Some(done) = self.highest_priority(self.isr) {
                    self.isr &= !(1 << done);
                    if value >> 5 == 0b101 {
                        self.lowest_priority = done;
                    }
                }
            }
            // Specific EOI, optionally rotating.
            0b011 | 0b111 => {
                self.isr &= !(1 << line);
                if value >> 5 == 0b111 {
                    self.lowest_priority = line;
                }
            }
            0b100 => self.rotate_on_auto_eoi = true,
            0b000 => self.rotate_on_auto_eoi = false,
            0b110 => self.lowest_priority = line,
            _ => {}
        }
    }

    fn write_ocw3(&mut self, value: u8) {
        if value & OCW3_SET_SPECIAL_MASK != 0 {
            self.special_mask = value & OCW3_SPECIAL_MASK != 0;
        }
        if value & OCW3_READ_REGISTER != 0 {
            self.read_isr = value & OCW3_READ_ISR != 0;
        }
        self.poll = value & OCW3_POLL != 0;
    }

    fn write_data(&mut self, value: u8) {
        self.step = match self.step {
            InitStep::Icw2 => {
                self.vector_base = value & 0xf8;
                if !self.single {
                    InitStep::Icw3
                } else if self.needs_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                }
            }
            InitStep::Icw3 => {
                self.cascade_config = value;
                if self.needs_icw4 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                }
            }
            InitStep::Icw4 => {
                self.auto_eoi = value & ICW4_AUTO_EOI != 0;
                self.special_fully_nested = value & ICW4_SPECIAL_FULLY_NESTED != 0;
                InitStep::Ready
            }
            InitStep::Uninitialized | InitStep::Ready => {
                self.imr = value;
                self.step
            }
        };
    }

    fn read_register(&self, extra_requests: u8) -> u8 {
        if self.read_isr {
            self.isr
        } else {
            self.irr | extra_requests
        }
    }

    /// A poll read: acknowledges the pending input, if any, and reports it.
    fn poll_read(&mut self, extra_requests: u8, is_master: bool) -> u8 {
        self.poll = false;
        match self.pending(extra_requests, is_master) {
            Some(line) => {
                self.acknowledge(line);
                POLL_PENDING | line
            }
            None => 0,
        }
    }
}

/// The master/slave 8259A pair of a PC, with ISA IRQs 0-15.
#[derive(Debug, Clone)]
pub struct PicPair {
    master: Chip,
    slave: Chip,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// Both chips uninitialized: nothing is signalled until the guest writes ICW1-ICW4.
    pub fn new() -> Self {
        Self {
            master: Chip::new(MASTER_ELCR_WRITABLE),
            slave: Chip::new(SLAVE_ELCR_WRITABLE),
        }
    }

    fn cascaded(&self) -> bool {
        !self.master.single
    }

    /// What the slave's INT output drives into master IR2.
    fn cascade_requests(&self) -> u8 {
        if self.cascaded() && self.slave.pending(0, false).is_some() {
            1 << CASCADE_LINE
        } else {
            0
        }
    }

    /// Drives ISA IRQ `irq` (0-15). IRQ 2 is the cascade input and other values are ignored.
    pub fn set_irq_level(&mut self, irq: u8, high: bool) {
        match irq {
            0..=7 if irq != CASCADE_LINE => self.master.set_pin(irq, high),
            8..=15 => self.slave.set_pin(irq - 8, high),
            _ => {}
        }
    }

    /// An edge on ISA IRQ `irq`: raise, then lower.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.set_irq_level(irq, true);
        self.set_irq_level(irq, false);
    }

    /// The master's INT output: the CPU should take an interrupt (ExtINT) from the PIC.
    pub fn intr_asserted(&self) -> bool {
        self.master.pending(self.cascade_requests(), true).is_some()
    }

    /// The vector `intack` would return now, without acknowledging it.
    pub fn pending_vector(&self) -> Option<u8> {
        let line = self.master.pending(self.cascade_requests(), true)?;
        if line == CASCADE_LINE && self.cascaded() {
            let slave_line = self.slave.pending(0, false).unwrap_or(7);
            return Some(self.slave.vector_base | slave_line);
        }
        Some(self.master.vector_base | line)
    }

    /// The CPU's interrupt-acknowledge cycle: marks the winning input in service and returns
    /// its vector. With nothing pending it returns the chip's IR7 vector without marking
    /// anything, as a real 8259A's spurious interrupt does.
    pub fn intack(&mut self) -> u8 {
        let Some(line) = self.master.pending(self.cascade_requests(), true) else {
            return self.master.vector_base | 7;
        };
        self.master.acknowledge(line);
        if line != CASCADE_LINE || !self.cascaded() {
            return self.master.vector_base | line;
        }
        match self.slave.pending(0, false) {
            Some(slave_line) => {
                self.slave.acknowledge(slave_line);
                self.slave.vector_base | slave_line
            }
            None => self.slave.vector_base | 7,
        }
    }

    /// A guest port read. Ports the pair does not own read as 0xff.
    pub fn read_port(&mut self, port: u16) -> u8 {
        let cascade = self.cascade_requests();
        match port {
            MASTER_PORT if self.master.poll => self.master.poll_read(cascade, true),
            MASTER_PORT => self.master.read_register(cascade),
            p if p == MASTER_PORT + 1 => self.master.imr,
            SLAVE_PORT if self.slave.poll => self.slave.poll_read(0, false),
            SLAVE_PORT => self.slave.read_register(0),
            p if p == SLAVE_PORT + 1 => self.slave.imr,
            ELCR_PORT => self.master.elcr,
            p if p == ELCR_PORT + 1 => self.slave.elcr,
            _ => 0xff,
        }
    }

    /// A guest port write. Ports the pair does not own are ignored.
    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            MASTER_PORT => self.master.write_command(value),
            p if p == MASTER_PORT + 1 => self.master.write_data(value),
            SLAVE_PORT => self.slave.write_command(value),
            p if p == SLAVE_PORT + 1 => self.slave.write_data(value),
            ELCR_PORT => self.master.write_elcr(value),
            p if p == ELCR_PORT + 1 => self.slave.write_elcr(value),
            _ => {}
        }
    }
}

impl BytePorts for PicPair {
    fn read_port(&mut self, port: u16) -> u8 {
        PicPair::read_port(self, port)
    }

    fn write_port(&mut self, port: u16, value: u8) {
        PicPair::write_port(self, port, value)
    }
}

/// Serves the three 2-port ranges (0x20, 0xA0, 0x4D0); a wider access covers the next ports.
impl BusDevice for PicPair {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        read_byte_ports(self, base, offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        write_byte_ports(self, base, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ_IRR: u8 = 0x0a;
    const READ_ISR: u8 = 0x0b;
    const NON_SPECIFIC_EOI: u8 = 0x20;

    /// Programs the pair the way Linux and most BIOSes do: vectors 0x20 and 0x28, cascade on
    /// IR2, 8086 mode, everything unmasked.
    fn linux_pic() -> PicPair {
        let mut pic = PicPair::new();
        init(&mut pic, 0x01);
        pic
    }

    fn init(pic: &mut PicPair, icw4: u8) {
        pic.write_port(0x20, 0x11);
        pic.write_port(0x21, 0x20);
        pic.write_port(0x21, 0x04);
        pic.write_port(0x21, icw4);
        pic.write_port(0xa0, 0x11);
        pic.write_port(0xa1, 0x28);
        pic.write_port(0xa1, 0x02);
        pic.write_port(0xa1, icw4);
        pic.write_port(0x21, 0x00);
        pic.write_port(0xa1, 0x00);
    }

    fn isr(pic: &mut PicPair, port: u16) -> u8 {
        pic.write_port(port, READ_ISR);
        pic.read_port(port)
    }

    fn irr(pic: &mut PicPair, port: u16) -> u8 {
        pic.write_port(port, READ_IRR);
        pic.read_port(port)
    }

    #[test]
    fn an_uninitialized_pic_signals_nothing() {
        let mut pic = PicPair::new();
        pic.pulse_irq(1);
        assert!(!pic.intr_asserted());
        assert_eq!(pic.pending_vector(), None);
        // The request is latched, so it is delivered once the guest programs the chip.
        init(&mut pic, 0x01);
        assert!(!pic.intr_asserted(), "ICW1 resets the edge latches");
        pic.pulse_irq(1);
        assert_eq!(pic.pending_vector(), Some(0x21));
    }

    #[test]
    fn an_edge_is_delivered_with_the_programmed_vector_and_eoi_clears_isr() {
        let mut pic = linux_pic();
        pic.pulse_irq(1);
        assert!(pic.intr_asserted());
        assert_eq!(irr(&mut pic, 0x20), 0x02);
        assert_eq!(pic.intack(), 0x21);
        assert!(!pic.intr_asserted());
        assert_eq!(irr(&mut pic, 0x20), 0x00);
        assert_eq!(isr(&mut pic, 0x20), 0x02);
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        assert_eq!(isr(&mut pic, 0x20), 0x00);
    }

    #[test]
    fn an_edge_stays_latched_after_the_input_falls() {
        let mut pic = linux_pic();
        pic.set_irq_level(4, true);
        pic.set_irq_level(4, false);
        assert_eq!(irr(&mut pic, 0x20), 0x10);
        assert_eq!(pic.intack(), 0x24);
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        // Holding an edge input high requests once, not again after EOI.
        pic.set_irq_level(4, true);
        assert_eq!(pic.intack(), 0x24);
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        assert_eq!(pic.intack(), 0x20 | 7, "spurious");
        assert!(!pic.intr_asserted());
    }

    #[test]
    fn a_masked_input_waits_until_unmasked() {
        let mut pic = linux_pic();
        pic.write_port(0x21, 0x08);
        assert_eq!(pic.read_port(0x21), 0x08);
        pic.pulse_irq(3);
        assert!(!pic.intr_asserted());
        assert_eq!(irr(&mut pic, 0x20), 0x08);
        pic.write_port(0x21, 0x00);
        assert_eq!(pic.intack(), 0x23);
    }

    #[test]
    fn in_service_blocks_lower_priority_but_not_higher() {
        let mut pic = linux_pic();
        pic.pulse_irq(3);
        assert_eq!(pic.intack(), 0x23);
        pic.pulse_irq(5);
        assert!(!pic.intr_asserted());
        pic.pulse_irq(1);
        assert_eq!(pic.intack(), 0x21);
        assert_eq!(isr(&mut pic, 0x20), 0x0a);
        // Non-specific EOI ends the most urgent in-service input first.
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        assert_eq!(isr(&mut pic, 0x20), 0x08);
        assert!(!pic.intr_asserted());
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        assert_eq!(pic.intack(), 0x25);
    }

    #[test]
    fn a_slave_input_arrives_through_the_cascade() {
        let mut pic = linux_pic();
        pic.pulse_irq(10);
        assert!(pic.intr_asserted());
        assert_eq!(irr(&mut pic, 0x20), 0x04, "the slave drives master IR2");
        assert_eq!(pic.pending_vector(), Some(0x2a));
        assert_eq!(pic.intack(), 0x2a);
        assert_eq!(isr(&mut pic, 0x20), 0x04);
        assert_eq!(isr(&mut pic, 0xa0), 0x04);
        pic.write_port(0xa0, NON_SPECIFIC_EOI);
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        assert_eq!(isr(&mut pic, 0x20), 0);
        assert_eq!(isr(&mut pic, 0xa0), 0);
    }

    #[test]
    fn masking_the_cascade_line_blocks_the_whole_slave() {
        let mut pic = linux_pic();
        pic.write_port(0x21, 0x04);
        pic.pulse_irq(9);
        assert!(!pic.intr_asserted());
        pic.write_port(0x21, 0x00);
        assert_eq!(pic.intack(), 0x29);
    }

    #[test]
    fn special_fully_nested_lets_a_more_urgent_slave_input_nest() {
        let mut plain = linux_pic();
        plain.pulse_irq(12);
        assert_eq!(plain.intack(), 0x2c);
        plain.pulse_irq(9);
        assert!(
            !plain.intr_asserted(),
            "fully nested: master IR2 is in service"
        );

        let mut nested = PicPair::new();
        init(&mut nested, 0x11);
        nested.pulse_irq(12);
        assert_eq!(nested.intack(), 0x2c);
        nested.pulse_irq(9);
        assert_eq!(nested.intack(), 0x29);
        // A less urgent slave input still waits.
        nested.pulse_irq(14);
        assert!(!nested.intr_asserted());
    }

    #[test]
    fn a_level_input_requests_again_after_eoi_while_high() {
        let mut pic = linux_pic();
        pic.write_port(0x4d1, 0x02); // IRQ 9 level
        pic.set_irq_level(9, true);
        assert_eq!(pic.intack(), 0x29);
        assert_eq!(
            irr(&mut pic, 0xa0),
            0x02,
            "still requested while the pin is high"
        );
        pic.write_port(0xa0, NON_SPECIFIC_EOI);
        pic.write_port(0x20, NON_SPECIFIC_EOI);
        assert_eq!(pic.pending_vector(), Some(0x29));
        pic.set_irq_level(9, false);
        assert!(!pic.intr_asserted(), "a level request ends with the pin");
        assert_eq!(irr(&mut pic, 0xa0), 0);
    }

    #[test]
    fn elcr_keeps_the_legacy_edge_inputs_read_only() {
        let mut pic = linux_pic();
        pic.write_port(0x4d0, 0xff);
        pic.write_port(0x4d1, 0xff);
        assert_eq!(pic.read_port(0x4d0), 0xf8);
        assert_eq!(pic.read_port(0x4d1), 0xde);
    }

    #[test]
    fn switching_to_level_mode_follows_the_current_pin() {
        let mut pic = linux_pic();
        pic.set_irq_level(11, true);
        pic.set_irq_level(11, false);
        assert_eq!(irr(&mut pic, 0xa0), 0x08);
        pic.write_port(0x4d1, 0x08);
        assert_eq!(irr(&mut pic, 0xa0), 0x00);
    }

    #[test]
    fn auto_eoi_leaves_nothing_in_service() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x03);
        pic.pulse_irq(6);
        assert_eq!(pic.intack(), 0x26);
        assert_eq!(isr(&mut pic, 0x20), 0);
        pic.pulse_irq(7);
        assert_eq!(pic.intack(), 0x27);
    }

    #[test]
    fn rotate_in_auto_eoi_mode_makes_the_served_input_least_urgent() {
        let mut pic = PicPair::new();
        init(&mut pic, 0x03);
        pic.write_port(0x20, 0x80); // rotate in AEOI mode: set
        pic.pulse_irq(1);
        assert_eq!(pic.intack(), 0x21);
        pic.pulse_irq(0);
        pic.pulse_irq(3);
        assert_eq!(pic.intack(), 0x23, "IR1 is now lowest, so IR2.. come first");
        assert_eq!(pic.intack(), 0x20);
    }

    #[test]
    fn specific_eoi_ends_the_named_input() {
        let mut pic = linux_pic();
        pic.pulse_irq(5);
        assert_eq!(pic.intack(), 0x25);
        pic.pulse_irq(2 + 1);
        assert_eq!(pic.intack(), 0x23);
        pic.write_port(0x20, 0x60 | 5);
        assert_eq!(isr(&mut pic, 0x20), 0x08);
    }

    #[test]
    fn set_priority_rotates_the_order() {
        let mut pic = linux_pic();
        pic.write_port(0x20, 0xc0 | 4); // IR4 lowest, IR5 highest
        pic.pulse_irq(1);
        pic.pulse_irq(6);
        assert_eq!(pic.pending_vector(), Some(0x26));
        assert_eq!(pic.intack(), 0x26);
        // IR1 now ranks below the in-service IR6.
        assert!(!pic.intr_asserted());
        // Rotate on specific EOI: end IR6 and make it lowest.
        pic.write_port(0x20, 0xe0 | 6);
        assert_eq!(isr(&mut pic, 0x20), 0);
        assert_eq!(pic.intack(), 0x21);
    }

    #[test]
    fn rotate_on_non_specific_eoi_demotes_the_served_input() {
        let mut pic = linux_pic();
        pic.pulse_irq(0);
        assert_eq!(pic.intack(), 0x20);
        pic.write_port(0x20, 0xa0);
        assert_eq!(isr(&mut pic, 0x20), 0);
        pic.pulse_irq(0);
        pic.pulse_irq(7);
        assert_eq!(pic.intack(), 0x27, "IR0 is now the lowest priority");
    }

    #[test]
    fn poll_mode_acknowledges_through_a_port_read() {
        let mut pic = linux_pic();
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0, "nothing pending");
        pic.pulse_irq(5);
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0x85);
        assert_eq!(isr(&mut pic, 0x20), 0x20);
        // The poll is one-shot: the next read is the selected register again.
        assert_eq!(pic.read_port(0x20), 0x20);
    }

    #[test]
    fn polling_the_slave_reports_its_own_inputs() {
        let mut pic = linux_pic();
        pic.pulse_irq(13);
        pic.write_port(0xa0, 0x0c);
        assert_eq!(pic.read_port(0xa0), 0x85);
        assert_eq!(isr(&mut pic, 0xa0), 0x20);
    }

    #[test]
    fn special_mask_mode_lets_lower_inputs_through() {
        let mut pic = linux_pic();
        pic.pulse_irq(1);
        assert_eq!(pic.intack(), 0x21);
        pic.write_port(0x20, 0x68); // set special mask mode
        pic.write_port(0x21, 0x02);
        pic.pulse_irq(4);
        assert_eq!(pic.intack(), 0x24);
        pic.write_port(0x20, 0x48); // clear it
        pic.pulse_irq(6);
        assert!(!pic.intr_asserted(), "IR1 and IR4 in service block IR6");
    }

    #[test]
    fn icw1_clears_mask_and_in_service() {
        let mut pic = linux_pic();
        pic.write_port(0x21, 0xff);
        pic.pulse_irq(3);
        pic.write_port(0x21, 0);
        assert_eq!(pic.intack(), 0x23);
        pic.write_port(0x21, 0xfe);
        init(&mut pic, 0x01);
        assert_eq!(pic.read_port(0x21), 0);
        assert_eq!(isr(&mut pic, 0x20), 0);
    }

    #[test]
    fn single_mode_skips_icw3_and_the_cascade() {
        let mut pic = PicPair::new();
        pic.write_port(0x20, 0x13); // ICW1: single, ICW4 needed
        pic.write_port(0x21, 0x40);
        pic.write_port(0x21, 0x01); // ICW4, not ICW3
        pic.write_port(0x21, 0x00); // OCW1
        pic.pulse_irq(2 + 8);
        assert!(!pic.intr_asserted());
        pic.pulse_irq(6);
        assert_eq!(pic.intack(), 0x46);
    }

    #[test]
    fn spurious_acknowledge_returns_ir7_and_marks_nothing() {
        let mut pic = linux_pic();
        assert_eq!(pic.intack(), 0x27);
        assert_eq!(isr(&mut pic, 0x20), 0);
    }

    #[test]
    fn out_of_range_and_cascade_irqs_are_ignored() {
        let mut pic = linux_pic();
        pic.set_irq_level(2, true);
        pic.set_irq_level(16, true);
        pic.set_irq_level(255, true);
        assert!(!pic.intr_asserted());
    }

    #[test]
    fn bus_access_reaches_the_right_ports() {
        let mut pic = linux_pic();
        BusDevice::write(&mut pic, 0xa0, 1, &[0x81]);
        assert_eq!(pic.read_port(0xa1), 0x81);
        BusDevice::write(&mut pic, 0x4d0, 0, &[0x08, 0x20]);
        let mut elcr = [0u8; 2];
        BusDevice::read(&mut pic, 0x4d0, 0, &mut elcr);
        assert_eq!(elcr, [0x08, 0x00], "slave bit 5 (IRQ 13) is read-only");
        let mut unknown = [0u8; 1];
        BusDevice::read(&mut pic, 0x4d0, 5, &mut unknown);
        assert_eq!(unknown, [0xff]);
    }
}
