//! How the CPU reaches configuration space: configuration mechanism #1 on I/O ports and ECAM.

use std::sync::Arc;

use super::{PciAddress, PciBus};
use crate::devices::bus::BusDevice;

/// CONFIG_ADDRESS, dword accesses only. Insert [`PciConfigIo`] here with length 1 so that
/// byte accesses to 0xCF9 (reset control) reach their own device.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// CONFIG_DATA, 0xCFC-0xCFF. Insert the same [`PciConfigIo`] here with length 4.
pub const PCI_CONFIG_DATA_PORT: u16 = 0xCFC;

const ADDRESS_ENABLE: u32 = 1 << 31;
/// Enable, bus, device, function and dword-aligned register; reserved bits read as 0.
const ADDRESS_MASK: u32 = 0x80FF_FFFC;

/// Configuration mechanism #1: an address latch at 0xCF8 and a data window at 0xCFC.
///
/// One device serves both ranges; it tells them apart by `base + offset`.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo { bus, address: 0 }
    }

    /// The function and register the latch selects for a data access at `port_offset`
    /// (0-3) of `len` bytes, if enabled and the access stays inside the dword.
    fn target(&self, port_offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        if self.address & ADDRESS_ENABLE == 0 || !matches!(len, 1 | 2 | 4) {
            return None;
        }
        if port_offset + len as u64 > 4 {
            return None;
        }
        let addr = PciAddress {
            bus: (self.address >> 16) as u8,
            slot: ((self.address >> 11) & 0x1F) as u8,
            function: ((self.address >> 8) & 0x7) as u8,
        };
        let register = (self.address & 0xFC) as u16 + port_offset as u16;
        Some((addr, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let port = base + offset;
        if port == u64::from(PCI_CONFIG_ADDRESS_PORT) && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        let data_port = u64::from(PCI_CONFIG_DATA_PORT);
        match port
            .checked_sub(data_port)
            .and_then(|off| self.target(off, data.len()))
        {
            Some((addr, register)) => self.bus.read_config(addr, register, data),
            None => data.fill(0xFF),
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let port = base + offset;
        if port == u64::from(PCI_CONFIG_ADDRESS_PORT) {
            if let Ok(value) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(value) & ADDRESS_MASK;
            }
            return;
        }
        let data_port = u64::from(PCI_CONFIG_DATA_PORT);
        if let Some((addr, register)) = port
            .checked_sub(data_port)
            .and_then(|off| self.target(off, data.len()))
        {
            self.bus.write_config(addr, register, data);
        }
    }
}

/// PCI Express enhanced configuration access (MMCONFIG) for bus 0: 4 KiB per function.
/// Insert at `arch::x86_64::layout::PCI_ECAM_BASE` with length `PCI_ECAM_SIZE`.
pub struct PciEcam {
    bus: Arc<PciBus>,
}

impl PciEcam {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciEcam { bus }
    }

    fn target(offset: u64, len: usize) -> Option<(PciAddress, u16)> {
        if !matches!(len, 1 | 2 | 4) || offset % len as u64 != 0 {
            return None;
        }
        let addr = PciAddress {
            bus: u8::try_from(offset >> 20).ok()?,
            slot: ((offset >> 15) & 0x1F) as u8,
            function: ((offset >> 12) & 0x7) as u8,
        };
        Some((addr, (offset & 0xFFF) as u16))
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((addr, register)) => self.bus.read_config(addr, register, data),
            None => data.fill(0xFF),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some((addr, register)) = Self::target(offset, data.len()) {
            self.bus.write_config(addr, register, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::{PCI_ECAM_BASE, PCI_ECAM_SIZE};
    use crate::devices::bus::Bus;
    use crate::devices::pci::{hostbridge::HostBridge, lpc::LpcBridge, PciAddress};
    use std::sync::Mutex;

    /// xhyve's default functions: a hostbridge at 0:0 and the LPC bridge at 0:31.
    fn machine() -> Arc<PciBus> {
        let bus = PciBus::new();
        let at = |slot| PciAddress::new(0, slot, 0).unwrap();
        bus.add(at(0), Arc::new(Mutex::new(HostBridge::netapp())))
            .unwrap();
        bus.add(at(31), Arc::new(Mutex::new(LpcBridge::new())))
            .unwrap();
        Arc::new(bus)
    }

    /// The port bus as the VMM lays it out: the latch at 0xCF8 (length 1), a stand-in for
    /// the reset register at 0xCF9, and the data window at 0xCFC.
    fn port_bus() -> (Bus, Arc<Mutex<Vec<u8>>>) {
        struct Recorder(Arc<Mutex<Vec<u8>>>);
        impl BusDevice for Recorder {
            fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
                data.fill(0);
            }
            fn write(&mut self, _: u64, _: u64, data: &[u8]) {
                self.0.lock().unwrap().extend_from_slice(data);
            }
        }
        let io = Arc::new(Mutex::new(PciConfigIo::new(machine())));
        let reset_writes = Arc::new(Mutex::new(Vec::new()));
        let bus = Bus::new();
        bus.insert(io.clone(), 0xCF8, 1).unwrap();
        bus.insert(
            Arc::new(Mutex::new(Recorder(reset_writes.clone()))),
            0xCF9,
            1,
        )
        .unwrap();
        bus.insert(io, 0xCFC, 4).unwrap();
        (bus, reset_writes)
    }

    fn select(bus: &Bus, slot: u32, function: u32, register: u32) {
        let address = ADDRESS_ENABLE | slot << 11 | function << 8 | register;
        assert!(bus.write(0xCF8, &address.to_le_bytes()));
    }

    fn read(bus: &Bus, port: u64, len: usize) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(port, &mut d[..len]));
        u32::from_le_bytes(d)
    }

    #[test]
    fn dword_word_and_byte_reads_through_cf8_cfc() {
        let (bus, _) = port_bus();
        select(&bus, 31, 0, 0);
        assert_eq!(read(&bus, 0xCFC, 4), 0x7000_8086);
        assert_eq!(read(&bus, 0xCFC, 2), 0x8086);
        assert_eq!(read(&bus, 0xCFE, 2), 0x7000);
        assert_eq!(read(&bus, 0xCFD, 1), 0x80);
        assert_eq!(read(&bus, 0xCFF, 1), 0x70);
        select(&bus, 31, 0, 8);
        assert_eq!(read(&bus, 0xCFF, 1), 0x06);
        assert_eq!(read(&bus, 0xCFE, 1), 0x01);
        // The latch reads back without its reserved bits.
        assert!(bus.write(0xCF8, &0xFF00_F803u32.to_le_bytes()));
        assert_eq!(read(&bus, 0xCF8, 4), 0x8000_F800);
    }

    #[test]
    fn absent_functions_and_disabled_latch_read_all_ones() {
        let (bus, _) = port_bus();
        select(&bus, 5, 0, 0);
        assert_eq!(read(&bus, 0xCFC, 4), 0xFFFF_FFFF);
        select(&bus, 0, 1, 0);
        assert_eq!(read(&bus, 0xCFC, 2), 0xFFFF);
        assert!(bus.write(0xCF8, &0x0000_0000u32.to_le_bytes()));
        assert_eq!(read(&bus, 0xCFC, 4), 0xFFFF_FFFF);
        // A word access straddling the dword is refused.
        select(&bus, 0, 0, 0);
        let mut d = [0u8; 2];
        assert!(bus.read(0xCFF, &mut d));
        assert_eq!(d, [0xFF, 0xFF]);
    }

    #[test]
    fn writes_land_at_byte_offsets_and_respect_read_only_fields() {
        let (bus, reset_writes) = port_bus();
        select(&bus, 0, 0, 0x3C);
        assert!(bus.write(0xCFC, &[0x0A]));
        assert!(bus.write(0xCFD, &[0x03])); // interrupt pin: read-only
        assert_eq!(read(&bus, 0xCFC, 2), 0x000A);
        select(&bus, 0, 0, 0);
        assert!(bus.write(0xCFC, &0xDEAD_BEEFu32.to_le_bytes()));
        assert_eq!(read(&bus, 0xCFC, 4), 0x1275_1275);
        select(&bus, 0, 0, 4);
        assert!(bus.write(0xCFC, &[0x07, 0x00]));
        assert_eq!(read(&bus, 0xCFC, 2), 0x0007);
        // A byte write to 0xCF9 is not a latch write.
        assert!(bus.write(0xCF9, &[0x06]));
        assert_eq!(*reset_writes.lock().unwrap(), vec![0x06]);
        assert_eq!(read(&bus, 0xCF8, 4), ADDRESS_ENABLE | 4);
    }

    #[test]
    fn ecam_reaches_the_same_functions() {
        let pci = machine();
        let ecam = Arc::new(Mutex::new(PciEcam::new(pci)));
        let mmio = Bus::new();
        mmio.insert(ecam.clone(), PCI_ECAM_BASE, PCI_ECAM_SIZE)
            .unwrap();
        let function = |slot: u64, f: u64, reg: u64| PCI_ECAM_BASE + (slot << 15 | f << 12 | reg);
        let mut d = [0u8; 4];
        assert!(mmio.read(function(31, 0, 0), &mut d));
        assert_eq!(u32::from_le_bytes(d), 0x7000_8086);
        let mut w = [0u8; 2];
        assert!(mmio.read(function(0, 0, 2), &mut w));
        assert_eq!(u16::from_le_bytes(w), 0x1275);
        assert!(mmio.read(function(2, 0, 0), &mut d));
        assert_eq!(d, [0xFF; 4]);
        // Extended space of a conventional function reads zero (no extended capabilities).
        assert!(mmio.read(function(0, 0, 0x100), &mut d));
        assert_eq!(d, [0; 4]);
        assert!(mmio.write(function(31, 0, 0x3C), &[0x09]));
        let mut b = [0u8; 1];
        assert!(mmio.read(function(31, 0, 0x3C), &mut b));
        assert_eq!(b[0], 0x09);
        // Misaligned access.
        assert!(mmio.read(function(0, 0, 1), &mut w));
        assert_eq!(w, [0xFF, 0xFF]);
    }
}
