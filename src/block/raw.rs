//! A raw disk image: the guest's sectors are the file's bytes.
//!
//! The file is never preallocated or extended, so a new image made with `truncate -s 20G`
//! costs only the blocks the guest writes; discard and write-zeroes punch holes so space
//! comes back. I/O is positional (`pread`/`pwrite`), so one image can serve requests from
//! several threads without a shared file position. An advisory `flock` (exclusive, or shared
//! when read-only) stops two VMs from writing one image.

use super::serial::{serial_for, SERIAL_LEN};
use super::{check_range, BlockBackend, BlockError, BlockOptions, FlushMode};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

/// The guest sees whole sectors only: a trailing partial sector is out of its reach, which
/// the user should hear about (a truncated copy, a wrong `sectorsize=`) rather than find out
/// from a guest file system.
fn partial_sector_warning(path: &std::path::Path, byte_len: u64, sector: u64) -> Option<String> {
    let rest = byte_len % sector;
    (rest != 0 && byte_len >= sector).then(|| {
        format!(
            "disk image {path:?} has {byte_len} bytes, not a whole number of {sector}-byte \
             sectors: the guest sees {} bytes; the last {rest} are left out",
            byte_len - rest
        )
    })
}

/// Zeroes written where a hole cannot be punched.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    read_only: bool,
    nocache: bool,
    regular_file: bool,
    flush_mode: FlushMode,
    serial: [u8; SERIAL_LEN],
}

impl RawImage {
    /// Opens and locks the image described by `options`.
    pub fn open(options: &BlockOptions) -> Result<Self, BlockError> {
        let path = &options.path;
        let open_error = |source| BlockError::Open {
            path: path.clone(),
            source,
        };
        let mut flags = libc::O_CLOEXEC;
        if options.sync {
            flags |= libc::O_SYNC;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(flags)
            .open(path)
            .map_err(open_error)?;
        let file_type = file.metadata().map_err(open_error)?.file_type();
        if file_type.is_dir() {
            return Err(BlockError::IsDirectory(path.clone()));
        }
        if file_type.is_char_device() {
            return Err(BlockError::CharacterDevice(path.clone()));
        }
        lock(&file, options.read_only).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BlockError::Locked(path.clone())
            } else {
                open_error(e)
            }
        })?;
        // The end of a block device is its size, as for a file.
        let byte_len = file.seek(SeekFrom::End(0)).map_err(open_error)?;
        let sector = u64::from(options.logical_sector_size);
        let size = byte_len - byte_len % sector;
        if let Some(warning) = partial_sector_warning(path, byte_len, sector) {
            log::warn!("{warning}");
        }
        if size == 0 {
            return Err(BlockError::TooSmall {
                path: path.clone(),
                size: byte_len,
                sector_size: options.logical_sector_size,
            });
        }
        if options.nocache {
            set_nocache(&file).map_err(open_error)?;
        }
        Ok(RawImage {
            file,
            size,
            logical_sector_size: options.logical_sector_size,
            physical_sector_size: options.physical_sector_size,
            read_only: options.read_only,
            nocache: options.nocache,
            regular_file: file_type.is_file(),
            flush_mode: options.flush_mode,
            serial: serial_for(&options.spec),
        })
    }

    /// Reads into a plain buffer (tests, benchmarks, and callers outside guest memory).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read_to(offset, &VolatileSlice::from(buf))
    }

    /// Writes a plain buffer.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        pwrite_all(&self.file, buf.as_ptr(), buf.len(), offset)?;
        self.after_io(offset, buf.len() as u64);
        Ok(())
    }

    pub fn flush_mode(&self) -> FlushMode {
        self.flush_mode
    }

    /// Chooses how `flush` reaches storage (macOS users may trade F_FULLFSYNC for speed).
    pub fn set_flush_mode(&mut self, mode: FlushMode) {
        self.flush_mode = mode;
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    /// With `nocache`, drops what was just read or written from the host page cache.
    fn after_io(&self, offset: u64, len: u64) {
        #[cfg(target_os = "linux")]
        if self.nocache {
            // SAFETY: posix_fadvise only reads its integer arguments; the fd is ours and open.
            // A failed hint changes nothing, so its result is ignored.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    offset as libc::off_t,
                    len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len, self.nocache);
    }

    /// Writes zeroes over a range (where punching a hole is not possible).
    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), BlockError> {
        let end = offset + len;
        while offset < end {
            let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
            pwrite_all(&self.file, ZEROES.as_ptr(), chunk, offset)?;
            offset += chunk as u64;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeroes, freeing their blocks.
    fn zero_range(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        if !self.regular_file {
            return self.write_zero_bytes(offset, len);
        }
        match punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) => self.write_zero_bytes(offset, len),
            Err(e) => Err(e.into()),
        }
    }
}

impl BlockBackend for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical_sector_size
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical_sector_size
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn serial(&self) -> &[u8; SERIAL_LEN] {
        &self.serial
    }

    fn read_to(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        let len = buf.len();
        check_range(offset, len as u64, self.size)?;
        let guard = buf.ptr_guard_mut();
        pread_all(&self.file, guard.as_ptr(), len, offset)?;
        buf.bitmap().mark_dirty(0, len);
        self.after_io(offset, len as u64);
        Ok(())
    }

    fn write_from(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        let len = buf.len();
        self.check_write(offset, len as u64)?;
        let guard = buf.ptr_guard();
        pwrite_all(&self.file, guard.as_ptr(), len, offset)?;
        self.after_io(offset, len as u64);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        match self.flush_mode {
            FlushMode::Fsync => self.file.sync_all()?,
            FlushMode::FullFsync => full_fsync(&self.file)?,
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if !self.regular_file {
            // A hint only; block devices keep their data.
            return Ok(());
        }
        match punch_hole(&self.file, offset, len) {
            Err(e) if !is_unsupported(&e) => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len)
    }
}

pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

pub(crate) fn lock(file: &File, shared: bool) -> io::Result<()> {
    let operation = if shared { libc::LOCK_SH } else { libc::LOCK_EX } | libc::LOCK_NB;
    // SAFETY: flock takes an fd we own and an integer; it touches no memory of ours.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(target_os = "macos")]
fn set_nocache(file: &File) -> io::Result<()> {
    // SAFETY: F_NOCACHE takes an integer argument; the fd is ours and open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_NOCACHE, 1) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_os = "macos"))]
fn set_nocache(_file: &File) -> io::Result<()> {
    // Linux: O_DIRECT would need sector-aligned guest buffers; `after_io` drops pages instead.
    Ok(())
}

#[cfg(target_os = "macos")]
fn full_fsync(file: &File) -> io::Result<()> {
    // SAFETY: F_FULLFSYNC takes no pointer argument; the fd is ours and open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_FULLFSYNC) } == -1 {
        // Some file systems (network, FAT) lack it; fsync is the best they offer.
        return file.sync_all();
    }
    Ok(())
}

#[cfg(not(target_os = "macos"))]
fn full_fsync(file: &File) -> io::Result<()> {
    file.sync_all()
}

#[cfg(target_os = "linux")]
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    loop {
        // SAFETY: fallocate takes an fd we own and integers; KEEP_SIZE means it never
        // changes the file's length. The range was checked against the image size.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// macOS punches only whole file-system blocks: zero the partial blocks at either end by
/// writing, and punch the aligned middle.
#[cfg(target_os = "macos")]
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let block = file.metadata()?.blksize().max(512);
    let end = offset + len;
    let inner_start = offset.div_ceil(block) * block;
    let inner_end = end / block * block;
    if inner_start >= inner_end {
        return write_zeroes_raw(file, offset, len);
    }
    write_zeroes_raw(file, offset, inner_start - offset)?;
    write_zeroes_raw(file, inner_end, end - inner_end)?;
    let mut args = libc::fpunchhole_t {
        fp_flags: 0,
        reserved: 0,
        fp_offset: inner_start as libc::off_t,
        fp_length: (inner_end - inner_start) as libc::off_t,
    };
    // SAFETY: F_PUNCHHOLE reads the fpunchhole_t we pass, which lives across the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_PUNCHHOLE, &mut args) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(target_os = "macos")]
fn write_zeroes_raw(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
        pwrite_all(file, ZEROES.as_ptr(), chunk, offset)?;
        offset += chunk as u64;
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub(crate) fn punch_hole(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
}

/// Reads exactly `len` bytes to `ptr`; past the end of a file that shrank, the rest reads
/// as zeroes (it is a hole as far as the guest can tell).
pub(crate) fn pread_all(file: &File, ptr: *mut u8, len: usize, offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: `ptr..ptr+len` is a live, writable guest-memory or Rust buffer for the
        // duration of this call (the caller holds its guard), and `done < len`.
        let r = unsafe {
            libc::pread(
                file.as_raw_fd(),
                ptr.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match r {
            0 => {
                // SAFETY: as above; zeroing the unread tail stays inside the buffer.
                unsafe { std::ptr::write_bytes(ptr.add(done), 0, len - done) };
                return Ok(());
            }
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn pwrite_all(file: &File, ptr: *const u8, len: usize, offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: `ptr..ptr+len` is a live, readable buffer for the duration of this call
        // (the caller holds its guard or borrow), and `done < len`.
        let r = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                ptr.add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        match r {
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::test_util::TempImage;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;

    fn open(path: &Path, extra: &str) -> Result<RawImage, BlockError> {
        RawImage::open(&BlockOptions::parse(&format!("{}{extra}", path.display())).unwrap())
    }

    /// Opens once the last holder's lock is gone. Another test of this process may fork a
    /// child (qemu-img, xorriso) while our descriptor is open; the child holds the lock
    /// until it execs, so a release is not seen at once.
    fn open_once_released(path: &Path, extra: &str) -> RawImage {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match open(path, extra) {
                Err(BlockError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                other => return other.unwrap(),
            }
        }
    }

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn new_image_stays_sparse_and_reads_zeroes() {
        let img = TempImage::new("sparse", 64 << 20);
        let disk = open(&img.path, "").unwrap();
        assert_eq!(disk.size(), 64 << 20);
        assert_eq!(disk.sectors(), (64 << 20) / 512);
        let mut buf = vec![0xAAu8; 4096];
        disk.read_at(32 << 20, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(allocated(&img.path), 0, "open or read allocated blocks");
        disk.write_at(1 << 20, &[0x55; 4096]).unwrap();
        assert!(
            allocated(&img.path) <= 64 * 1024,
            "a 4 KiB write allocated too much"
        );
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 64 << 20);
    }

    #[test]
    fn write_then_read_back() {
        let img = TempImage::new("rw", 1 << 20);
        let disk = open(&img.path, "").unwrap();
        let data: Vec<u8> = (0..1536u32).map(|i| (i * 7) as u8).collect();
        disk.write_at(512, &data).unwrap();
        disk.flush().unwrap();
        let mut back = vec![0u8; 1536];
        disk.read_at(512, &mut back).unwrap();
        assert_eq!(back, data);
        let on_disk = std::fs::read(&img.path).unwrap();
        assert_eq!(&on_disk[512..2048], &data[..]);
    }

    #[test]
    fn discard_and_write_zeroes_free_blocks() {
        let img = TempImage::new("punch", 8 << 20);
        let disk = open(&img.path, "").unwrap();
        disk.write_at(0, &vec![0x11u8; 4 << 20]).unwrap();
        disk.flush().unwrap();
        let full = allocated(&img.path);
        assert!(full >= 4 << 20, "write did not allocate: {full}");

        disk.discard(0, 2 << 20).unwrap();
        let after_discard = allocated(&img.path);
        assert!(
            after_discard <= full - (2 << 20),
            "{full} -> {after_discard}"
        );

        disk.write_zeroes(2 << 20, 2 << 20).unwrap();
        assert!(allocated(&img.path) <= 64 * 1024);

        let mut buf = vec![0xFFu8; 4 << 20];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 8 << 20);
    }

    #[test]
    fn unaligned_write_zeroes_keeps_neighbours() {
        let img = TempImage::new("zeroes", 1 << 20);
        let disk = open(&img.path, "").unwrap();
        disk.write_at(0, &[0x22; 8192]).unwrap();
        disk.write_zeroes(100, 5000).unwrap();
        let mut buf = vec![0u8; 8192];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 0x22));
        assert!(buf[100..5100].iter().all(|&b| b == 0));
        assert!(buf[5100..].iter().all(|&b| b == 0x22));
    }

    #[test]
    fn read_only_rejects_writes_and_shares_the_lock() {
        let img = TempImage::new("ro", 1 << 20);
        let disk = open(&img.path, ",ro").unwrap();
        assert!(disk.is_read_only());
        assert!(matches!(
            disk.write_at(0, &[1; 512]),
            Err(BlockError::ReadOnly)
        ));
        assert!(matches!(disk.discard(0, 512), Err(BlockError::ReadOnly)));
        assert!(matches!(
            disk.write_zeroes(0, 512),
            Err(BlockError::ReadOnly)
        ));
        disk.flush().unwrap();
        let second = open(&img.path, ",ro").unwrap();
        assert!(matches!(open(&img.path, ""), Err(BlockError::Locked(_))));
        drop((disk, second));
        open_once_released(&img.path, "");
    }

    #[test]
    fn a_writer_locks_out_everyone_else() {
        let img = TempImage::new("lock", 1 << 20);
        let writer = open(&img.path, "").unwrap();
        let err = open(&img.path, "").unwrap_err();
        assert!(
            err.to_string().contains("in use by another process"),
            "{err}"
        );
        assert!(matches!(open(&img.path, ",ro"), Err(BlockError::Locked(_))));
        drop(writer);
        open_once_released(&img.path, "");
    }

    #[test]
    fn requests_beyond_the_end_are_refused() {
        let img = TempImage::new("bounds", 4096);
        let disk = open(&img.path, "").unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(3584, &mut buf).unwrap();
        assert!(matches!(
            disk.read_at(3585, &mut buf),
            Err(BlockError::OutOfRange {
                offset: 3585,
                len: 512,
                size: 4096
            })
        ));
        assert!(disk.write_at(4096, &buf).is_err());
        assert!(disk.write_at(u64::MAX - 10, &buf).is_err());
        assert!(disk.discard(0, 4097).is_err());
        assert!(disk.write_zeroes(u64::MAX, 1).is_err());
        assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 4096);
    }

    #[test]
    fn a_partial_last_sector_is_reported() {
        let path = std::path::Path::new("/img/d.raw");
        let warning = partial_sector_warning(path, 4096 + 1000, 4096).unwrap();
        assert!(
            warning.contains("\"/img/d.raw\" has 5096 bytes")
                && warning.contains("4096-byte")
                && warning.contains("last 1000"),
            "{warning}"
        );
        assert_eq!(partial_sector_warning(path, 8192, 4096), None);
    }

    #[test]
    fn size_is_rounded_down_to_whole_sectors() {
        let img = TempImage::new("round", 4096 + 1000);
        let disk = open(&img.path, ",sectorsize=4096").unwrap();
        assert_eq!(disk.size(), 4096);
        assert_eq!(disk.sectors(), 1);
        assert_eq!(disk.logical_sector_size(), 4096);
        let tiny = TempImage::new("tiny", 100);
        assert!(matches!(
            open(&tiny.path, ""),
            Err(BlockError::TooSmall { size: 100, .. })
        ));
    }

    #[test]
    fn missing_unreadable_and_odd_images_fail_at_open() {
        let img = TempImage::new("missing", 4096);
        let err = open(&img.dir.join("nope.img"), "").unwrap_err();
        assert!(
            err.to_string().starts_with("cannot open disk image"),
            "{err}"
        );
        assert!(err.to_string().contains("nope.img"), "{err}");
        assert!(matches!(
            open(&img.dir, ",ro"),
            Err(BlockError::IsDirectory(_))
        ));
        assert!(matches!(
            open(Path::new("/dev/null"), ",ro"),
            Err(BlockError::CharacterDevice(_))
        ));
    }

    #[test]
    fn serial_follows_the_option_string() {
        let img = TempImage::new("serial", 4096);
        let a = open(&img.path, ",ro").unwrap();
        let b = open(&img.path, ",ro").unwrap();
        assert_eq!(a.serial(), b.serial());
        assert_eq!(
            a.serial(),
            &serial_for(&format!("{},ro", img.path.display()))
        );
        assert!(a.serial().starts_with(b"BHYVE-"));
    }

    #[test]
    fn sync_and_nocache_images_work() {
        let img = TempImage::new("sync", 1 << 20);
        let disk = open(&img.path, ",sync,nocache").unwrap();
        disk.write_at(0, &[9; 512]).unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9; 512]);
    }
}
