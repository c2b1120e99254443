//! MSI-X: the capability in configuration space, and the vector table and pending-bit array
//! (PBA) in a memory BAR.
//!
//! Enable and function-mask bits live in the capability's message-control word, which the
//! guest writes through configuration space; the table and PBA live here. A vector that fires
//! while masked (per vector or per function) sets its pending bit and is sent when unmasked.

use std::sync::Arc;

use super::{ConfigSpace, ConfigSpaceError};
use crate::devices::irq::MsiSender;

const CAP_ID_MSIX: u8 = 0x11;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;
const VECTOR_CONTROL_MASKED: u32 = 1;
/// Most vectors a table may hold (the 11-bit table-size field).
pub const MAX_VECTORS: u16 = 2048;

/// One table entry: message address, data, and vector control (bit 0 = masked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    address_low: u32,
    address_high: u32,
    data: u32,
    control: u32,
}

impl Entry {
    /// Power-on state: everything zero, vector masked.
    const RESET: Entry = Entry {
        address_low: 0,
        address_high: 0,
        data: 0,
        control: VECTOR_CONTROL_MASKED,
    };

    fn address(&self) -> u64 {
        u64::from(self.address_high) << 32 | u64::from(self.address_low)
    }
}

/// A function's MSI-X state. The table is at `table_offset` and the PBA at `pba_offset`
/// inside BAR `bar`; the device forwards that BAR's accesses to [`Msix::read`]/[`Msix::write`].
pub struct Msix {
    cap_offset: u16,
    bar: usize,
    table_offset: u64,
    pba_offset: u64,
    entries: Vec<Entry>,
    pending: Vec<u64>,
    sender: Arc<dyn MsiSender>,
}

impl Msix {
    /// Adds the capability for `vectors` vectors to `config`. The table needs
    /// [`Msix::table_bytes`] at `table_offset` and the PBA [`Msix::pba_bytes`] at
    /// `pba_offset`, both 8-byte aligned, in BAR `bar`.
    pub fn new(
        config: &mut ConfigSpace,
        vectors: u16,
        bar: usize,
        table_offset: u32,
        pba_offset: u32,
        sender: Arc<dyn MsiSender>,
    ) -> Result<Self, ConfigSpaceError> {
        let vectors = vectors.clamp(1, MAX_VECTORS);
        let control = vectors - 1;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | bar as u32).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | bar as u32).to_le_bytes());
        let cap_offset = config.add_capability(CAP_ID_MSIX, &body)?;
        let writable = CONTROL_ENABLE | CONTROL_FUNCTION_MASK;
        config.set_writable(usize::from(cap_offset) + 2, &writable.to_le_bytes());
        let pba_words = usize::from(vectors).div_ceil(64);
        Ok(Msix {
            cap_offset,
            bar,
            table_offset: u64::from(table_offset),
            pba_offset: u64::from(pba_offset),
            entries: vec![Entry::RESET; usize::from(vectors)],
            pending: vec![0; pba_words],
            sender,
        })
    }

    pub fn table_bytes(vectors: u16) -> u64 {
        u64::from(vectors) * ENTRY_SIZE
    }

    pub fn pba_bytes(vectors: u16) -> u64 {
        u64::from(vectors).div_ceil(64) * 8
    }

    /// The BAR holding the table and PBA.
    pub fn bar(&self) -> usize {
        self.bar
    }

    pub fn vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    fn control(&self, config: &ConfigSpace) -> u16 {
        config.read_u16(self.cap_offset + 2)
    }

    /// Whether the guest turned MSI-X on.
    pub fn enabled(&self, config: &ConfigSpace) -> bool {
        self.control(config) & CONTROL_ENABLE != 0
    }

    fn function_masked(&self, config: &ConfigSpace) -> bool {
        self.control(config) & CONTROL_FUNCTION_MASK != 0
    }

    fn is_pending(&self, vector: usize) -> bool {
        self.pending[vector / 64] & (1 << (vector % 64)) != 0
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        let bit = 1u64 << (vector % 64);
        if pending {
            self.pending[vector / 64] |= bit;
        } else {
            self.pending[vector / 64] &= !bit;
        }
    }

    /// Signals `vector`: sends its message, or marks it pending while masked. Does nothing
    /// while MSI-X is disabled or for a vector past the table.
    pub fn notify(&mut self, config: &ConfigSpace, vector: u16) {
        let index = usize::from(vector);
        let Some(entry) = self.entries.get(index).copied() else {
            return;
        };
        if !self.enabled(config) {
            return;
        }
        if self.function_masked(config) || entry.control & VECTOR_CONTROL_MASKED != 0 {
            self.set_pending(index, true);
            return;
        }
        self.sender.send_msi(entry.address(), entry.data);
    }

    /// Sends the pending vectors that are no longer masked. Call after the guest writes the
    /// capability (the function mask may have cleared) or a vector control word.
    pub fn deliver_unmasked(&mut self, config: &ConfigSpace) {
        if !self.enabled(config) || self.function_masked(config) {
            return;
        }
        for index in 0..self.entries.len() {
            let entry = self.entries[index];
            if self.is_pending(index) && entry.control & VECTOR_CONTROL_MASKED == 0 {
                self.set_pending(index, false);
                self.sender.send_msi(entry.address(), entry.data);
            }
        }
    }

    /// Whether a configuration write at `offset` of `len` bytes touched this capability.
    pub fn covers(&self, offset: u16, len: usize) -> bool {
        let start = self.cap_offset;
        let end = start + 12;
        offset < end && offset.saturating_add(len as u16) > start
    }

    /// A read inside the BAR: dword or qword, naturally aligned; anything else reads zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            if let Some(value) = self.read_dword(at) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
        }
    }

    fn read_dword(&self, offset: u64) -> Option<u32> {
        if let Some((index, field)) = self.table_position(offset) {
            let e = self.entries.get(index)?;
            return Some([e.address_low, e.address_high, e.data, e.control][field]);
        }
        let pba_end = self.pba_offset + Self::pba_bytes(self.vectors());
        if (self.pba_offset..pba_end).contains(&offset) {
            let dword = ((offset - self.pba_offset) / 4) as usize;
            let word = *self.pending.get(dword / 2)?;
            return Some((word >> (32 * (dword % 2))) as u32);
        }
        None
    }

    fn table_position(&self, offset: u64) -> Option<(usize, usize)> {
        let relative = offset.checked_sub(self.table_offset)?;
        let index = usize::try_from(relative / ENTRY_SIZE).ok()?;
        (index < self.entries.len()).then_some((index, (relative % ENTRY_SIZE / 4) as usize))
    }

    /// A write inside the BAR: the table is writable (dword or qword), the PBA read-only.
    pub fn write(&mut self, config: &ConfigSpace, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        let mut unmasked = false;
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let Some((index, field)) = self.table_position(at) else {
                continue;
            };
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let entry = &mut self.entries[index];
            match field {
                0 => entry.address_low = value,
                1 => entry.address_high = value,
                2 => entry.data = value,
                _ => {
                    entry.control = value & VECTOR_CONTROL_MASKED;
                    unmasked |= entry.control == 0;
                }
            }
        }
        if unmasked {
            self.deliver_unmasked(config);
        }
    }

    /// Device reset: every vector masked and cleared, nothing pending. (The capability's
    /// control word is reset with the rest of configuration space by its owner.)
    pub fn reset(&mut self) {
        self.entries.fill(Entry::RESET);
        self.pending.fill(0);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::pci::PciIds;
    use std::sync::Mutex;

    /// Records every MSI sent, for device unit tests.
    #[derive(Default)]
    pub struct RecordingMsi(pub Mutex<Vec<(u64, u32)>>);

    impl MsiSender for RecordingMsi {
        fn send_msi(&self, address: u64, data: u32) {
            self.0.lock().unwrap().push((address, data));
        }
    }

    fn setup(vectors: u16) -> (ConfigSpace, Msix, Arc<RecordingMsi>) {
        let mut config = ConfigSpace::new(PciIds {
            vendor: 0x1AF4,
            device: 0x1005,
            class: 0xFF,
            subclass: 0,
            prog_if: 0,
            revision: 0,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        let sent = Arc::new(RecordingMsi::default());
        let msix = Msix::new(&mut config, vectors, 1, 0, 0x800, sent.clone()).unwrap();
        (config, msix, sent)
    }

    fn write32(msix: &mut Msix, config: &ConfigSpace, offset: u64, value: u32) {
        msix.write(config, offset, &value.to_le_bytes());
    }

    fn read32(msix: &Msix, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        msix.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn program(msix: &mut Msix, config: &ConfigSpace, vector: u64, address: u64, data: u32) {
        let base = vector * 16;
        msix.write(config, base, &address.to_le_bytes());
        write32(msix, config, base + 8, data);
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (config, msix, _) = setup(3);
        assert_eq!(config.read_u32(0x34) & 0xFF, 0x40);
        assert_eq!(
            config.read_u32(0x40),
            0x0002_0011,
            "id, end of list, 3 vectors"
        );
        assert_eq!(config.read_u32(0x44), 0x0000_0001, "table at 0 in BAR 1");
        assert_eq!(config.read_u32(0x48), 0x0000_0801, "PBA at 0x800 in BAR 1");
        assert!(msix.covers(0x42, 2));
        assert!(!msix.covers(0x4C, 4));
        assert_eq!(Msix::table_bytes(3), 48);
        assert_eq!(Msix::pba_bytes(65), 16);
    }

    #[test]
    fn vectors_start_masked_and_fire_once_enabled_and_unmasked() {
        let (mut config, mut msix, sent) = setup(2);
        program(&mut msix, &config, 1, 0xFEE0_0000, 0x51);
        assert_eq!(read32(&msix, 16 + 12), 1, "masked at reset");
        msix.notify(&config, 1);
        assert!(sent.0.lock().unwrap().is_empty(), "MSI-X disabled: nothing");
        assert_eq!(read32(&msix, 0x800), 0, "disabled: not pending either");

        config.write(0x42, &0x8000u16.to_le_bytes());
        assert!(msix.enabled(&config));
        msix.notify(&config, 1);
        assert!(sent.0.lock().unwrap().is_empty());
        assert_eq!(read32(&msix, 0x800), 0b10, "masked vector is pending");

        write32(&mut msix, &config, 16 + 12, 0);
        assert_eq!(*sent.0.lock().unwrap(), vec![(0xFEE0_0000, 0x51)]);
        assert_eq!(read32(&msix, 0x800), 0, "pending bit cleared on delivery");
        msix.notify(&config, 1);
        assert_eq!(sent.0.lock().unwrap().len(), 2);
        msix.notify(&config, 7);
        assert_eq!(sent.0.lock().unwrap().len(), 2, "vector past the table");
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut config, mut msix, sent) = setup(1);
        program(&mut msix, &config, 0, 0xFEE0_1000, 0x60);
        write32(&mut msix, &config, 12, 0);
        config.write(0x42, &0xC000u16.to_le_bytes());
        msix.notify(&config, 0);
        assert!(sent.0.lock().unwrap().is_empty());
        assert_eq!(read32(&msix, 0x800), 1);
        config.write(0x42, &0x8000u16.to_le_bytes());
        msix.deliver_unmasked(&config);
        assert_eq!(*sent.0.lock().unwrap(), vec![(0xFEE0_1000, 0x60)]);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (config, mut msix, _) = setup(1);
        msix.write(&config, 1, &[0xFF; 4]);
        msix.write(&config, 0, &[0xFF; 2]);
        write32(&mut msix, &config, 0x800, 0xFFFF_FFFF);
        assert_eq!(read32(&msix, 0), 0);
        assert_eq!(read32(&msix, 0x800), 0, "PBA is read-only");
        let mut d = [0xAAu8; 2];
        msix.read(0, &mut d);
        assert_eq!(d, [0, 0]);
        assert_eq!(read32(&msix, 0x10), 0, "past the table");
        let mut q = [0u8; 8];
        msix.read(u64::MAX - 7, &mut q);
        assert_eq!(q, [0; 8]);
    }
}
