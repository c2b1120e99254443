//! The image file as imago sees it, with its metadata writes put in an order that survives a
//! crash or a power loss: writes to the L1 table and the refcount table held back, and an
//! `fsync` wherever a write depends on an earlier one.
//!
//! Held back: imago 0.2.6 writes a new L2 table and its L1 entry (and a new refcount block
//! and its refcount table entry) to the file at once, while the refcount that marks the new
//! cluster as used waits in its refcount-block cache until the next flush. A crash in between
//! (even `kill -9`, no power loss needed) leaves the L1 table pointing at a cluster whose
//! refcount is 0 on disk: `qemu-img check` calls that corruption. Holding the top-level
//! tables' writes back until imago has written its caches gives QEMU's order: refcounts, then
//! L2 tables, then (after an `fsync`) the L1 and refcount tables that make them reachable.
//!
//! Synced between: imago orders its two caches itself (its `MetadataCaches`): while it
//! allocates, every dirty refcount block is written before any L2 table (on flush, and
//! before an L2 table is evicted); while it frees, every dirty L2 table before any refcount
//! block. But it writes one cache right after the other with no `fsync` between, so the disk
//! may keep the later writes and lose the earlier ones: after a power loss an L2 entry could
//! point at a cluster whose refcount never reached the disk, or a refcount could drop to 0
//! while the L2 entry still using the cluster did not (both corruption). So this wrapper
//! knows which clusters are refcount blocks and L2 tables (the clusters the refcount and L1
//! tables name, read when the first write comes and kept up to date from the table writes it
//! holds), and never lets a refcount-block write and any other write through imago share
//! one `fsync` interval: a write of one kind after a completed write of the other kind that
//! no `fsync` has covered yet `fsync`s first, which makes either dependency durable before
//! what depends on it, whichever direction imago is in.
//!
//! Released early: an L2 table that the disk already names, written back while refcount
//! table entries are held, may point at new clusters that only a held entry's block counts
//! (a guest writing past what the file's refcount blocks cover, with more than 128 L2 tables
//! in use, so that imago evicts one). Such a write first makes everything durable, releases
//! the held entries (imago has written every refcount block they depend on by then) and makes
//! them durable too. Without this a `kill -9` alone could leave an L2 entry whose cluster
//! has no refcount block.
//!
//! The `fsync`s cost only when imago writes metadata between flushes (evictions from its
//! caches of 128 L2 tables and 32 refcount blocks, growing the refcount table, switching
//! between allocating and freeing) and one more per guest flush that finds both caches
//! dirty; data written through the mapping cache does not pass here. A header write (imago
//! moves a table only by rewriting the header) `fsync`s what came before it, so the new table
//! is on disk before the header names it.
//!
//! Reads of held ranges see the held bytes. Writes are kept per offset (a later write to the
//! same place replaces an earlier one), so they never outgrow the two tables. A write to the
//! header first puts every held write in place, so nothing held can land on a cluster the
//! move freed.

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::{Storage, StorageOpenOptions};
use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// The file ranges of the L1 and refcount tables, from a header.
pub fn table_ranges(header: &[u8]) -> Vec<Range<u64>> {
    use super::check::{be32, be64};
    let be32 = |at| be32(header, at);
    let be64 = |at| be64(header, at);
    let (Some(cluster_bits), Some(l1_size), Some(l1_offset), Some(rt_offset), Some(rt_clusters)) =
        (be32(20), be32(36), be64(40), be64(48), be32(56))
    else {
        return Vec::new();
    };
    if !(9..=21).contains(&cluster_bits) {
        return Vec::new();
    }
    let mut ranges = Vec::new();
    let l1_len = u64::from(l1_size) * 8;
    if let Some(end) = l1_offset.checked_add(l1_len) {
        ranges.push(l1_offset..end);
    }
    let rt_len = u64::from(rt_clusters) << cluster_bits;
    if let Some(end) = rt_offset.checked_add(rt_len) {
        ranges.push(rt_offset..end);
    }
    ranges
}

/// The L1 and refcount tables' file ranges and the image's cluster bits, from a header.
#[derive(Debug, Clone)]
struct Tables {
    l1: Range<u64>,
    refcount: Range<u64>,
    cluster_bits: u32,
}

impl Tables {
    fn parse(header: &[u8]) -> Option<Tables> {
        use super::check::{be32, be64};
        let (cluster_bits, l1_size, l1_offset, rt_offset, rt_clusters) = (
            be32(header, 20)?,
            be32(header, 36)?,
            be64(header, 40)?,
            be64(header, 48)?,
            be32(header, 56)?,
        );
        if !(9..=21).contains(&cluster_bits) {
            return None;
        }
        let rt_len = u64::from(rt_clusters) << cluster_bits;
        Some(Tables {
            l1: l1_offset..l1_offset.checked_add(u64::from(l1_size) * 8)?,
            refcount: rt_offset..rt_offset.checked_add(rt_len)?,
            cluster_bits,
        })
    }
}

/// What a write through imago is, for the order of writes (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    RefcountBlock,
    /// An L2 table that the L1 table (as held) names.
    L2Table,
    Other,
}

/// Which completed writes an `fsync` has covered. Writes are numbered as they complete; an
/// `fsync` covers every write that completed before it started.
#[derive(Debug, Default)]
struct Order {
    completed: u64,
    synced: u64,
    /// The number of the last completed write of each kind (0: none yet).
    last_refcount_block: u64,
    last_other: u64,
}

struct Held {
    ranges: Vec<Range<u64>>,
    /// offset -> bytes, in file order.
    writes: BTreeMap<u64, Vec<u8>>,
    /// From the latest header (None: no header seen).
    tables: Option<Tables>,
    /// What the L1 and refcount tables name, read when the first write needs them.
    named: Option<Named>,
    order: Order,
}

/// The clusters that the L1 table names (L2 tables) and that the refcount table names
/// (refcount blocks), as the file and the held writes have it: file offsets, sorted. Offsets
/// are added as table writes come and never removed (a stale one costs an `fsync`, no more);
/// at most one per table entry, so no more memory than imago's own copy of the tables.
struct Named {
    l2_tables: Vec<u64>,
    refcount_blocks: Vec<u64>,
}

impl Held {
    fn new(header: Option<&[u8]>) -> Self {
        Held {
            ranges: header.map(table_ranges).unwrap_or_default(),
            writes: BTreeMap::new(),
            tables: header.and_then(Tables::parse),
            named: None,
            order: Order::default(),
        }
    }

    /// Adds what table bytes `bytes` at file `offset` name.
    fn learn(&mut self, offset: u64, bytes: &[u8]) {
        let (Some(tables), Some(named)) = (&self.tables, &mut self.named) else {
            return;
        };
        add_named(&mut named.l2_tables, &tables.l1, offset, bytes);
        add_named(&mut named.refcount_blocks, &tables.refcount, offset, bytes);
    }
}

/// Adds to `named` (sorted) the cluster offsets in the whole 8-byte entries of `table` that
/// `bytes` at file `offset` hold (L1 and refcount table entries keep them in bits 9-55).
fn add_named(named: &mut Vec<u64>, table: &Range<u64>, offset: u64, bytes: &[u8]) {
    const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
    let from = offset.max(table.start);
    let to = offset.saturating_add(bytes.len() as u64).min(table.end);
    // The first entry boundary at or after `from`.
    let mut at = from + (8 - (from - table.start) % 8) % 8;
    while at.saturating_add(8) <= to {
        let i = (at - offset) as usize;
        let entry = u64::from_be_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        let cluster = entry & OFFSET_MASK;
        if cluster != 0 {
            if let Err(place) = named.binary_search(&cluster) {
                named.insert(place, cluster);
            }
        }
        at += 8;
    }
}

pub struct OrderedStorage<S: Storage> {
    inner: S,
    held: Mutex<Held>,
    helper: CommonStorageHelper,
}

impl<S: Storage> OrderedStorage<S> {
    /// Wraps `inner`, holding back writes to the tables `header` (its first bytes) places.
    pub fn new(inner: S, header: &[u8]) -> Self {
        OrderedStorage {
            inner,
            held: Mutex::new(Held::new(Some(header))),
            helper: CommonStorageHelper::default(),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes every held write to the file, in offset order (they never overlap each other's
    /// bytes differently: a rewrite of one offset replaced the older bytes).
    fn release(&self, held: &mut Held) -> io::Result<()> {
        if held.writes.is_empty() {
            return Ok(());
        }
        // Table entries: a refcount block freed after them (an L2 table replaced) must not
        // reach the disk in the same `fsync` interval.
        self.sync_before(held, Kind::Other)?;
        while let Some((offset, bytes)) = held.writes.pop_first() {
            let vector = IoVector::from(&bytes[..]);
            // SAFETY: the same contract as our own `pure_writev`: imago serialises writes to
            // these ranges through its table locks, and we hold the mutex.
            if let Err(e) = unsafe { self.inner.pure_writev(vector, offset) } {
                held.writes.insert(offset, bytes);
                return Err(e);
            }
            Self::completed(held, Kind::Other);
        }
        Ok(())
    }

    /// What a write at `offset` is; reads the L1 and refcount tables the first time it is
    /// needed.
    fn kind(&self, held: &mut Held, offset: u64) -> io::Result<Kind> {
        let Some(tables) = held.tables.clone() else {
            return Ok(Kind::Other);
        };
        if held.named.is_none() {
            let mut named = Named {
                l2_tables: Vec::new(),
                refcount_blocks: Vec::new(),
            };
            let mut chunk = vec![0u8; 64 << 10];
            for (table, list) in [
                (&tables.l1, &mut named.l2_tables),
                (&tables.refcount, &mut named.refcount_blocks),
            ] {
                let mut at = table.start;
                while at < table.end {
                    let len = (table.end - at).min(chunk.len() as u64) as usize;
                    // SAFETY: a read into our own buffer; writes to this range are held
                    // back by us (under the mutex we hold) and laid over below.
                    unsafe {
                        self.inner
                            .pure_readv(IoVectorMut::from(&mut chunk[..len]), at)?
                    };
                    add_named(list, table, at, &chunk[..len]);
                    at += len as u64;
                }
                for (&at, bytes) in held.writes.range(..table.end) {
                    add_named(list, table, at, bytes);
                }
            }
            held.named = Some(named);
        }
        let cluster = offset >> tables.cluster_bits << tables.cluster_bits;
        let Some(named) = &held.named else {
            return Ok(Kind::Other);
        };
        Ok(if named.refcount_blocks.binary_search(&cluster).is_ok() {
            Kind::RefcountBlock
        } else if named.l2_tables.binary_search(&cluster).is_ok() {
            Kind::L2Table
        } else {
            Kind::Other
        })
    }

    /// `fsync`s if any write completed since the last `fsync` began.
    fn sync_all(&self, held: &mut Held) -> io::Result<()> {
        if held.order.completed > held.order.synced {
            let mark = held.order.completed;
            self.inner.sync()?;
            held.order.synced = held.order.synced.max(mark);
        }
        Ok(())
    }

    /// `fsync`s if a write of the other kind completed since the last `fsync` began.
    fn sync_before(&self, held: &mut Held, kind: Kind) -> io::Result<()> {
        let order = &held.order;
        let other = match kind {
            Kind::RefcountBlock => order.last_other,
            Kind::L2Table | Kind::Other => order.last_refcount_block,
        };
        if other > order.synced {
            let mark = order.completed;
            self.inner.sync()?;
            held.order.synced = held.order.synced.max(mark);
        }
        Ok(())
    }

    fn completed(held: &mut Held, kind: Kind) {
        let order = &mut held.order;
        order.completed += 1;
        match kind {
            Kind::RefcountBlock => order.last_refcount_block = order.completed,
            Kind::L2Table | Kind::Other => order.last_other = order.completed,
        }
    }

    /// A write of `len` bytes at `offset` that is not held: `fsync`s first if the order needs
    /// it, then `write`s, then records it.
    fn ordered_write(&self, offset: u64, write: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut held = self.held();
        let kind = self.kind(&mut held, offset)?;
        self.sync_before(&mut held, kind)?;
        if kind == Kind::L2Table && !held.writes.is_empty() {
            // A table the disk names may now point at clusters that only a held refcount
            // table entry's block counts (or at an L2 table only a held L1 entry names):
            // the held entries go first, durable. imago wrote every refcount block it
            // depends on before this (its caches' order), so they are safe to release.
            self.sync_all(&mut held)?;
            self.release(&mut held)?;
            self.sync_all(&mut held)?;
        }
        drop(held);
        write()?;
        Self::completed(&mut self.held(), kind);
        Ok(())
    }

    fn overlaps(ranges: &[Range<u64>], offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        ranges.iter().any(|r| offset < r.end && r.start < end)
    }
}

impl<S: Storage> fmt::Debug for OrderedStorage<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderedStorage")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> fmt::Display for OrderedStorage<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl<S: Storage> Storage for OrderedStorage<S> {
    fn open(opts: StorageOpenOptions) -> io::Result<Self> {
        // Only used if imago opened a file by itself, which we never let it do.
        Ok(OrderedStorage {
            inner: S::open(opts)?,
            held: Mutex::new(Held::new(None)),
            helper: CommonStorageHelper::default(),
        })
    }

    fn mem_align(&self) -> usize {
        self.inner.mem_align()
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        let size = self.inner.size()?;
        let held = self.held();
        let held_end = held
            .writes
            .iter()
            .map(|(offset, bytes)| offset + bytes.len() as u64)
            .max()
            .unwrap_or(0);
        Ok(size.max(held_end))
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        self.inner.get_filename()
    }

    unsafe fn pure_readv(&self, mut bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        let held = self.held();
        let end = offset.saturating_add(len);
        let touching: Vec<(&u64, &Vec<u8>)> = held
            .writes
            .iter()
            .filter(|(o, b)| **o < end && offset < **o + b.len() as u64)
            .collect();
        if touching.is_empty() {
            drop(touching);
            drop(held);
            // SAFETY: forwarded under the caller's contract.
            return unsafe { self.inner.pure_readv(bufv, offset) };
        }
        // Rare (a table read while a write to it is held): read, then lay the held bytes over.
        let mut bounce = vec![0u8; len as usize];
        // SAFETY: forwarded under the caller's contract; `bounce` is ours.
        unsafe {
            self.inner
                .pure_readv(IoVectorMut::from(&mut bounce[..]), offset)?
        };
        for (&at, bytes) in touching {
            let from = at.max(offset);
            let to = (at + bytes.len() as u64).min(end);
            bounce[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
        }
        bufv.copy_from_slice(&bounce);
        Ok(())
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let len = bufv.len();
        let mut held = self.held();
        if offset == 0 {
            // The header: a table may be moving. Put everything held in place first, and
            // make the new table durable before the header names it.
            self.release(&mut held)?;
            self.sync_all(&mut held)?;
            if len >= 64 {
                let mut header = vec![0u8; len as usize];
                bufv.copy_into_slice(&mut header);
                held.ranges = table_ranges(&header);
                held.tables = Tables::parse(&header);
                held.named = None;
            }
            // SAFETY: forwarded under the caller's contract (the mutex serialises it with
            // the release above).
            unsafe { self.inner.pure_writev(bufv, offset)? };
            Self::completed(&mut held, Kind::Other);
            return Ok(());
        } else if Self::overlaps(&held.ranges, offset, len) {
            let mut bytes = vec![0u8; len as usize];
            bufv.copy_into_slice(&mut bytes);
            // A held write that this one overlaps differently is put in place first, so
            // that held writes never overlap each other.
            let clash = held.writes.iter().any(|(&o, b)| {
                o < offset + len
                    && offset < o + b.len() as u64
                    && (o, b.len() as u64) != (offset, len)
            });
            if clash {
                self.release(&mut held)?;
            }
            held.learn(offset, &bytes);
            held.writes.insert(offset, bytes);
            return Ok(());
        }
        drop(held);
        // SAFETY: forwarded under the caller's contract.
        self.ordered_write(offset, || unsafe { self.inner.pure_writev(bufv, offset) })
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.release_if_touched(offset, length)?;
        // SAFETY: forwarded under the caller's contract.
        self.ordered_write(offset, || unsafe {
            self.inner.pure_write_zeroes(offset, length)
        })
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.release_if_touched(offset, length)?;
        // SAFETY: forwarded under the caller's contract.
        self.ordered_write(offset, || unsafe {
            self.inner.pure_write_allocated_zeroes(offset, length)
        })
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        self.release_if_touched(offset, length)?;
        // SAFETY: forwarded under the caller's contract.
        self.ordered_write(offset, || unsafe {
            self.inner.pure_discard(offset, length)
        })
    }

    /// imago calls this after writing back its refcount and L2 caches: make those durable,
    /// then write the held table entries that point at them.
    fn flush(&self) -> io::Result<()> {
        let mut held = self.held();
        if !held.writes.is_empty() {
            self.sync_all(&mut held)?;
            self.release(&mut held)?;
        }
        drop(held);
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        let mark = self.held().order.completed;
        self.inner.sync()?;
        let mut held = self.held();
        held.order.synced = held.order.synced.max(mark);
        Ok(())
    }

    fn settle_writes(&self) -> io::Result<()> {
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        &self.helper
    }
}

impl<S: Storage> OrderedStorage<S> {
    /// Zeroing or discarding bytes that a held write covers: put the held writes in place
    /// first so the later operation wins, as it would have without holding.
    fn release_if_touched(&self, offset: u64, length: u64) -> io::Result<()> {
        let mut held = self.held();
        let end = offset.saturating_add(length);
        if held
            .writes
            .iter()
            .any(|(&o, b)| o < end && offset < o + b.len() as u64)
        {
            self.release(&mut held)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::qcow2::mem::MemStorage;

    fn header(l1_offset: u64, l1_size: u32, rt_offset: u64, rt_clusters: u32) -> Vec<u8> {
        let mut h = vec![0u8; 104];
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&rt_offset.to_be_bytes());
        h[56..60].copy_from_slice(&rt_clusters.to_be_bytes());
        h
    }

    #[test]
    fn table_ranges_come_from_the_header() {
        let ranges = table_ranges(&header(0x30000, 16, 0x10000, 1));
        assert_eq!(ranges, vec![0x30000..0x30080, 0x10000..0x20000]);
        assert!(table_ranges(&header(0, 0, 0, 0)[..30]).is_empty());
        // Overflowing ranges are dropped, not wrapped.
        assert_eq!(table_ranges(&header(u64::MAX - 4, 16, 0x10000, 1)).len(), 1);
    }

    #[test]
    fn table_writes_wait_for_flush_and_reads_see_them() {
        let (mem, state) = MemStorage::new(vec![0; 0x40000], 1 << 20);
        let file = OrderedStorage::new(mem, &header(0x30000, 16, 0x10000, 1));
        let entry = [0xAB; 8];
        // SAFETY: single-threaded test.
        unsafe {
            file.pure_writev(IoVector::from(&entry[..]), 0x30008)
                .unwrap();
            file.pure_writev(IoVector::from(&[0xCD; 16][..]), 0x20000)
                .unwrap();
        }
        assert_eq!(
            &state.data()[0x30008..0x30010],
            &[0; 8],
            "the L1 write went through"
        );
        assert_eq!(
            &state.data()[0x20000..0x20010],
            &[0xCD; 16],
            "a data write was held"
        );
        let mut back = [0u8; 32];
        // SAFETY: as above.
        unsafe {
            file.pure_readv(IoVectorMut::from(&mut back[..]), 0x30000)
                .unwrap()
        };
        assert_eq!(&back[8..16], &entry);
        assert_eq!(&back[..8], &[0; 8]);
        file.flush().unwrap();
        assert_eq!(&state.data()[0x30008..0x30010], &entry);
    }

    #[test]
    fn a_header_write_releases_held_writes_and_moves_the_ranges() {
        let (mem, state) = MemStorage::new(vec![0; 0x60000], 1 << 20);
        let file = OrderedStorage::new(mem, &header(0x30000, 16, 0x10000, 1));
        let moved = header(0x50000, 16, 0x10000, 1);
        // SAFETY: single-threaded test.
        unsafe {
            file.pure_writev(IoVector::from(&[1u8; 8][..]), 0x30000)
                .unwrap();
            file.pure_writev(IoVector::from(&moved[..]), 0).unwrap();
        }
        assert_eq!(&state.data()[0x30000..0x30008], &[1; 8]);
        // SAFETY: as above.
        unsafe {
            file.pure_writev(IoVector::from(&[2u8; 8][..]), 0x30000)
                .unwrap();
            file.pure_writev(IoVector::from(&[3u8; 8][..]), 0x50000)
                .unwrap();
        }
        assert_eq!(
            &state.data()[0x30000..0x30008],
            &[2; 8],
            "the old L1 is still held"
        );
        assert_eq!(
            &state.data()[0x50000..0x50008],
            &[0; 8],
            "the new L1 is not held"
        );
    }
}
