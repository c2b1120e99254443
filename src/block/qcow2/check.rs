//! What we verify in a qcow2 image before imago may allocate in it.
//!
//! imago trusts the image's refcount structures. Given a hostile one it can recurse without
//! bound (no refcount block for the clusters the header lives in: imago places a new block
//! over the header, at offset 0, which a refcount table entry cannot name, so it looks for
//! one again, forever) or hand a cluster still in use to a new L2 table, after which guest
//! data lands in image metadata. So a writable image is checked at open the way `qemu-img
//! check` does: every header field imago relies on, every table inside the file and clear of
//! the others, every cluster that the header, the tables or an L2 entry uses covered by a
//! refcount block with a refcount no lower than its users. Leaks (refcounts higher than
//! needed) are allowed; they cost space, not safety. From an image that passes, imago's own
//! allocation and freeing keep those properties, and a guest can only write its own data
//! clusters.
//!
//! Read-only images (backing files, `ro`) never allocate, so they get the header and table
//! bounds checks only: reads through a bad L2 entry return an error or stale bytes of the
//! same file, never a crash.
//!
//! Not checked: internal snapshot tables (imago neither reads nor writes them; clusters they
//! share carry refcounts above one, which is allowed here).

use std::io;

/// Largest L1 and refcount table imago (and QEMU) accept, in entries.
pub const MAX_TABLE_ENTRIES: u64 = 4 << 20;
/// Most clusters the check keeps a use count for at once (one byte each: 128 MiB). A file
/// with more clusters (over 8 TiB with 64 KiB clusters, 512 GiB with 4 KiB, 64 GiB with
/// 512 bytes) is checked in windows of this many clusters, one pass over the tables each.
pub const CHECK_WINDOW: u64 = 1 << 27;

const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 104;
/// The one incompatible feature that we check images with: the compression type (bit 3).
/// imago refuses the others at open with a message naming them (dirty, corrupt, external
/// data file, extended L2 entries, unknown bits), and our refcount check would misread
/// them (a dirty image's refcounts are stale by design), so those are left to imago.
const CHECKED_FEATURES: u64 = 1 << 3;

const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const RT_RESERVED: u64 = 0x1ff;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Why an image is refused. Each names the field, table entry or cluster at fault.
#[derive(Debug, thiserror::Error)]
pub enum Corrupt {
    #[error("its {0} bytes are too few for a qcow2 header")]
    Short(u64),
    #[error("no qcow2 magic (QFI\\xfb) at its start")]
    Magic,
    #[error("header field {field} = {value}: {why}")]
    Header {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("{table} entry {index} = {value:#x}: {why}")]
    Entry {
        table: &'static str,
        index: u64,
        value: u64,
        why: &'static str,
    },
    #[error("{what} at {offset:#x} overlaps {other}")]
    Overlap {
        what: &'static str,
        offset: u64,
        other: &'static str,
    },
    #[error("{what} at {offset:#x} has refcount {refcount}; it is used {needed} times")]
    Refcount {
        what: &'static str,
        offset: u64,
        refcount: u64,
        needed: u64,
    },
    #[error("{what} at {offset:#x} has no refcount block")]
    Uncounted { what: &'static str, offset: u64 },
    #[error("reading {what} at {offset:#x}: {source}")]
    Read {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// The header fields the checks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fields {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_entries: u64,
    pub l1_offset: u64,
    pub rt_offset: u64,
    pub rt_clusters: u64,
    pub refcount_order: u32,
    pub incompatible: u64,
}

impl Fields {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcounts per refcount block.
    fn rb_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
}

/// A bad count or size (printed in decimal).
fn header_error(field: &'static str, value: u64, why: &'static str) -> Corrupt {
    Corrupt::Header {
        field,
        value: value.to_string(),
        why,
    }
}

/// A bad file offset (printed in hex).
fn offset_error(field: &'static str, value: u64, why: &'static str) -> Corrupt {
    Corrupt::Header {
        field,
        value: format!("{value:#x}"),
        why,
    }
}

/// The big-endian u32 at `at`, if `bytes` hold it.
pub fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        bytes.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The big-endian u64 at `at`, if `bytes` hold it.
pub fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        bytes.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Reads and checks the header fields imago relies on against a file of `file_size` bytes.
pub fn parse_header(header: &[u8], file_size: u64) -> Result<Fields, Corrupt> {
    let be32 = |at| be32(header, at);
    let be64 = |at| be64(header, at);
    let short = || Corrupt::Short(header.len().min(file_size as usize) as u64);
    if header.len() < V2_HEADER_LEN {
        return Err(short());
    }
    if header[..4] != *b"QFI\xfb" {
        return Err(Corrupt::Magic);
    }
    let version = be32(4).ok_or_else(short)?;
    if !(2..=3).contains(&version) {
        return Err(header_error("version", version.into(), "must be 2 or 3"));
    }
    let (refcount_order, incompatible) = if version == 3 {
        if header.len() < V3_HEADER_LEN {
            return Err(short());
        }
        (be32(96).ok_or_else(short)?, be64(72).ok_or_else(short)?)
    } else {
        (4, 0)
    };
    let cluster_bits = be32(20).ok_or_else(short)?;
    if !(9..=21).contains(&cluster_bits) {
        return Err(header_error(
            "cluster_bits",
            cluster_bits.into(),
            "must be 9 to 21",
        ));
    }
    if refcount_order > 6 {
        return Err(header_error(
            "refcount_order",
            refcount_order.into(),
            "must be 0 to 6",
        ));
    }
    let fields = Fields {
        version,
        cluster_bits,
        size: be64(24).ok_or_else(short)?,
        l1_entries: be32(36).ok_or_else(short)?.into(),
        l1_offset: be64(40).ok_or_else(short)?,
        rt_offset: be64(48).ok_or_else(short)?,
        rt_clusters: be32(56).ok_or_else(short)?.into(),
        refcount_order,
        incompatible,
    };
    let cluster = fields.cluster_size();
    // Each L2 table maps cluster/8 clusters; the L1 table must cover the whole disk.
    let l2_span = (cluster / 8) << cluster_bits;
    let l1_needed = fields.size.div_ceil(l2_span);
    if fields.l1_entries > MAX_TABLE_ENTRIES {
        return Err(header_error(
            "l1_size",
            fields.l1_entries,
            "more than 4 Mi entries",
        ));
    }
    if l1_needed > fields.l1_entries {
        return Err(header_error(
            "l1_size",
            fields.l1_entries,
            "too small to map the disk size",
        ));
    }
    if fields.l1_entries > 0 {
        check_table(
            "l1_table_offset",
            fields.l1_offset,
            fields.l1_entries * 8,
            cluster,
            file_size,
        )?;
    }
    if fields.rt_clusters == 0 {
        return Err(header_error(
            "refcount_table_clusters",
            0,
            "must be at least 1",
        ));
    }
    if (fields.rt_clusters << cluster_bits) / 8 > MAX_TABLE_ENTRIES {
        return Err(header_error(
            "refcount_table_clusters",
            fields.rt_clusters,
            "more than 4 Mi entries",
        ));
    }
    check_table(
        "refcount_table_offset",
        fields.rt_offset,
        fields.rt_clusters << cluster_bits,
        cluster,
        file_size,
    )?;
    if fields.l1_entries > 0 {
        let l1 = fields.l1_offset..fields.l1_offset + fields.l1_entries * 8;
        let rt = fields.rt_offset..fields.rt_offset + (fields.rt_clusters << cluster_bits);
        if l1.start < rt.end && rt.start < l1.end {
            return Err(Corrupt::Overlap {
                what: "the L1 table",
                offset: fields.l1_offset,
                other: "the refcount table",
            });
        }
    }
    Ok(fields)
}

/// A table must start on a cluster boundary after the header and end inside the file.
fn check_table(
    field: &'static str,
    offset: u64,
    len: u64,
    cluster: u64,
    file_size: u64,
) -> Result<(), Corrupt> {
    if offset % cluster != 0 {
        return Err(offset_error(field, offset, "not cluster-aligned"));
    }
    if offset == 0 {
        return Err(offset_error(
            field,
            offset,
            "the table would overlap the header",
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(offset_error(
            field,
            offset,
            "the table ends past the end of the file",
        )),
    }
}

/// What a cluster is used as, kept in the top three bits of its byte in the map; the low
/// five count its uses as data (saturating).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    Header = 1,
    L1 = 2,
    RefTable = 3,
    RefBlock = 4,
    L2 = 5,
}

impl Use {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "the header",
            2 => "the L1 table",
            3 => "the refcount table",
            4 => "a refcount block",
            5 => "an L2 table",
            _ => "a data cluster",
        }
    }
}

const DATA_MAX: u8 = 0x1f;

/// The uses of the clusters in one window of the file (every cluster's uses are counted in
/// the pass for its window; uses outside it are skipped).
struct Map {
    cluster_bits: u32,
    /// Clusters in the file.
    clusters: u64,
    /// The window's first cluster; `uses` covers the window.
    first: u64,
    uses: Vec<u8>,
}

impl Map {
    fn clusters(&self) -> u64 {
        self.clusters
    }

    fn in_window(&mut self, cluster: u64) -> Option<&mut u8> {
        let index = usize::try_from(cluster.checked_sub(self.first)?).ok()?;
        self.uses.get_mut(index)
    }

    fn metadata(&mut self, cluster: u64, what: Use) -> Result<(), Corrupt> {
        let offset = cluster << self.cluster_bits;
        let Some(byte) = self.in_window(cluster) else {
            return Ok(());
        };
        if *byte != 0 {
            let other = if *byte >> 5 != 0 {
                Use::name(*byte >> 5)
            } else {
                "a data cluster"
            };
            return Err(Corrupt::Overlap {
                what: Use::name(what as u8),
                offset,
                other,
            });
        }
        *byte = (what as u8) << 5;
        Ok(())
    }

    fn data(&mut self, cluster: u64) -> Result<(), Corrupt> {
        let offset = cluster << self.cluster_bits;
        let Some(byte) = self.in_window(cluster) else {
            return Ok(());
        };
        if *byte >> 5 != 0 {
            return Err(Corrupt::Overlap {
                what: "a data cluster",
                offset,
                other: Use::name(*byte >> 5),
            });
        }
        *byte = (*byte + 1).min(DATA_MAX);
        Ok(())
    }

    /// (how often the cluster, which is in the window, is used, what as)
    fn needed(&self, cluster: u64) -> (u64, &'static str) {
        let byte = self.uses[(cluster - self.first) as usize];
        match byte >> 5 {
            0 => (u64::from(byte), "a data cluster"),
            code => (1, Use::name(code)),
        }
    }
}

/// Reads `buf.len()` bytes of the image at an offset.
pub type ReadAt<'a> = &'a dyn Fn(u64, &mut [u8]) -> io::Result<()>;

/// The full check of a writable image (see the module documentation).
pub fn check_refcounts(fields: &Fields, file_size: u64, read: ReadAt<'_>) -> Result<(), Corrupt> {
    check_in_windows(fields, file_size, read, CHECK_WINDOW)
}

/// [`check_refcounts`], counting uses for `window` clusters per pass.
fn check_in_windows(
    fields: &Fields,
    file_size: u64,
    read: ReadAt<'_>,
    window: u64,
) -> Result<(), Corrupt> {
    if fields.incompatible & !CHECKED_FEATURES != 0 {
        return Ok(());
    }
    let clusters = file_size.div_ceil(fields.cluster_size());
    let mut first = 0;
    while first < clusters {
        let len = window.min(clusters - first);
        let mut map = Map {
            cluster_bits: fields.cluster_bits,
            clusters,
            first,
            uses: vec![0; len as usize],
        };
        check_window(fields, &mut map, read)?;
        first += len;
    }
    Ok(())
}

/// Counts the uses of the clusters in `map`'s window and compares them with their refcounts.
fn check_window(fields: &Fields, map: &mut Map, read: ReadAt<'_>) -> Result<(), Corrupt> {
    let cb = fields.cluster_bits;
    let cluster = fields.cluster_size();
    let clusters = map.clusters();
    let read_table = |what: &'static str, offset: u64, len: u64| -> Result<Vec<u8>, Corrupt> {
        let mut buf = vec![0u8; len as usize];
        read(offset, &mut buf).map_err(|source| Corrupt::Read {
            what,
            offset,
            source,
        })?;
        Ok(buf)
    };
    let entries =
        |buf: &[u8]| -> Vec<u64> { buf.chunks_exact(8).filter_map(|b| be64(b, 0)).collect() };

    map.metadata(0, Use::Header)?;
    let l1_len = fields.l1_entries * 8;
    if l1_len > 0 {
        for c in (fields.l1_offset >> cb)..=((fields.l1_offset + l1_len - 1) >> cb) {
            map.metadata(c, Use::L1)?;
        }
    }
    let rt_first = fields.rt_offset >> cb;
    for c in rt_first..rt_first + fields.rt_clusters {
        map.metadata(c, Use::RefTable)?;
    }

    // A table entry naming a cluster: aligned, inside the file.
    let cluster_of = |table: &'static str, index: u64, value: u64, offset: u64| {
        let bad = |why| Corrupt::Entry {
            table,
            index,
            value,
            why,
        };
        if offset % cluster != 0 {
            return Err(bad("not cluster-aligned"));
        }
        if offset >> cb >= clusters {
            return Err(bad("points past the end of the file"));
        }
        Ok(offset >> cb)
    };

    let reftable = entries(&read_table(
        "the refcount table",
        fields.rt_offset,
        fields.rt_clusters << cb,
    )?);
    let mut refblocks = Vec::with_capacity(reftable.len());
    for (i, &value) in reftable.iter().enumerate() {
        if value & RT_RESERVED != 0 {
            return Err(Corrupt::Entry {
                table: "refcount table",
                index: i as u64,
                value,
                why: "reserved bits set",
            });
        }
        let offset = value & !RT_RESERVED;
        if offset == 0 {
            refblocks.push(None);
            continue;
        }
        let c = cluster_of("refcount table", i as u64, value, offset)?;
        map.metadata(c, Use::RefBlock)?;
        refblocks.push(Some(offset));
    }

    let l1 = entries(&read_table("the L1 table", fields.l1_offset, l1_len)?);
    let mut l2 = vec![0u8; cluster as usize];
    for (i, &value) in l1.iter().enumerate() {
        if value & L1_RESERVED != 0 {
            return Err(Corrupt::Entry {
                table: "L1 table",
                index: i as u64,
                value,
                why: "reserved bits set",
            });
        }
        let offset = value & OFFSET_MASK;
        if offset == 0 {
            continue;
        }
        map.metadata(cluster_of("L1 table", i as u64, value, offset)?, Use::L2)?;
        read(offset, &mut l2).map_err(|source| Corrupt::Read {
            what: "an L2 table",
            offset,
            source,
        })?;
        for (j, value) in l2.chunks_exact(8).filter_map(|b| be64(b, 0)).enumerate() {
            let index = ((i as u64) << (cb - 3)) + j as u64;
            data_uses(map, fields, value, index, &cluster_of)?;
        }
    }

    // Every used cluster needs a refcount block, and a refcount no lower than its uses.
    let per_block = fields.rb_entries();
    let mut block = vec![0u8; cluster as usize];
    let window = map.first..map.first + map.uses.len() as u64;
    for range in window.start / per_block..window.end.div_ceil(per_block) {
        let block_first = range * per_block;
        let first = block_first.max(window.start);
        let last = (block_first + per_block).min(window.end);
        match refblocks.get(range as usize).copied().flatten() {
            Some(offset) => {
                read(offset, &mut block).map_err(|source| Corrupt::Read {
                    what: "a refcount block",
                    offset,
                    source,
                })?;
                for c in first..last {
                    let (needed, what) = map.needed(c);
                    let refcount = refcount_at(&block, c - block_first, fields.refcount_order);
                    if refcount < needed {
                        return Err(Corrupt::Refcount {
                            what,
                            offset: c << cb,
                            refcount,
                            needed,
                        });
                    }
                }
            }
            None => {
                if let Some(c) = (first..last).find(|&c| map.needed(c).0 > 0) {
                    return Err(Corrupt::Uncounted {
                        what: map.needed(c).1,
                        offset: c << cb,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Records the host clusters an L2 entry uses (its data cluster, a preallocated zero
/// cluster, or every cluster its compressed bytes touch).
fn data_uses(
    map: &mut Map,
    fields: &Fields,
    value: u64,
    index: u64,
    cluster_of: &dyn Fn(&'static str, u64, u64, u64) -> Result<u64, Corrupt>,
) -> Result<(), Corrupt> {
    let cb = fields.cluster_bits;
    let bad = |why| Corrupt::Entry {
        table: "L2 table",
        index,
        value,
        why,
    };
    if value & (1 << 62) != 0 {
        // Compressed: offset in the low bits, then (sectors - 1) beyond them.
        let offset_bits = 62 - (cb - 8);
        let offset = value & ((1 << offset_bits) - 1);
        let sectors = ((value >> offset_bits) & ((1 << (cb - 8)) - 1)) + 1;
        let start = offset & !511;
        let end = start + sectors * 512;
        if start == 0 {
            return Err(bad("compressed data in the header"));
        }
        if (end - 1) >> cb >= map.clusters() {
            return Err(bad("compressed data past the end of the file"));
        }
        for c in (start >> cb)..=((end - 1) >> cb) {
            map.data(c)?;
        }
        return Ok(());
    }
    if value & L2_STD_RESERVED != 0 {
        return Err(bad("reserved bits set"));
    }
    let offset = value & OFFSET_MASK;
    if offset != 0 {
        map.data(cluster_of("L2 table", index, value, offset)?)?;
    }
    Ok(())
}

/// Refcount `index` of a refcount block with 2^`order`-bit entries (below a byte, the
/// lowest bits come first, as QEMU stores them).
fn refcount_at(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let per_byte = 8 / bits;
        let byte = block[(index / per_byte) as usize];
        u64::from(byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)
    } else {
        let width = (bits / 8) as usize;
        let at = index as usize * width;
        block[at..at + width]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::qcow2::fuzz::template;

    const C: u64 = 4096;

    fn put64(image: &mut [u8], at: u64, v: u64) {
        image[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn put32(image: &mut [u8], at: u64, v: u32) {
        image[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn set_refcount(image: &mut [u8], cluster: u64, refcount: u16) {
        let at = (2 * C + cluster * 2) as usize;
        image[at..at + 2].copy_from_slice(&refcount.to_be_bytes());
    }

    fn check(image: &[u8]) -> Result<(), Corrupt> {
        let size = image.len() as u64;
        let fields = parse_header(image, size)?;
        let read = |offset: u64, buf: &mut [u8]| -> io::Result<()> {
            let src = image
                .get(offset as usize..offset as usize + buf.len())
                .ok_or_else(|| io::Error::other("past the end"))?;
            buf.copy_from_slice(src);
            Ok(())
        };
        let whole = check_refcounts(&fields, size, &read);
        // Counting in windows (one pass per window) must reach the same verdict.
        for window in [1, 3, 5] {
            let windowed = check_in_windows(&fields, size, &read, window);
            assert_eq!(
                windowed.is_ok(),
                whole.is_ok(),
                "window {window}: {windowed:?} against {whole:?}"
            );
        }
        whole
    }

    /// The template with an L2 table at cluster 4 whose first entry maps data cluster 5.
    fn with_data() -> Vec<u8> {
        let mut image = template();
        image.resize(6 * C as usize, 0);
        put64(&mut image, 3 * C, (1 << 63) | (4 * C));
        put64(&mut image, 4 * C, (1 << 63) | (5 * C));
        set_refcount(&mut image, 4, 1);
        set_refcount(&mut image, 5, 1);
        image
    }

    fn message(result: Result<(), Corrupt>) -> String {
        result.expect_err("the image was accepted").to_string()
    }

    #[test]
    fn consistent_images_pass() {
        check(&template()).unwrap();
        check(&with_data()).unwrap();
        // A leak (refcount above its uses) is allowed.
        let mut leaky = with_data();
        set_refcount(&mut leaky, 5, 3);
        check(&leaky).unwrap();
    }

    #[test]
    fn header_fields_are_bounded() {
        let cases: &[(u64, u64, bool, &str)] = &[
            (20, 22, false, "cluster_bits = 22: must be 9 to 21"),
            (96, 7, false, "refcount_order = 7"),
            (4, 4, false, "version = 4"),
            (36, 0, false, "l1_size = 0: too small"),
            (36, 5 << 20, false, "more than 4 Mi"),
            (
                40,
                3 * C + 8,
                true,
                "l1_table_offset = 0x3008: not cluster-aligned",
            ),
            (
                40,
                0,
                true,
                "l1_table_offset = 0x0: the table would overlap the header",
            ),
            (
                40,
                64 * C,
                true,
                "l1_table_offset = 0x40000: the table ends past",
            ),
            (
                48,
                100 * C,
                true,
                "refcount_table_offset = 0x64000: the table ends past",
            ),
            (
                48,
                3 * C,
                true,
                "the L1 table at 0x3000 overlaps the refcount table",
            ),
            (56, 0, false, "refcount_table_clusters = 0"),
            (
                56,
                3,
                false,
                "the L1 table at 0x3000 overlaps the refcount table",
            ),
            (
                56,
                4,
                false,
                "refcount_table_offset = 0x1000: the table ends past",
            ),
        ];
        for &(at, value, wide, want) in cases {
            let mut image = template();
            if wide {
                put64(&mut image, at, value);
            } else {
                put32(&mut image, at, value as u32);
            }
            let got = message(check(&image));
            assert!(got.contains(want), "field at {at} = {value:#x}: {got}");
        }
        assert!(message(check(&template()[..80])).contains("too few"));
        assert!(message(check(&[0; 4096])).contains("no qcow2 magic"));
    }

    #[test]
    fn a_missing_first_refcount_block_is_refused() {
        // The image that sent imago into unbounded recursion.
        let mut image = template();
        put64(&mut image, C, 0);
        assert_eq!(
            message(check(&image)),
            "the header at 0x0 has no refcount block"
        );
    }

    #[test]
    fn table_entries_must_point_inside_the_file_and_align() {
        let mut image = with_data();
        put64(&mut image, C, 2 * C + 1);
        assert!(message(check(&image)).contains("refcount table entry 0 = 0x2001: reserved"));
        put64(&mut image, C, 2 * C + 512 * 3);
        assert!(message(check(&image)).contains("entry 0 = 0x2600: not cluster-aligned"));
        put64(&mut image, C, 64 * C);
        assert!(message(check(&image)).contains("refcount table entry 0 = 0x40000: points past"));

        let mut image = with_data();
        put64(&mut image, 3 * C, 64 * C);
        assert!(message(check(&image)).contains("L1 table entry 0 = 0x40000: points past"));
        put64(&mut image, 3 * C, 4 * C + 1);
        assert!(message(check(&image)).contains("L1 table entry 0 = 0x4001: reserved"));

        let mut image = with_data();
        put64(&mut image, 4 * C + 8, 64 * C);
        assert!(message(check(&image)).contains("L2 table entry 1 = 0x40000: points past"));
        put64(&mut image, 4 * C + 8, 5 * C + 512);
        assert!(message(check(&image)).contains("L2 table entry 1 = 0x5200: not cluster"));
        put64(
            &mut image,
            4 * C + 8,
            (1 << 62) | (5 << 58) | (5 * C + 3584),
        );
        assert!(message(check(&image)).contains("compressed data past the end"));
        put64(&mut image, 4 * C + 8, (1 << 62) | 100);
        assert!(message(check(&image)).contains("compressed data in the header"));
    }

    #[test]
    fn metadata_may_not_overlap() {
        let mut image = with_data();
        // An L2 entry pointing a guest cluster at the L1 table.
        put64(&mut image, 4 * C + 8, 3 * C);
        assert_eq!(
            message(check(&image)),
            "a data cluster at 0x3000 overlaps the L1 table"
        );
        // An L2 table that is also the refcount block.
        let mut image = with_data();
        put64(&mut image, 3 * C, 2 * C);
        assert_eq!(
            message(check(&image)),
            "an L2 table at 0x2000 overlaps a refcount block"
        );
        // A second refcount block on the L1 table.
        let mut image = with_data();
        put64(&mut image, C + 8, 3 * C);
        assert_eq!(
            message(check(&image)),
            "a refcount block at 0x3000 overlaps the L1 table"
        );
    }

    #[test]
    fn refcounts_must_cover_every_use() {
        let mut image = with_data();
        set_refcount(&mut image, 5, 0);
        assert_eq!(
            message(check(&image)),
            "a data cluster at 0x5000 has refcount 0; it is used 1 times"
        );
        let mut image = with_data();
        put64(&mut image, 4 * C + 8, 5 * C);
        assert_eq!(
            message(check(&image)),
            "a data cluster at 0x5000 has refcount 1; it is used 2 times"
        );
        set_refcount(&mut image, 5, 2);
        check(&image).unwrap();
        let mut image = with_data();
        set_refcount(&mut image, 4, 0);
        assert!(message(check(&image)).contains("an L2 table at 0x4000 has refcount 0"));
    }

    #[test]
    fn narrow_refcounts_are_read_lowest_bits_first() {
        assert_eq!(refcount_at(&[0b0000_0010], 1, 0), 1);
        assert_eq!(refcount_at(&[0b0000_0010], 0, 0), 0);
        assert_eq!(refcount_at(&[0b1101_0000], 2, 1), 1);
        assert_eq!(refcount_at(&[0b1101_0000], 3, 1), 3);
        assert_eq!(refcount_at(&[0x21], 1, 2), 2);
        assert_eq!(refcount_at(&[0, 0, 1, 2], 1, 4), 0x102);
        assert_eq!(refcount_at(&[0, 0, 0, 0, 0, 0, 0, 9], 0, 6), 9);
    }
}
