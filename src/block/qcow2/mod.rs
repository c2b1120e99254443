//! qcow2 images behind [`BlockBackend`], through the `imago` crate.
//!
//! imago (by a QEMU block-layer maintainer, built here in its synchronous mode) does the
//! format: header and feature checks, L1/L2 lookup with an L2 and refcount-block cache,
//! cluster allocation and refcounting, compressed-cluster reads (zlib), zero clusters, discard
//! (dropping refcounts) and copy-on-write from a backing image. This module does what imago
//! leaves to its caller, the way xhyve wants it:
//!
//! - the image and each backing file are opened by us (`O_CLOEXEC`; backing files `O_RDONLY`)
//!   and `flock`ed like raw images (exclusive for the image, shared for backing files), then
//!   handed to imago;
//! - the backing chain is opened from the header's backing file name and backing format
//!   extension, never by probing (see [`backing`]);
//! - metadata writes are ordered ([`ordered`]): L1 and refcount table entries held back
//!   until what they point at is durable, an `fsync` between refcount-block writes and the
//!   L2 writes that depend on them (and back, when freeing), and a guest flush is `fsync`
//!   (data), refcount blocks, `fsync`, L2 tables, `fsync`, L1/refcount table entries,
//!   `fsync`: a crash, `kill -9` or power loss leaves leaks at worst, never corruption;
//! - discard and write-zeroes punch holes where the clusters they free were;
//! - guest offsets are checked against the disk size before imago sees them;
//! - a writable image's header, tables and refcounts are checked at open ([`check`]): imago
//!   trusts them, and a hostile refcount layout sent it into unbounded recursion (a stack
//!   overflow) or could make it hand a used cluster to new metadata. An image that passes
//!   keeps every guest write inside its own data clusters.
//!
//! Images with the dirty or corrupt bit, an external data file, extended L2 entries or a
//! compression type other than zlib are refused at open by imago with a message naming the
//! feature; `qemu-img check -r all` repairs a dirty image.

pub mod backing;
pub mod check;
pub mod fuzz;
pub mod mapcache;
pub mod mem;
pub mod ordered;

use super::serial::{serial_for, SERIAL_LEN};
use super::{check_range, BlockBackend, BlockError, BlockOptions, FlushMode};
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::{FormatAccess, Storage, StorageOpenOptions};
pub use ordered::OrderedStorage;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use vm_memory::bitmap::Bitmap;
use vm_memory::VolatileSlice;

/// Why a qcow2 image (or one of its backing files) could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    #[error("qcow2 {path:?}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("qcow2 {0:?} is in use by another process (it is locked)")]
    Locked(PathBuf),
    #[error(
        "qcow2 {path:?}: backing file {backing:?} has no backing format; \
         we never guess one: set it with `qemu-img rebase -u -b {backing} -F raw|qcow2 IMAGE`"
    )]
    BackingFormatMissing { path: PathBuf, backing: String },
    #[error("qcow2 {path:?}: backing format {format:?} not supported (raw or qcow2)")]
    BackingFormat { path: PathBuf, format: String },
    #[error("qcow2 {path:?}: backing chain deeper than {limit} images (a loop?)")]
    ChainTooDeep { path: PathBuf, limit: usize },
    #[error("qcow2 {0:?}: external data files are not supported")]
    ExternalDataFile(PathBuf),
    #[error("qcow2 {path:?} is refused: {source} (see `qemu-img check`)")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: check::Corrupt,
    },
    #[error("qcow2 {path:?}: {size} bytes is less than one {sector_size}-byte sector")]
    TooSmall {
        path: PathBuf,
        size: u64,
        sector_size: u32,
    },
}

/// The image file as imago gets it: table writes held back until a flush (see [`ordered`]).
pub type ImageFile = OrderedStorage<imago::file::File>;

/// A qcow2 disk over storage `S` (a host file, or [`mem::MemStorage`] for fuzzing).
pub struct Qcow2Image<S: Storage + 'static = ImageFile> {
    /// Reads and writes share it; discard and write-zeroes take it exclusively, because imago
    /// may free clusters that a concurrent request is still using.
    access: RwLock<FormatAccess<S>>,
    size: u64,
    logical_sector_size: u32,
    physical_sector_size: u32,
    read_only: bool,
    /// `sync`/`direct`: every write is flushed before it completes.
    write_through: bool,
    serial: [u8; SERIAL_LEN],
    /// What imago does not tell: the header's version and cluster size.
    layout: Layout,
    /// The image file, to punch holes where freed clusters were (None in memory).
    punch: Option<std::fs::File>,
    /// Guest-to-host mappings of plain data clusters (`l2-cache-size=`).
    map: mapcache::MappingCache,
    /// Odd while a discard or write-zeroes may free clusters; bumped twice by each. A read
    /// through the mapping cache takes no lock: it checks this before and after, and goes
    /// through imago (under the lock) if a free overlapped it.
    freeing: AtomicU64,
    /// The image file as the mapping cache's requests reach it.
    direct: Box<dyn DirectIo>,
    /// `flock`s on the image and its backing files, held while the image is open.
    _locks: Vec<std::fs::File>,
}

/// The header fields this module needs that imago keeps private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub version: u32,
    pub cluster_size: u64,
}

impl Layout {
    /// Reads them from the first 24 bytes of the header (imago has validated the header
    /// by the time they are used, so out-of-range values never get here).
    pub fn parse(header: &[u8]) -> Option<Layout> {
        let be32 = |at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(header.get(at..at + 4)?.try_into().ok()?))
        };
        let cluster_bits = be32(20)?;
        if !(9..=21).contains(&cluster_bits) {
            return None;
        }
        Some(Layout {
            version: be32(4)?,
            cluster_size: 1 << cluster_bits,
        })
    }
}

impl<S: Storage + 'static> std::fmt::Debug for Qcow2Image<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// Data I/O at a host offset of the image file, bypassing imago (see [`mapcache`]).
pub trait DirectIo: Send + Sync {
    fn read_to(&self, host: u64, buf: &VolatileSlice<'_>) -> io::Result<()>;
    fn write_from(&self, host: u64, buf: &VolatileSlice<'_>) -> io::Result<()>;
}

impl DirectIo for std::fs::File {
    fn read_to(&self, host: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        let guard = buf.ptr_guard_mut();
        crate::block::raw::pread_all(self, guard.as_ptr(), buf.len(), host)
    }

    fn write_from(&self, host: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        let guard = buf.ptr_guard();
        crate::block::raw::pwrite_all(self, guard.as_ptr(), buf.len(), host)
    }
}

impl Qcow2Image {
    /// Opens and locks the qcow2 image of `options` and its backing chain.
    pub fn open(options: &BlockOptions) -> Result<Self, Qcow2Error> {
        let path = &options.path;
        let storage_options = storage_options(options.flush_mode);
        let (file, lock) = backing::open_file(path, !options.read_only, &storage_options)?;
        let header = backing::read_header(&lock, path)?;
        check_file(path, &lock, &header, !options.read_only)?;
        let layout = Layout::parse(&header).unwrap_or(Layout {
            version: 3,
            cluster_size: 1 << 16,
        });
        let file = OrderedStorage::new(file, &header);
        let mut qcow2 = Qcow2::<ImageFile>::open_image(file, !options.read_only)
            .map_err(|source| open_error(path, source))?;
        if qcow2.requires_external_data_file() {
            return Err(Qcow2Error::ExternalDataFile(path.clone()));
        }
        // The external data file is ours to set; "none" keeps imago from opening one.
        qcow2.set_data_file(None);
        let mut locks = vec![lock];
        let backing = backing::open_chain(path, &qcow2, &header, &storage_options, 1, &mut locks)?;
        qcow2.set_backing(backing);
        let direct = locks[0].try_clone().map_err(|e| open_error(path, e))?;
        let mut image = Self::from_qcow2(qcow2, path, options, layout, locks, Box::new(direct))?;
        if !options.read_only {
            image.punch = image._locks[0].try_clone().ok();
        }
        Ok(image)
    }
}

impl Qcow2Image<OrderedStorage<mem::MemStorage>> {
    /// A disk on the qcow2 image `bytes` held in memory, which may grow to `limit` bytes.
    /// Backing file and external data file names in the header are ignored (fuzzing).
    pub fn open_in_memory(
        bytes: Vec<u8>,
        limit: u64,
        read_only: bool,
    ) -> Result<(Self, std::sync::Arc<mem::MemState>), Qcow2Error> {
        let path = Path::new("memory.qcow2");
        let layout = Layout::parse(&bytes);
        let header = bytes[..bytes.len().min(4096)].to_vec();
        let read = |offset: u64, buf: &mut [u8]| -> io::Result<()> {
            let src = usize::try_from(offset)
                .ok()
                .and_then(|at| bytes.get(at..at.checked_add(buf.len())?))
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        };
        check_image(path, &header, bytes.len() as u64, &read, !read_only)?;
        let (storage, state) = mem::MemStorage::new(bytes, limit);
        let direct = Box::new(storage.direct());
        let storage = OrderedStorage::new(storage, &header);
        let mut qcow2 = Qcow2::<OrderedStorage<mem::MemStorage>>::open_image(storage, !read_only)
            .map_err(|e| open_error(path, e))?;
        if qcow2.requires_external_data_file() {
            return Err(Qcow2Error::ExternalDataFile(path.to_path_buf()));
        }
        qcow2.set_data_file(None);
        qcow2.set_backing(None);
        let mut options = BlockOptions::new(path);
        options.read_only = read_only;
        let layout =
            layout.ok_or_else(|| open_error(path, io::Error::other("header too short")))?;
        Ok((
            Self::from_qcow2(qcow2, path, &options, layout, Vec::new(), direct)?,
            state,
        ))
    }
}

impl<S: Storage + 'static> Qcow2Image<S> {
    /// A disk on an already opened qcow2 driver (`locks` are held until the disk is dropped).
    pub fn from_qcow2(
        qcow2: Qcow2<S>,
        path: &Path,
        options: &BlockOptions,
        layout: Layout,
        locks: Vec<std::fs::File>,
        direct: Box<dyn DirectIo>,
    ) -> Result<Self, Qcow2Error> {
        let access = FormatAccess::new(qcow2);
        let sector = u64::from(options.logical_sector_size);
        let byte_len = access.size();
        let size = byte_len - byte_len % sector;
        if size == 0 {
            return Err(Qcow2Error::TooSmall {
                path: path.to_path_buf(),
                size: byte_len,
                sector_size: options.logical_sector_size,
            });
        }
        Ok(Qcow2Image {
            access: RwLock::new(access),
            size,
            logical_sector_size: options.logical_sector_size,
            physical_sector_size: options.physical_sector_size,
            read_only: options.read_only,
            write_through: options.sync,
            serial: serial_for(&options.spec),
            layout,
            punch: None,
            map: mapcache::MappingCache::new(
                layout.cluster_size.trailing_zeros(),
                options.l2_cache_size.unwrap_or(mapcache::DEFAULT_SIZE),
                size,
            ),
            freeing: AtomicU64::new(0),
            direct,
            _locks: locks,
        })
    }

    /// A read of plain data through the mapping cache without the lock; false (and `buf`
    /// perhaps written) if it must go through imago instead.
    fn read_unlocked(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<bool, BlockError> {
        let before = self.freeing.load(Ordering::Acquire);
        if before & 1 != 0 {
            return Ok(false);
        }
        let mapcache::Lookup::Plain { host, .. } = self.map.lookup(offset, buf.len() as u64) else {
            return Ok(false);
        };
        self.direct.read_to(host, buf)?;
        // No free began since `before`, so the cluster read was still this guest cluster's.
        fence(Ordering::SeqCst);
        Ok(self.freeing.load(Ordering::Relaxed) == before)
    }

    /// Reads into a plain buffer (tests, benchmarks, fuzzing).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read_to(offset, &VolatileSlice::from(buf))
    }

    /// Writes a plain buffer.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let access = self.shared();
        let result = access.write(buf, offset);
        self.map.forget(offset, buf.len() as u64);
        result?;
        drop(access);
        self.after_write()
    }

    /// The host offset of `len` bytes at guest `offset` if they lie in one plain data
    /// cluster (one the image may write in place, if `write`), asking imago on a miss.
    fn plain(
        &self,
        access: &FormatAccess<S>,
        offset: u64,
        len: u64,
        write: bool,
    ) -> Result<Option<u64>, BlockError> {
        use mapcache::Lookup;
        for _ in 0..2 {
            match self.map.lookup(offset, len) {
                Lookup::Plain { host, writable } => {
                    return Ok((writable || !write).then_some(host));
                }
                Lookup::Indirect => return Ok(None),
                Lookup::Miss(cluster) => {
                    let generation = self.map.generation();
                    let start = cluster * self.layout.cluster_size;
                    let span = self.map.table_span();
                    let table_end = (start / span + 1) * span;
                    let (mapping, length) =
                        access.get_shallow_mapping(start, table_end.min(self.size) - start)?;
                    let count = length.div_ceil(self.layout.cluster_size).max(1);
                    let host = match mapping {
                        imago::ShallowMapping::Raw {
                            offset, writable, ..
                        } => Some((offset, writable)),
                        _ => None,
                    };
                    self.map.fill(generation, cluster, count, host);
                }
            }
        }
        Ok(None)
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }

    fn after_write(&self) -> Result<(), BlockError> {
        if self.write_through {
            self.flush()?;
        }
        Ok(())
    }

    // A request that panicked inside imago leaves the lock poisoned; its caches are still
    // whole (imago updates them under its own locks), so later requests may go on.
    fn shared(&self) -> RwLockReadGuard<'_, FormatAccess<S>> {
        self.access.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, FormatAccess<S>> {
        self.access.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `len` bytes at `offset` read as zeroes. On v3 images whole clusters become zero
    /// clusters (which also hide a backing file's data), their host clusters are freed, and
    /// the file gets a hole where they were. v2 images have no zero clusters, so zeroes are
    /// written there.
    fn zero_and_free(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_write(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.layout.version < 3 {
            return self.write_zero_bytes(offset, len);
        }
        let mut access = self.exclusive();
        let _freeing = Freeing::begin(&self.freeing);
        self.map.forget(offset, len);
        let holes = self.sole_host_clusters(&access, offset, len)?;
        access.discard_to_zero(offset, len)?;
        if !holes.is_empty() {
            // imago drops the refcounts of discarded clusters when it flushes (zeroed L2
            // entries first). The exclusive lock keeps any allocation from reusing a freed
            // cluster before its hole is punched.
            access.flush()?;
            if let Some(file) = &self.punch {
                for (host, length) in holes {
                    match crate::block::raw::punch_hole(file, host, length) {
                        Err(e) if !crate::block::raw::is_unsupported(&e) => return Err(e.into()),
                        _ => {}
                    }
                }
            }
        }
        drop(access);
        self.after_write()
    }

    /// Host ranges of the whole clusters in the guest range that this image alone owns
    /// (refcount 1: the L2 entry's "copied" flag, which imago reports as a writable mapping).
    /// Clusters shared with an internal snapshot are never punched.
    fn sole_host_clusters(
        &self,
        access: &FormatAccess<S>,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64)>, BlockError> {
        let cluster = self.layout.cluster_size;
        let mut at = offset.div_ceil(cluster) * cluster;
        let end = (offset + len) / cluster * cluster;
        let mut holes: Vec<(u64, u64)> = Vec::new();
        while at < end {
            let (mapping, length) = access.get_shallow_mapping(at, end - at)?;
            if length == 0 {
                break;
            }
            if let imago::ShallowMapping::Raw {
                offset: host,
                writable: true,
                ..
            } = mapping
            {
                match holes.last_mut() {
                    Some((start, run)) if *start + *run == host => *run += length,
                    _ => holes.push((host, length)),
                }
            }
            at += length;
        }
        Ok(holes)
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), BlockError> {
        static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
        let end = offset + len;
        let access = self.shared();
        let start = offset;
        while offset < end {
            let chunk = (end - offset).min(ZEROES.len() as u64) as usize;
            let result = access.write(&ZEROES[..chunk], offset);
            if result.is_err() {
                self.map.forget(start, end - start);
            }
            result?;
            offset += chunk as u64;
        }
        self.map.forget(start, end - start);
        drop(access);
        self.after_write()
    }
}

/// Keeps [`Qcow2Image::freeing`] odd while it lives.
struct Freeing<'a>(&'a AtomicU64);

impl<'a> Freeing<'a> {
    fn begin(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Freeing(count)
    }
}

impl Drop for Freeing<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// Storage options for the image and its backing files.
pub(crate) fn storage_options(flush_mode: FlushMode) -> StorageOpenOptions {
    let options = StorageOpenOptions::new();
    #[cfg(target_os = "macos")]
    let options = options.relaxed_sync(flush_mode == FlushMode::Fsync);
    #[cfg(not(target_os = "macos"))]
    let _ = flush_mode;
    options
}

/// Refuses an image whose header or (if it will be written) refcounts imago must not be
/// trusted with (see [`check`]).
fn check_image(
    path: &Path,
    header: &[u8],
    file_size: u64,
    read: check::ReadAt<'_>,
    writable: bool,
) -> Result<(), Qcow2Error> {
    let corrupt = |source| Qcow2Error::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    let fields = check::parse_header(header, file_size).map_err(corrupt)?;
    if writable {
        check::check_refcounts(&fields, file_size, read).map_err(corrupt)?;
    }
    Ok(())
}

/// [`check_image`] on an image file.
pub(crate) fn check_file(
    path: &Path,
    file: &std::fs::File,
    header: &[u8],
    writable: bool,
) -> Result<(), Qcow2Error> {
    use std::os::unix::fs::FileExt;
    let file_size = file.metadata().map_err(|e| open_error(path, e))?.len();
    let read = |offset: u64, buf: &mut [u8]| file.read_exact_at(buf, offset);
    check_image(path, header, file_size, &read, writable)
}

fn open_error(path: &Path, source: io::Error) -> Qcow2Error {
    Qcow2Error::Open {
        path: path.to_path_buf(),
        source,
    }
}

impl<S: Storage + 'static> BlockBackend for Qcow2Image<S> {
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
        // imago asserts that a vector is empty exactly when it has no buffers.
        if len == 0 {
            return Ok(());
        }
        if self.read_unlocked(offset, buf)? {
            buf.bitmap().mark_dirty(0, len);
            return Ok(());
        }
        let access = self.shared();
        if let Some(host) = self.plain(&access, offset, len as u64, false)? {
            self.direct.read_to(host, buf)?;
        } else {
            let (vector, _guard) = IoVectorMut::from_volatile_slice_one(buf);
            access.readv(vector, offset)?;
        }
        buf.bitmap().mark_dirty(0, len);
        Ok(())
    }

    fn write_from(&self, offset: u64, buf: &VolatileSlice<'_>) -> Result<(), BlockError> {
        self.check_write(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let access = self.shared();
        if let Some(host) = self.plain(&access, offset, buf.len() as u64, true)? {
            self.direct.write_from(host, buf)?;
        } else {
            let (vector, _guard) = IoVector::from_volatile_slice_one(buf);
            let result = access.writev(vector, offset);
            // imago may have given these clusters new homes.
            self.map.forget(offset, buf.len() as u64);
            result?;
        }
        drop(access);
        self.after_write()
    }

    /// Data first, then metadata, in QEMU's order: `fsync` makes every written cluster's
    /// contents durable; imago writes back its cached refcount blocks, then the L2 tables
    /// that point at newly counted clusters ([`OrderedStorage`] `fsync`s between the two);
    /// [`OrderedStorage`] then `fsync`s and writes the L1 and refcount table entries it held
    /// back, which make new tables reachable; a last `fsync` makes those durable. A crash or
    /// power loss at any point loses unflushed writes and leaks clusters at worst.
    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        let access = self.shared();
        access.sync()?;
        access.flush()?;
        access.sync()?;
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zero_and_free(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.zero_and_free(offset, len)
    }
}

impl<S: Storage + 'static> Drop for Qcow2Image<S> {
    /// imago writes back its metadata caches when dropped; a guest that never flushed still
    /// leaves a consistent image when the VM stops normally.
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
mod tests;
