//! Disk image back ends for virtio-blk, ahci-hd and ahci-cd.
//!
//! `options` parses xhyve's block option string, `raw` is the raw (sparse) image file,
//! `qcow2` the qcow2 format (through imago), `open` picks one by `format=` (never by probing),
//! `worker` runs requests on an I/O thread so a vCPU never waits for the disk. Device models
//! see a disk only through [`BlockBackend`], so they can be tested and fuzzed on memory.

pub mod memdisk;
pub mod open;
pub mod options;
pub mod qcow2;
pub mod raw;
pub mod serial;
#[cfg(test)]
pub mod test_util;
pub mod worker;

pub use memdisk::MemDisk;
pub use open::open_image;
pub use options::{BlockOptions, FlushMode, ImageFormat, OptionsError};
pub use qcow2::{Qcow2Error, Qcow2Image};
pub use raw::RawImage;
pub use worker::{IoWorker, SubmitError};

use std::io;
use std::path::PathBuf;
use vm_memory::VolatileSlice;

/// Why a block operation failed. Open errors name the image; request errors are built on
/// the vCPU/I/O path and so carry only numbers (no allocation).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path:?}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {0:?} is a directory")]
    IsDirectory(PathBuf),
    #[error("disk image {0:?} is a character device: raw device support is not implemented")]
    CharacterDevice(PathBuf),
    #[error("disk image {0:?} is in use by another process (it is locked)")]
    Locked(PathBuf),
    #[error("disk image {path:?} has {size} bytes, fewer than one {sector_size}-byte sector")]
    TooSmall {
        path: PathBuf,
        size: u64,
        sector_size: u32,
    },
    #[error("request of {len} bytes at offset {offset} is beyond the disk's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("operation not supported by this disk image")]
    Unsupported,
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    #[error("disk I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A disk as device models see it. Offsets and lengths are in bytes; every method checks
/// them against the disk size, so a guest-chosen sector number can never reach past the end.
pub trait BlockBackend: Send + Sync {
    /// Usable size in bytes (a whole number of logical sectors).
    fn size(&self) -> u64;
    fn logical_sector_size(&self) -> u32;
    fn physical_sector_size(&self) -> u32;
    fn is_read_only(&self) -> bool;
    /// Stable identity, `BHYVE-XXXX-XXXX-XXXX` as xhyve builds it (see `serial`).
    fn serial(&self) -> &[u8; serial::SERIAL_LEN];

    /// Fills `buf` from the disk at `offset`.
    fn read_to(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError>;
    /// Writes `buf` to the disk at `offset`.
    fn write_from(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Hints that a range is unused; the host may free its space. Reads of it afterwards
    /// return zeroes on this back end.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes a range read as zeroes, freeing its space where the host can.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError>;

    /// Number of logical sectors.
    fn sectors(&self) -> u64 {
        self.size() / u64::from(self.logical_sector_size())
    }
}

/// Checks that `len` bytes at `offset` lie inside a disk of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_for_overflow_and_end() {
        assert!(check_range(0, 512, 512).is_ok());
        assert!(check_range(512, 0, 512).is_ok());
        assert!(check_range(1, 512, 512).is_err());
        assert!(check_range(513, 0, 512).is_err());
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
        assert!(matches!(
            check_range(u64::MAX - 1, 4, 4096),
            Err(BlockError::OutOfRange { offset, len: 4, size: 4096 }) if offset == u64::MAX - 1
        ));
    }
}
