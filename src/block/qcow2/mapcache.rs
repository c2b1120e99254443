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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// QEMU's default maximum on Linux (since 3.1); only the tables a guest touches are allocated.
pub const DEFAULT_SIZE: u64 = 32 << 20;

const UNKNOWN: u64 = 0;
/// Not plain data: ask imago.
const INDIRECT: u64 = 1;
/// Plain data shared with a snapshot: read here, write through imago.
const SHARED: u64 = 2;

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
    entries: Box<[u64]>,
    last_used: u64,
}

struct Tables {
    map: HashMap<u64, Table>,
    clock: u64,
}

pub struct MappingCache {
    cluster_bits: u32,
    /// log2 of the guest clusters one table maps.
    table_bits: u32,
    capacity: usize,
    tables: Mutex<Tables>,
    /// Bumped by every [`MappingCache::forget`]: a fill learnt from imago before a forget
    /// may describe the mapping the forget was for, so it is dropped.
    generation: AtomicU64,
}

impl MappingCache {
    /// A cache of `bytes` (rounded up to whole tables of one cluster each).
    pub fn new(cluster_bits: u32, bytes: u64) -> Self {
        let cluster = 1u64 << cluster_bits;
        MappingCache {
            cluster_bits,
            table_bits: cluster_bits - 3,
            capacity: bytes.div_ceil(cluster).max(1) as usize,
            tables: Mutex::new(Tables {
                map: HashMap::new(),
                clock: 0,
            }),
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
        self.capacity
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where `len` (> 0) bytes at guest `offset` are, if in one plain cluster.
    pub fn lookup(&self, offset: u64, len: u64) -> Lookup {
        let cluster = offset >> self.cluster_bits;
        if (offset + len - 1) >> self.cluster_bits != cluster {
            return Lookup::Indirect;
        }
        let mut tables = self.tables();
        tables.clock += 1;
        let clock = tables.clock;
        let Some(table) = tables.map.get_mut(&(cluster >> self.table_bits)) else {
            return Lookup::Miss(cluster);
        };
        table.last_used = clock;
        let entry = table.entries[(cluster & ((1 << self.table_bits) - 1)) as usize];
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

    /// Records that `count` clusters from guest cluster `first` are plain data from host
    /// offset `host` on (`Some((host, writable in place))`), or not plain data (`None`), as
    /// imago said after [`MappingCache::generation`] gave `generation`. Stops at the end of
    /// the table `first` is in.
    pub fn fill(&self, generation: u64, first: u64, count: u64, host: Option<(u64, bool)>) {
        let per_table = 1u64 << self.table_bits;
        let key = first >> self.table_bits;
        let start = first & (per_table - 1);
        let count = count.min(per_table - start);
        let mut tables = self.tables();
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if !tables.map.contains_key(&key) && tables.map.len() >= self.capacity {
            // Least recently used out: a scan, but only on a miss that needs a new table.
            if let Some(&old) = tables
                .map
                .iter()
                .min_by_key(|(_, t)| t.last_used)
                .map(|(k, _)| k)
            {
                tables.map.remove(&old);
            }
        }
        let clock = tables.clock;
        let table = tables.map.entry(key).or_insert_with(|| Table {
            entries: vec![UNKNOWN; per_table as usize].into_boxed_slice(),
            last_used: clock,
        });
        for i in 0..count {
            table.entries[(start + i) as usize] = match host {
                Some((host, writable)) => {
                    (host + (i << self.cluster_bits)) | if writable { 0 } else { SHARED }
                }
                None => INDIRECT,
            };
        }
    }

    /// Forgets the entries of every cluster `len` bytes at guest `offset` touch.
    pub fn forget(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        let mask = (1u64 << self.table_bits) - 1;
        let mut tables = self.tables();
        self.generation.fetch_add(1, Ordering::AcqRel);
        if last - first > (tables.map.len() as u64) << self.table_bits {
            // A huge range (a discard of the whole disk): cheaper to drop everything.
            tables.map.clear();
            return;
        }
        for cluster in first..=last {
            if let Some(table) = tables.map.get_mut(&(cluster >> self.table_bits)) {
                table.entries[(cluster & mask) as usize] = UNKNOWN;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_clusters_are_found_and_forgotten() {
        let cache = MappingCache::new(16, 1 << 20);
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
        let cache = MappingCache::new(12, 8192);
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
}
