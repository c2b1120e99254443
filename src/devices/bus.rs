//! Port I/O and MMIO buses: map an address range to one device.
//!
//! Ranges are fixed once the machine is built, so a lookup is a binary search over a sorted
//! vector: no allocation on the vCPU exit path. Each device sits behind its own mutex, taken
//! only for the duration of one access (never across `Vcpu::run`).

use std::sync::{Arc, Mutex};

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
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let overlaps = self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < base + len);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        let idx = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(idx.checked_sub(1)?)?;
        (addr - entry.base < entry.len).then_some(entry)
    }

    /// Reads from the device at `addr`. Returns false if no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some(e) => {
                lock(&e.device).read(e.base, addr - e.base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. Returns false if no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some(e) => {
                lock(&e.device).write(e.base, addr - e.base, data);
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
        let mut bus = Bus::new();
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
        let mut bus = Bus::new();
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
}
