//! Port I/O and MMIO buses: map an address range to one device.
//!
//! A lookup is a binary search over a sorted vector behind a read-write lock: no allocation on
//! the vCPU exit path. The read lock is held only to find the entry and clone its `Arc`, never
//! while the device runs, so a device may change the bus it sits on (a PCI function moving its
//! BARs from a configuration write) without deadlocking. Ranges change rarely (BAR moves), so
//! the write side may allocate. Each device sits behind its own mutex, taken only for the
//! duration of one access (never across `Vcpu::run`).

use std::sync::{Arc, Mutex, RwLock};

/// A device that answers reads and writes on a bus.
///
/// `offset` is relative to the start of the range the device was inserted at; `base` is that
/// start, for devices that serve several ranges.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    entries: RwLock<Vec<Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `base..base+len`. Callable while vCPUs run (a BAR being mapped).
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        let overlaps = entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        let at = entries.partition_point(|e| e.base < base);
        entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    /// Removes the range that starts at `base` with length `len`, if exactly that is mapped.
    /// Returns whether something was removed.
    pub fn remove(&self, base: u64, len: u64) -> bool {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        match entries.iter().position(|e| e.base == base && e.len == len) {
            Some(at) => {
                entries.remove(at);
                true
            }
            None => false,
        }
    }

    /// The device covering `addr` and the base of its range; the lock is released on return.
    fn find(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        let idx = entries.partition_point(|e| e.base <= addr);
        let entry = entries.get(idx.checked_sub(1)?)?;
        (addr - entry.base < entry.len).then(|| (entry.device.clone(), entry.base))
    }

    /// Reads from the device at `addr`. Returns false if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((device, base)) => {
                lock(&device).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((device, base)) => {
                lock(&device).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device even if another thread panicked while holding it: the device state is
/// still the best we have, and the VMM must keep serving the guest.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Registers of one byte per I/O port (PIC, PIT, ...). A wider access covers the following
/// ports, as on ISA hardware.
pub trait BytePorts {
    fn read_port(&mut self, port: u16) -> u8;
    fn write_port(&mut self, port: u16, value: u8);
}

/// `BusDevice::read` for a `BytePorts` device.
pub fn read_byte_ports(device: &mut impl BytePorts, base: u64, offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = match u16::try_from(base + offset + i as u64) {
            Ok(port) => device.read_port(port),
            Err(_) => 0xff,
        };
    }
}

/// `BusDevice::write` for a `BytePorts` device.
pub fn write_byte_ports(device: &mut impl BytePorts, base: u64, offset: u64, data: &[u8]) {
    for (i, &byte) in data.iter().enumerate() {
        if let Ok(port) = u16::try_from(base + offset + i as u64) {
            device.write_port(port, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.0.push((base, offset, data[0]));
        }
    }

    #[test]
    fn routes_to_the_device_covering_the_address() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        let b = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x2f8, 8).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(bus.write(0x2f8, &[7]));
        assert_eq!(lock(&b).0, vec![(0x2f8, 0, 7)]);
        assert!(!bus.read(0x400, &mut d));
        assert!(!bus.read(0x2f7, &mut d));
        assert!(!bus.write(0, &[1]));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(a.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(a.clone(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(a.clone(), 0x110, 1).is_ok());
        assert!(bus.insert(a.clone(), 0x0, 0).is_err());
        assert!(bus.insert(a, u64::MAX, 2).is_err());
    }

    #[test]
    fn ranges_can_be_removed_and_moved() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        assert!(!bus.remove(0x1000, 0x80), "only an exact range is removed");
        assert!(bus.remove(0x1000, 0x100));
        let mut d = [0u8; 1];
        assert!(!bus.read(0x1000, &mut d));
        bus.insert(a, 0x2000, 0x100).unwrap();
        assert!(bus.read(0x2010, &mut d));
        assert_eq!(d[0], 0x10);
    }

    /// A device that remaps itself from inside an access must not deadlock the bus.
    #[test]
    fn a_device_may_change_its_own_bus_during_an_access() {
        struct Mover(Arc<Bus>, Option<SharedDevice>);
        impl BusDevice for Mover {
            fn read(&mut self, _base: u64, _offset: u64, _data: &mut [u8]) {}
            fn write(&mut self, base: u64, _offset: u64, _data: &[u8]) {
                if let Some(me) = self.1.take() {
                    assert!(self.0.remove(base, 0x10));
                    self.0.insert(me, 0x500, 0x10).unwrap();
                }
            }
        }
        let bus = Arc::new(Bus::new());
        let mover = Arc::new(Mutex::new(Mover(bus.clone(), None)));
        lock(&mover).1 = Some(mover.clone());
        bus.insert(mover.clone(), 0x100, 0x10).unwrap();
        assert!(bus.write(0x104, &[1]));
        assert!(!bus.write(0x104, &[1]));
        assert!(bus.write(0x504, &[1]));
        lock(&mover).1 = None; // break the reference cycle
    }
}
