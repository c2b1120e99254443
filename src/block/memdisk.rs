//! A disk held in memory: the back end for device-model tests and fuzz targets, where a
//! file would be slow and would outlive a crash.

use super::serial::{serial_for, SERIAL_LEN};
use super::{check_range, BlockBackend, BlockError};
use std::sync::Mutex;
use vm_memory::VolatileSlice;

#[derive(Debug)]
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    size: u64,
    logical_sector_size: u32,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
}

impl MemDisk {
    /// A zero-filled disk of `size` bytes with `sector_size`-byte sectors.
    pub fn new(size: usize, sector_size: u32, read_only: bool) -> Self {
        Self::from_bytes(vec![0; size], sector_size, read_only)
    }

    /// A disk holding `data` (its length rounded down to whole sectors).
    pub fn from_bytes(mut data: Vec<u8>, sector_size: u32, read_only: bool) -> Self {
        let whole = data.len() - data.len() % sector_size.max(1) as usize;
        data.truncate(whole);
        MemDisk {
            size: whole as u64,
            data: Mutex::new(data),
            logical_sector_size: sector_size,
            read_only,
            serial: serial_for("memdisk"),
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock leaves plain bytes behind; they are still usable.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    fn fill_zero(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        let (start, end) = (offset as usize, (offset + len) as usize);
        self.lock()[start..end].fill(0);
        Ok(())
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }
    fn physical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    fn read_to(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let data = self.lock();
        let start = offset as usize;
        buf.copy_from(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_from(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        let mut data = self.lock();
        let start = offset as usize;
        buf.copy_to(&mut data[start..start + buf.len()]);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.fill_zero(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.fill_zero(offset, len)
    }
}
