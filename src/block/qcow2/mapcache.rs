//! Our L2 cache: guest cluster -> host cluster, for clusters whose data sits plainly in the
//! image file, sized by `l2-cache-size=`.
//!
//! imago 0.2.6 keeps its own cache of 128 L2 tables and 32 refcount blocks, fixed (nothing in
//! its API sizes it). So the L2 cache that the option sizes is this one, above imago: a
//! request whose clusters are all plain data (allocated, not compressed, not zero, not in a
//! backing file) is looked up here and goes straight to the file with `pread`/`pwrite`; any
//! other goes through imago, as does a lookup that misses, which then fills the entries it
//! learnt. Its size counts what QEMU's option counts: 8 bytes per cluster of guest disk, in
//! whole L2 tables (one cluster each) that are allocated as the guest touches them.
//!
//! Why it stays right: a guest cluster's mapping changes only when imago allocates for it (a
//! write to a cluster that is not plain data, which goes through imago, after which its
//! entries here are forgotten) or frees it (discard and write-zeroes, which forget their
//! range while holding the image exclusively). A plain cluster with refcount 1 (QEMU's
//! "copied" flag) is written in place by imago too, so writing it here is what imago would
//! do; one shared with a snapshot is read here but written through imago, which copies it.
//!
//! Lookups take no lock and write nothing shared (they are on every request's path, from
//! every queue's thread): a directory with one slot per table span of the disk names the table
//! that holds that span, if any, and a table's entries are atomics that fill and forget update
//! in place. Only giving a table a new span (evicting the one it held) needs more: it is done
//! under the mutex, inside the table's sequence count (odd while it is rewritten), and a lookup
//! that saw the count change or go odd around its read treats the entry as a miss. Tables are
//! never freed while the cache lives, so a lookup never reads freed memory; eviction is the
//! CLOCK approximation of least-recently-used: a lookup sets its table's "referenced" flag if
//! it is not set already, and the eviction hand passes over (and clears) flagged tables.
//!
//! Memory: the tables, at most the `l2-cache-size=` bytes (allocated as they are first
//! needed), plus the directory, 4 bytes per table span of disk (half what the image's L1
//! table costs: 8 KiB for a 1 TiB disk with 64 KiB clusters).

use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// QEMU's default maximum on Linux (since 3.1); only the tables a guest touches are allocated.
pub const DEFAULT_SIZE: u64 = 32 << 20;

const UNKNOWN: u64 = 0;
/// Not plain data: ask imago.
const INDIRECT: u64 = 1;
/// Plain data shared with a snapshot: read here, write through imago.
const SHARED: u64 = 2;
/// A directory slot with no table.
const NO_TABLE: u32 = 0;
/// A table that holds no span yet.
const NO_SPAN: u64 = u64::MAX;

/// Where a guest range's data is, as far as the cache knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The range is in one plain data cluster: the host offset of its first byte, and
    /// whether the cluster may be written in place.
    Plain { host: u64, writable: bool },
    /// The cluster is not plain data, or the range crosses into another cluster.
    Indirect,
    /// The first cluster whose entry is missing.
    Miss(u64),
}

struct Table {
    /// Odd while the table is given a new span; bumped twice per change of span.
    sequence: AtomicU64,
    /// The table span (guest cluster >> table_bits) these entries map.
    span: AtomicU64,
    /// Set by lookups, cleared by the eviction hand passing.
    referenced: AtomicBool,
    entries: Box<[AtomicU64]>,
}

/// What only the mutex holder touches.
struct Clock {
    /// Tables allocated so far (a prefix of `MappingCache::tables`).
    used: usize,
    /// The next table the eviction hand looks at.
    hand: usize,
}

pub struct MappingCache {
    cluster_bits: u32,
    /// log2 of the guest clusters one table maps.
    table_bits: u32,
    /// Per table span of the disk: 1 + the index in `tables` of the table holding it, or
    /// `NO_TABLE`.
    directory: Box<[AtomicU32]>,
    /// `capacity` places, filled in order as tables are first needed, never emptied.
    tables: Box<[OnceLock<Table>]>,
    /// Held by fill and forget (lookups never take it).
    clock: Mutex<Clock>,
    /// Bumped by every [`MappingCache::forget`]: a fill learnt from imago before a forget
    /// may describe the mapping the forget was for, so it is dropped.
    generation: AtomicU64,
}

impl MappingCache {
    /// A cache of `bytes` (rounded up to whole tables of one cluster each) for a disk of
    /// `disk_size` bytes.
    pub fn new(cluster_bits: u32, bytes: u64, disk_size: u64) -> Self {
        let cluster = 1u64 << cluster_bits;
        let table_bits = cluster_bits - 3;
        let span = 1u64 << (table_bits + cluster_bits);
        // imago refuses an L1 table of more than 4 Mi entries (one per span), so the
        // directory stays below 16 MiB whatever the header says.
        let spans = disk_size.div_ceil(span).min(1 << 22) as usize;
        // More tables than spans could never be used.
        let capacity = (bytes.div_ceil(cluster).max(1) as usize).min(spans.max(1));
        MappingCache {
            cluster_bits,
            table_bits,
            directory: (0..spans).map(|_| AtomicU32::new(NO_TABLE)).collect(),
            tables: (0..capacity).map(|_| OnceLock::new()).collect(),
            clock: Mutex::new(Clock { used: 0, hand: 0 }),
            generation: AtomicU64::new(0),
        }
    }

    /// Take before asking imago for a mapping; give to [`MappingCache::fill`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Guest bytes one table maps.
    pub fn table_span(&self) -> u64 {
        1 << (self.table_bits + self.cluster_bits)
    }

    /// Tables it may hold.
    pub fn capacity(&self) -> usize {
        self.tables.len()
    }

    fn clock(&self) -> std::sync::MutexGuard<'_, Clock> {
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The table holding `span`, if any (it may be mid-change: see [`MappingCache::lookup`]).
    fn table_of(&self, span: u64) -> Option<&Table> {
        let slot = self.directory.get(usize::try_from(span).ok()?)?;
        let index = slot.load(Ordering::Acquire).checked_sub(1)?;
        self.tables.get(index as usize)?.get()
    }

    /// A sequence lock's read side, first half: the table holding `span` and its (even)
    /// sequence count.
    fn begin_read(&self, span: u64) -> Option<(&Table, u64)> {
        let table = self.table_of(span)?;
        let before = table.sequence.load(Ordering::Acquire);
        (before & 1 == 0 && table.span.load(Ordering::Relaxed) == span).then_some((table, before))
    }

    /// Second half: entry `index`, if the table held the span throughout (its sequence
    /// count unchanged since [`MappingCache::begin_read`]).
    fn end_read(table: &Table, before: u64, index: usize) -> Option<u64> {
        let entry = table.entries[index].load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if table.sequence.load(Ordering::Relaxed) != before {
            return None;
        }
        if !table.referenced.load(Ordering::Relaxed) {
            table.referenced.store(true, Ordering::Relaxed);
        }
        Some(entry)
    }

    /// Where `len` (> 0) bytes at guest `offset` are, if in one plain cluster.
    pub fn lookup(&self, offset: u64, len: u64) -> Lookup {
        let cluster = offset >> self.cluster_bits;
        if offset.saturating_add(len.max(1) - 1) >> self.cluster_bits != cluster {
            return Lookup::Indirect;
        }
        let span = cluster >> self.table_bits;
        let Some((table, before)) = self.begin_read(span) else {
            return Lookup::Miss(cluster);
        };
        let index = (cluster & ((1 << self.table_bits) - 1)) as usize;
        let Some(entry) = Self::end_read(table, before, index) else {
            return Lookup::Miss(cluster);
        };
        let in_cluster = offset & ((1 << self.cluster_bits) - 1);
        match entry {
            UNKNOWN => Lookup::Miss(cluster),
            INDIRECT => Lookup::Indirect,
            host => Lookup::Plain {
                host: (host & !SHARED) + in_cluster,
                writable: host & SHARED == 0,
            },
        }
    }

    /// The table for `span`, giving it one (a new table while under capacity, else the one
    /// the eviction hand picks) if it has none. None if the span is outside the disk.
    fn table_for(&self, clock: &mut Clock, span: u64) -> Option<&Table> {
        let slot = self.directory.get(usize::try_from(span).ok()?)?;
        if let Some(table) = self.table_of(span) {
            return Some(table);
        }
        let per_table = 1usize << self.table_bits;
        let index = if clock.used < self.tables.len() {
            let index = clock.used;
            clock.used += 1;
            index
        } else {
            // CLOCK: a table referenced since the hand last passed gets another round (but
            // only one: lookups on other threads may keep setting the flags).
            let mut passed = 0;
            loop {
                let index = clock.hand;
                clock.hand = (clock.hand + 1) % clock.used;
                let table = self.tables[index].get()?;
                if !table.referenced.swap(false, Ordering::Relaxed) || passed > clock.used {
                    break index;
                }
                passed += 1;
            }
        };
        let table = self.tables[index].get_or_init(|| Table {
            sequence: AtomicU64::new(0),
            span: AtomicU64::new(NO_SPAN),
            referenced: AtomicBool::new(false),
            entries: (0..per_table).map(|_| AtomicU64::new(UNKNOWN)).collect(),
        });
        let old = table.span.load(Ordering::Relaxed);
        if let Some(old_slot) = usize::try_from(old)
            .ok()
            .and_then(|o| self.directory.get(o))
        {
            old_slot.store(NO_TABLE, Ordering::Relaxed);
        }
        // The write side of the sequence lock (only the mutex holder writes).
        let sequence = table.sequence.load(Ordering::Relaxed);
        table.sequence.store(sequence + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        table.span.store(span, Ordering::Relaxed);
        for entry in table.entries.iter() {
            entry.store(UNKNOWN, Ordering::Relaxed);
        }
        table.referenced.store(false, Ordering::Relaxed);
        table.sequence.store(sequence + 2, Ordering::Release);
        slot.store(index as u32 + 1, Ordering::Release);
        Some(table)
    }

    /// Records that `count` clusters from guest cluster `first` are plain data from host
    /// offset `host` on (`Some((host, writable in place))`), or not plain data (`None`), as
    /// imago said after [`MappingCache::generation`] gave `generation`. Stops at the end of
    /// the table `first` is in.
    pub fn fill(&self, generation: u64, first: u64, count: u64, host: Option<(u64, bool)>) {
        let per_table = 1u64 << self.table_bits;
        let start = first & (per_table - 1);
        let count = count.min(per_table - start);
        let mut clock = self.clock();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        let Some(table) = self.table_for(&mut clock, first >> self.table_bits) else {
            return;
        };
        for i in 0..count {
            let entry = match host {
                Some((host, writable)) => {
                    (host + (i << self.cluster_bits)) | if writable { 0 } else { SHARED }
                }
                None => INDIRECT,
            };
            table.entries[(start + i) as usize].store(entry, Ordering::Relaxed);
        }
    }

    /// Forgets the entries of every cluster `len` bytes at guest `offset` touch.
    pub fn forget(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len - 1) >> self.cluster_bits;
        let mask = (1u64 << self.table_bits) - 1;
        let clock = self.clock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let (first_span, last_span) = (first >> self.table_bits, last >> self.table_bits);
        let forget_in = |span: u64, table: &Table| {
            let from = if span == first_span { first & mask } else { 0 };
            let to = if span == last_span { last & mask } else { mask };
            for entry in &table.entries[from as usize..=to as usize] {
                entry.store(UNKNOWN, Ordering::Relaxed);
            }
        };
        if last_span - first_span < clock.used as u64 {
            for span in first_span..=last_span {
                if let Some(table) = self.table_of(span) {
                    forget_in(span, table);
                }
            }
        } else {
            // A range wider than the tables held (a discard of the whole disk): visit the
            // tables instead of the spans.
            for table in self.tables[..clock.used].iter().filter_map(OnceLock::get) {
                let span = table.span.load(Ordering::Relaxed);
                if (first_span..=last_span).contains(&span) {
                    forget_in(span, table);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_clusters_are_found_and_forgotten() {
        let cache = MappingCache::new(16, 1 << 20, 1 << 40);
        assert_eq!(cache.capacity(), 16);
        assert_eq!(cache.lookup(0x1_0000, 4096), Lookup::Miss(1));
        cache.fill(cache.generation(), 1, 3, Some((0x50_0000, true)));
        assert_eq!(
            cache.lookup(0x2_0200, 512),
            Lookup::Plain {
                host: 0x51_0200,
                writable: true
            }
        );
        assert_eq!(
            cache.lookup(0x0_f000, 8192),
            Lookup::Indirect,
            "crosses a cluster"
        );
        cache.fill(cache.generation(), 4, 1, None);
        assert_eq!(cache.lookup(0x4_0000, 512), Lookup::Indirect);
        cache.fill(cache.generation(), 5, 1, Some((0x90_0000, false)));
        assert_eq!(
            cache.lookup(0x5_0000, 512),
            Lookup::Plain {
                host: 0x90_0000,
                writable: false
            }
        );
        cache.forget(0x2_ffff, 2);
        assert_eq!(cache.lookup(0x2_0000, 512), Lookup::Miss(2));
        assert_eq!(cache.lookup(0x3_0000, 512), Lookup::Miss(3));
        assert!(matches!(cache.lookup(0x1_0000, 512), Lookup::Plain { .. }));
        // What imago said before a forget is not recorded after it.
        let before = cache.generation();
        cache.forget(0x6_0000, 1);
        cache.fill(before, 6, 1, Some((0xa0_0000, true)));
        assert_eq!(cache.lookup(0x6_0000, 512), Lookup::Miss(6));
    }

    #[test]
    fn fills_stop_at_their_table_and_the_oldest_table_goes_first() {
        // 4 KiB clusters: 512 clusters per table, room for two tables.
        let cache = MappingCache::new(12, 8192, 1 << 30);
        cache.fill(cache.generation(), 510, 10, Some((0x10_0000, true)));
        assert!(matches!(cache.lookup(511 << 12, 512), Lookup::Plain { .. }));
        assert_eq!(cache.lookup(512 << 12, 512), Lookup::Miss(512));
        cache.fill(cache.generation(), 512, 1, None);
        cache.lookup(0, 512);
        cache.fill(cache.generation(), 1024, 1, None);
        // Table 1 (cluster 512) was used least recently.
        assert_eq!(cache.lookup(512 << 12, 512), Lookup::Miss(512));
        assert!(matches!(cache.lookup(510 << 12, 512), Lookup::Plain { .. }));
        assert_eq!(cache.lookup(1024 << 12, 512), Lookup::Indirect);
    }

    #[test]
    fn a_whole_disk_forget_and_spans_outside_the_disk() {
        // 4 KiB clusters (2 MiB per table), 8 MiB disk, room for 3 tables.
        let cache = MappingCache::new(12, 3 * 4096, 8 << 20);
        for span in 0..3u64 {
            cache.fill(cache.generation(), span << 9, 512, Some((span << 30, true)));
        }
        assert!(matches!(cache.lookup(2 << 21, 512), Lookup::Plain { .. }));
        cache.forget(0, u64::MAX >> 1);
        for span in 0..3u64 {
            assert_eq!(cache.lookup(span << 21, 512), Lookup::Miss(span << 9));
        }
        // Beyond the disk: no table, no panic.
        cache.fill(cache.generation(), 4 << 9, 1, Some((0x1000, true)));
        assert_eq!(cache.lookup(4 << 21, 512), Lookup::Miss(4 << 9));
        assert_eq!(
            cache.lookup(u64::MAX - 511, 512),
            Lookup::Miss(u64::MAX >> 12)
        );
    }

    /// A lookup that found its table just before the table was given another span (and
    /// filled for it) reads a miss, not the other span's entry.
    #[test]
    fn a_lookup_overtaken_by_an_eviction_misses() {
        // 4 KiB clusters, one table.
        let cache = MappingCache::new(12, 4096, 64 << 20);
        cache.fill(cache.generation(), 0, 512, Some((0x10_0000, true)));
        let (table, before) = cache.begin_read(0).expect("span 0 is held");
        cache.fill(cache.generation(), 512, 512, Some((0x90_0000, true)));
        assert_eq!(MappingCache::end_read(table, before, 3), None);
        assert!(cache.begin_read(0).is_none(), "span 0 lost its table");
        let (table, before) = cache.begin_read(1).expect("span 1 is held");
        assert_eq!(
            MappingCache::end_read(table, before, 3),
            Some(0x90_0000 + (3 << 12))
        );
    }

    /// Lookups racing with tables changing span never see another span's entries.
    #[test]
    fn lookups_racing_evictions_see_only_their_own_span() {
        use std::sync::atomic::AtomicBool;
        // 4 KiB clusters, two tables for 64 spans: nearly every fill evicts.
        let cache = MappingCache::new(12, 2 * 4096, 128 << 20);
        // Each cluster's (made-up) host offset names its cluster.
        let host_of = |cluster: u64| (cluster + 1) << 12;
        let stop = AtomicBool::new(false);
        let plain_seen = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for seed in 1..=2u64 {
                let (cache, stop, plain_seen) = (&cache, &stop, &plain_seen);
                scope.spawn(move || {
                    let mut state = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(seed);
                    while !stop.load(Ordering::Relaxed) {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        let cluster = state % (64 << 9);
                        if let Lookup::Plain { host, .. } = cache.lookup(cluster << 12, 4096) {
                            assert_eq!(host, host_of(cluster), "cluster {cluster}");
                            plain_seen.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
            for round in 0..2000u64 {
                let span = (round * 7) % 64;
                let first = span << 9;
                cache.fill(cache.generation(), first, 512, Some((host_of(first), true)));
            }
            stop.store(true, Ordering::Relaxed);
        });
        assert!(plain_seen.load(Ordering::Relaxed) > 0, "no lookup ever hit");
    }
}
