//! A kernel, initrd or module file being loaded: bounded reads and copies into guest RAM.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::memory::GuestMemory;

/// How much of the file's start the format probes look at (multiboot's search window).
pub const PREFIX_LEN: u64 = 8192;

pub struct Image {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
    /// "kernel", "initrd" or "module", for messages.
    pub what: &'static str,
}

/// An OS error as the C library words it, without Rust's " (os error N)" suffix.
fn os_reason(err: &io::Error) -> String {
    let text = err.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

impl Image {
    pub fn open(path: &Path, what: &'static str) -> Result<Image, BootError> {
        let open_error = |err: io::Error| BootError::Open {
            what,
            path: path.to_path_buf(),
            reason: os_reason(&err),
        };
        let file = File::open(path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        if meta.is_dir() {
            return Err(open_error(io::Error::from_raw_os_error(libc::EISDIR)));
        }
        Ok(Image {
            file,
            path: path.to_path_buf(),
            size: meta.len(),
            what,
        })
    }

    pub fn read_error(&self, err: &io::Error) -> BootError {
        BootError::Read {
            what: self.what,
            path: self.path.clone(),
            reason: os_reason(err),
        }
    }

    pub fn corrupt(&self, reason: impl Into<String>) -> BootError {
        BootError::Corrupt {
            what: self.what,
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The first `PREFIX_LEN` bytes, or the whole file if it is shorter.
    pub fn prefix(&mut self) -> Result<Vec<u8>, BootError> {
        let len = self.size.min(PREFIX_LEN) as usize;
        let mut buf = vec![0; len];
        self.read_at(0, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset`; a range past the end of the file means a corrupt file.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BootError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(self.corrupt(format!(
                "{} bytes at offset {offset:#x} are past the end of the file ({} bytes)",
                buf.len(),
                self.size
            )));
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.read_exact(buf))
            .map_err(|err| self.read_error(&err))
    }

    /// Copies `len` bytes from file `offset` to guest `addr` (already claimed by the caller).
    pub fn copy_to_guest(
        &mut self,
        mem: &GuestMemory,
        offset: u64,
        len: u64,
        addr: u64,
    ) -> Result<(), BootError> {
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(self.corrupt(format!(
                "{len} bytes at offset {offset:#x} are past the end of the file ({} bytes)",
                self.size
            )));
        }
        let len = usize::try_from(len).map_err(|_| self.corrupt("segment too large"))?;
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|err| self.read_error(&err))?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut self.file, len)
            .map_err(|_| BootError::GuestWrite {
                what: format!("{} \"{}\"", self.what, self.path.display()),
                addr,
            })
    }
}

/// Writes `bytes` to guest `addr` (already claimed by the caller).
pub fn write_guest(
    mem: &GuestMemory,
    what: &str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite {
            what: what.to_string(),
            addr,
        })
}

/// Zeroes `len` guest bytes from `addr` (a segment's BSS; already claimed by the caller).
pub fn zero_guest(mem: &GuestMemory, what: &str, addr: u64, len: u64) -> Result<(), BootError> {
    const CHUNK: u64 = 64 * 1024;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        write_guest(mem, what, addr + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::test_util::TempFile;
    use crate::memory::create_guest_memory;

    #[test]
    fn missing_file_names_path_and_os_error() {
        let err = Image::open(Path::new("/nonexistent/vmlinuz"), "kernel")
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "cannot open kernel \"/nonexistent/vmlinuz\": No such file or directory"
        );
    }

    #[test]
    fn directory_is_rejected() {
        let err = Image::open(Path::new("/"), "initrd").err().unwrap();
        assert_eq!(err.to_string(), "cannot open initrd \"/\": Is a directory");
    }

    #[test]
    fn reads_and_copies_are_bounded_by_the_file() {
        let file = TempFile::new("image-bounds", &[1, 2, 3, 4, 5]);
        let mut image = Image::open(file.path(), "module").unwrap();
        assert_eq!(image.prefix().unwrap(), vec![1, 2, 3, 4, 5]);
        let mut buf = [0; 2];
        image.read_at(3, &mut buf).unwrap();
        assert_eq!(buf, [4, 5]);
        assert!(image.read_at(4, &mut buf).is_err());
        assert!(image.read_at(u64::MAX, &mut buf).is_err());

        let mem = create_guest_memory(2 << 20).unwrap();
        image.copy_to_guest(&mem, 1, 3, 0x5000).unwrap();
        assert_eq!(
            mem.read_obj::<[u8; 3]>(GuestAddress(0x5000)).unwrap(),
            [2, 3, 4]
        );
        assert!(image.copy_to_guest(&mem, 1, 5, 0x5000).is_err());
        // Past the end of guest RAM is an error, not a panic.
        assert!(image.copy_to_guest(&mem, 0, 5, (2 << 20) - 2).is_err());
    }

    #[test]
    fn zeroing_spans_chunks() {
        let mem = create_guest_memory(2 << 20).unwrap();
        mem.write_slice(&[0xff; 0x2_0000], GuestAddress(0x10_0000))
            .unwrap();
        zero_guest(&mem, "bss", 0x10_0001, 0x1_8000).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xff);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0001)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11_8000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11_8001)).unwrap(), 0xff);
    }
}
