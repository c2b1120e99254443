//! A qcow2 file held in memory, for unit tests and the `qcow2_open` fuzz target.
//!
//! It refuses to grow past a limit (so a hostile image cannot make the fuzzer allocate
//! without bound: the request gets an I/O error) and records the lowest offset written, so a
//! test can check that nothing was written where the image's header and tables lived unless
//! the format allows it.

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::Storage;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a [`MemStorage`] and its test share.
#[derive(Debug, Default)]
pub struct MemState {
    pub data: Mutex<Vec<u8>>,
    /// Every write as (offset, length), in order.
    pub writes: Mutex<Vec<(u64, u64)>>,
}

impl MemState {
    pub fn data(&self) -> MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn writes(&self) -> MutexGuard<'_, Vec<(u64, u64)>> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug)]
pub struct MemStorage {
    state: Arc<MemState>,
    limit: u64,
    helper: CommonStorageHelper,
}

impl MemStorage {
    /// A file holding `bytes` that may grow to `limit` bytes.
    pub fn new(bytes: Vec<u8>, limit: u64) -> (Self, Arc<MemState>) {
        let state = Arc::new(MemState {
            data: Mutex::new(bytes),
            writes: Mutex::default(),
        });
        let storage = MemStorage {
            state: Arc::clone(&state),
            limit,
            helper: CommonStorageHelper::default(),
        };
        (storage, state)
    }

    /// The same memory file, for [`super::DirectIo`].
    pub fn direct(&self) -> MemStorage {
        MemStorage {
            state: Arc::clone(&self.state),
            limit: self.limit,
            helper: CommonStorageHelper::default(),
        }
    }

    fn end(&self, offset: u64, len: u64) -> io::Result<usize> {
        match offset.checked_add(len) {
            Some(end) if end <= self.limit => Ok(end as usize),
            _ => Err(io::Error::other(format!(
                "memory file: {len} bytes at {offset} pass the {} byte limit",
                self.limit
            ))),
        }
    }

    fn write_with(&self, offset: u64, len: u64, fill: impl FnOnce(&mut [u8])) -> io::Result<()> {
        let end = self.end(offset, len)?;
        let mut data = self.state.data();
        if data.len() < end {
            data.resize(end, 0);
        }
        fill(&mut data[offset as usize..end]);
        self.state.writes().push((offset, len));
        Ok(())
    }
}

impl fmt::Display for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "memory:[{}B]", self.state.data().len())
    }
}

impl super::DirectIo for MemStorage {
    fn read_to(&self, host: u64, buf: &vm_memory::VolatileSlice<'_>) -> io::Result<()> {
        let end = self.end(host, buf.len() as u64)?;
        let data = self.state.data();
        let mut chunk = vec![0u8; buf.len()];
        let start = (host as usize).min(data.len());
        let stop = end.min(data.len());
        chunk[..stop - start].copy_from_slice(&data[start..stop]);
        buf.copy_from(&chunk);
        Ok(())
    }

    fn write_from(&self, host: u64, buf: &vm_memory::VolatileSlice<'_>) -> io::Result<()> {
        self.write_with(host, buf.len() as u64, |dest| {
            buf.copy_to(dest);
        })
    }
}

impl Storage for MemStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.state.data().len() as u64)
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        self.end(offset, len)?;
        let data = self.state.data();
        // Past the end of the file reads as zeroes, as from a sparse file.
        let mut chunk = vec![0u8; len as usize];
        let start = (offset as usize).min(data.len());
        let stop = (offset as usize + len as usize).min(data.len());
        chunk[..stop - start].copy_from_slice(&data[start..stop]);
        bufv.copy_from_slice(&chunk);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        self.write_with(offset, len, |dest| bufv.copy_into_slice(dest))
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.write_with(offset, length, |dest| dest.fill(0))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}
