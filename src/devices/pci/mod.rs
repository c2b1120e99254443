//! PCI: configuration space, the device tree by (bus, slot, function), and the two ways a
//! guest reaches configuration space: I/O ports 0xCF8/0xCFC (mechanism #1) and ECAM (MMIO).
//!
//! Devices only implement [`PciDevice`]; BARs and MSI/MSI-X will extend that trait and
//! [`ConfigSpace`] (BAR registers at 0x10-0x24 are read-only zero until then).

mod config_space;
mod host_access;
pub mod hostbridge;
pub mod lpc;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

pub use config_space::{ConfigSpace, PciIds, CONFIG_SPACE_SIZE, LEGACY_CONFIG_SPACE_SIZE};
pub use host_access::{PciConfigIo, PciEcam, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT};

use super::bus::lock;
use crate::cli::{PciDeviceConfig, PciDeviceKind};

/// A PCI function as the configuration-space accessors see it.
pub trait PciDevice: Send {
    fn config_space(&self) -> &ConfigSpace;
    fn config_space_mut(&mut self) -> &mut ConfigSpace;

    /// Reads `data.len()` (1, 2 or 4) bytes at `offset`. Devices with side effects on
    /// configuration reads override this.
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config_space().read(offset, data);
    }

    /// Writes `data` at `offset`, honouring the read-only and write-1-to-clear bits.
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config_space_mut().write(offset, data);
    }
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A function's position: bus 0-255, slot 0-31, function 0-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

impl PciAddress {
    pub const MAX_SLOT: u8 = 31;
    pub const MAX_FUNCTION: u8 = 7;

    pub fn new(bus: u8, slot: u8, function: u8) -> Result<Self, PciError> {
        let addr = PciAddress {
            bus,
            slot,
            function,
        };
        if slot > Self::MAX_SLOT {
            return Err(PciError::BadSlot(addr));
        }
        if function > Self::MAX_FUNCTION {
            return Err(PciError::BadFunction(addr));
        }
        Ok(addr)
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.bus, self.slot, self.function)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("invalid PCI slot {0}: slot must be 0-31")]
    BadSlot(PciAddress),
    #[error("invalid PCI slot {0}: function must be 0-7")]
    BadFunction(PciAddress),
    #[error("PCI slot {0} is already in use")]
    Occupied(PciAddress),
    #[error("only one LPC bridge is allowed (second at {0})")]
    SecondLpc(PciAddress),
    #[error("LPC bridge at {0} must be on bus 0")]
    LpcNotOnBus0(PciAddress),
}

/// All PCI functions of the machine.
#[derive(Default)]
pub struct PciBus {
    devices: BTreeMap<PciAddress, SharedPciDevice>,
}

impl PciBus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a function. A slot with functions other than 0 gets the multi-function bit set
    /// in the header type of each of its functions.
    pub fn add(&mut self, addr: PciAddress, device: SharedPciDevice) -> Result<(), PciError> {
        let addr = PciAddress::new(addr.bus, addr.slot, addr.function)?;
        if self.devices.contains_key(&addr) {
            return Err(PciError::Occupied(addr));
        }
        self.devices.insert(addr, device);
        self.update_multifunction(addr.bus, addr.slot);
        Ok(())
    }

    fn slot_functions(
        &self,
        bus: u8,
        slot: u8,
    ) -> impl Iterator<Item = (&PciAddress, &SharedPciDevice)> {
        let first = PciAddress {
            bus,
            slot,
            function: 0,
        };
        let last = PciAddress {
            function: PciAddress::MAX_FUNCTION,
            ..first
        };
        self.devices.range(first..=last)
    }

    fn update_multifunction(&self, bus: u8, slot: u8) {
        let multi = self.slot_functions(bus, slot).any(|(a, _)| a.function > 0);
        for (_, dev) in self.slot_functions(bus, slot) {
            lock(dev).config_space_mut().set_multifunction(multi);
        }
    }

    pub fn get(&self, addr: PciAddress) -> Option<&SharedPciDevice> {
        self.devices.get(&addr)
    }

    /// Every function, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (&PciAddress, &SharedPciDevice)> {
        self.devices.iter()
    }

    /// Reads configuration space; an absent function reads as all ones.
    pub fn read_config(&self, addr: PciAddress, offset: u16, data: &mut [u8]) {
        match self.devices.get(&addr) {
            Some(dev) => lock(dev).read_config(offset, data),
            None => data.fill(0xFF),
        }
    }

    /// Writes configuration space; writes to an absent function are dropped.
    pub fn write_config(&self, addr: PciAddress, offset: u16, data: &[u8]) {
        if let Some(dev) = self.devices.get(&addr) {
            lock(dev).write_config(offset, data);
        }
    }
}

/// Builds the PCI functions that `-s` asks for.
pub fn build_pci_bus(devices: &[PciDeviceConfig]) -> Result<PciBus, PciError> {
    let mut bus = PciBus::new();
    let mut lpc_at: Option<PciAddress> = None;
    for config in devices {
        let addr = PciAddress::new(config.bus, config.slot, config.function)?;
        let device: SharedPciDevice = match config.kind {
            PciDeviceKind::Hostbridge => Arc::new(Mutex::new(hostbridge::HostBridge::netapp())),
            PciDeviceKind::AmdHostbridge => Arc::new(Mutex::new(hostbridge::HostBridge::amd())),
            PciDeviceKind::Lpc => {
                if lpc_at.is_some() {
                    return Err(PciError::SecondLpc(addr));
                }
                if addr.bus != 0 {
                    return Err(PciError::LpcNotOnBus0(addr));
                }
                lpc_at = Some(addr);
                Arc::new(Mutex::new(lpc::LpcBridge::new()))
            }
        };
        bus.add(addr, device)?;
    }
    Ok(bus)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(bus: u8, slot: u8, function: u8, kind: PciDeviceKind) -> PciDeviceConfig {
        PciDeviceConfig {
            bus,
            slot,
            function,
            kind,
            options: None,
        }
    }

    fn read32(bus: &PciBus, addr: PciAddress, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        bus.read_config(addr, offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn at(bus: u8, slot: u8, function: u8) -> PciAddress {
        PciAddress::new(bus, slot, function).unwrap()
    }

    #[test]
    fn builds_xhyve_default_devices() {
        let bus = build_pci_bus(&[
            cfg(0, 0, 0, PciDeviceKind::Hostbridge),
            cfg(0, 31, 0, PciDeviceKind::Lpc),
        ])
        .unwrap();
        assert_eq!(read32(&bus, at(0, 0, 0), 0), 0x1275_1275);
        assert_eq!(read32(&bus, at(0, 31, 0), 0), 0x7000_8086);
        assert_eq!(read32(&bus, at(0, 31, 0), 8) >> 8, 0x06_01_00);
        assert_eq!(read32(&bus, at(0, 1, 0), 0), 0xFFFF_FFFF);
    }

    #[test]
    fn multifunction_bit_follows_the_slot() {
        let bus = build_pci_bus(&[
            cfg(0, 3, 0, PciDeviceKind::Hostbridge),
            cfg(0, 3, 2, PciDeviceKind::AmdHostbridge),
            cfg(0, 4, 0, PciDeviceKind::Hostbridge),
        ])
        .unwrap();
        let header = |a| (read32(&bus, a, 0x0C) >> 16) as u8;
        assert_eq!(header(at(0, 3, 0)), 0x80);
        assert_eq!(header(at(0, 3, 2)), 0x80);
        assert_eq!(header(at(0, 4, 0)), 0x00);
        assert_eq!(read32(&bus, at(0, 3, 2), 0), 0x7432_1022);
    }

    #[test]
    fn rejects_bad_and_conflicting_slots() {
        assert_eq!(
            build_pci_bus(&[cfg(0, 32, 0, PciDeviceKind::Hostbridge)])
                .err()
                .map(|e| e.to_string()),
            Some("invalid PCI slot 0:32:0: slot must be 0-31".to_string())
        );
        assert!(matches!(
            build_pci_bus(&[cfg(0, 1, 8, PciDeviceKind::Hostbridge)]),
            Err(PciError::BadFunction(_))
        ));
        assert!(matches!(
            build_pci_bus(&[
                cfg(0, 1, 0, PciDeviceKind::Hostbridge),
                cfg(0, 1, 0, PciDeviceKind::Lpc)
            ]),
            Err(PciError::Occupied(_))
        ));
        assert!(matches!(
            build_pci_bus(&[
                cfg(0, 30, 0, PciDeviceKind::Lpc),
                cfg(0, 31, 0, PciDeviceKind::Lpc)
            ]),
            Err(PciError::SecondLpc(_))
        ));
        assert!(matches!(
            build_pci_bus(&[cfg(1, 31, 0, PciDeviceKind::Lpc)]),
            Err(PciError::LpcNotOnBus0(_))
        ));
    }

    #[test]
    fn absent_function_ignores_writes() {
        let bus = build_pci_bus(&[]).unwrap();
        bus.write_config(at(0, 5, 0), 0x04, &[0xFF, 0xFF]);
        assert_eq!(read32(&bus, at(0, 5, 0), 0x04), 0xFFFF_FFFF);
    }
}
