//! The `qcow2_open` fuzz target's body: a hostile qcow2 image in memory, opened and driven
//! with requests. It must give a clear error at open or an error for a request, never panic,
//! never grow the file past its limit, and never write into the header cluster except as a
//! whole header write at offset 0.
//!
//! Input: byte 0 (mode): bit 0 set: the rest of the input is the whole image; clear: a
//! small valid v3 image (4 KiB clusters, 1 MiB disk; [`template`]) patched by the input:
//! byte 1 = patch count, then per patch: u16 LE offset, length byte, that many bytes. Bit 1:
//! open read-only. What is left is requests, 6 bytes each: kind (read, write, discard,
//! write-zeroes, flush), u32 LE byte offset (scaled to sectors), length in sectors.

use super::{check, Qcow2Image};
use crate::block::BlockBackend;

/// Largest the in-memory file may grow to.
const LIMIT: u64 = 4 << 20;
const CLUSTER: usize = 4096;

/// A valid version 3 image: header (cluster 0), refcount table (1), refcount block (2), L1
/// table (3), with refcount 1 for those four clusters.
pub fn template() -> Vec<u8> {
    let mut image = vec![0u8; 4 * CLUSTER];
    let put32 = |image: &mut Vec<u8>, at: usize, v: u32| {
        image[at..at + 4].copy_from_slice(&v.to_be_bytes())
    };
    let put64 = |image: &mut Vec<u8>, at: usize, v: u64| {
        image[at..at + 8].copy_from_slice(&v.to_be_bytes())
    };
    image[..4].copy_from_slice(b"QFI\xfb");
    put32(&mut image, 4, 3);
    put32(&mut image, 20, 12);
    put64(&mut image, 24, 1 << 20);
    put32(&mut image, 36, 1);
    put64(&mut image, 40, 3 * CLUSTER as u64);
    put64(&mut image, 48, CLUSTER as u64);
    put32(&mut image, 56, 1);
    put32(&mut image, 96, 4);
    put32(&mut image, 100, 104);
    put64(&mut image, CLUSTER, 2 * CLUSTER as u64);
    for cluster in 0..4 {
        let at = 2 * CLUSTER + cluster * 2;
        image[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    image
}

/// Runs one input (see the module documentation).
pub fn fuzz_image(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let image = if mode & 1 != 0 {
        let image = rest.to_vec();
        rest = &[];
        image
    } else {
        let mut image = template();
        let count = rest.first().copied().unwrap_or(0);
        rest = rest.get(1..).unwrap_or(&[]);
        for _ in 0..count {
            let [lo, hi, len, ..] = *rest else { break };
            let at = usize::from(u16::from_le_bytes([lo, hi])) % image.len();
            let len = usize::from(len).min(rest.len() - 3).min(image.len() - at);
            image[at..at + len].copy_from_slice(&rest[3..3 + len]);
            rest = &rest[3 + len..];
        }
        image
    };
    let read_only = mode & 2 != 0;
    let Ok((disk, state)) = Qcow2Image::open_in_memory(image, LIMIT, read_only) else {
        return;
    };
    let size = disk.size();
    let mut buf = vec![0u8; 64 * 1024];
    for request in rest.chunks_exact(6) {
        let offset = u64::from(u32::from_le_bytes([
            request[1], request[2], request[3], request[4],
        ]));
        // A hostile header may claim a disk near 2^64 bytes.
        let offset = (offset * 512) % size.saturating_add(512);
        let len = usize::from(request[5]) * 512 % (buf.len() + 512);
        let _ = match request[0] % 5 {
            0 => disk.read_at(offset, &mut buf[..len]),
            1 => {
                buf[..len].fill(request[5]);
                disk.write_at(offset, &buf[..len])
            }
            2 => disk.discard(offset, len as u64),
            3 => disk.write_zeroes(offset, len as u64),
            _ => disk.flush(),
        };
    }
    drop(disk);
    let data = state.data();
    let cluster = match super::Layout::parse(&data) {
        Some(layout) => layout.cluster_size,
        None => return,
    };
    assert!(data.len() as u64 <= LIMIT);
    for &(offset, len) in state.writes().iter() {
        assert!(
            offset == 0 || offset >= cluster,
            "a write of {len} bytes at {offset} landed in the header cluster"
        );
    }
    assert_eq!(&data[..4], b"QFI\xfb", "the header was overwritten");
    if !read_only {
        // An image that passed the check at open passes it still: imago's allocations and the
        // guest's writes kept every cluster counted and clear of the metadata.
        let read = |offset: u64, buf: &mut [u8]| -> std::io::Result<()> {
            let at = offset as usize;
            buf.copy_from_slice(&data[at..at + buf.len()]);
            Ok(())
        };
        let size = data.len() as u64;
        if let Err(e) = check::parse_header(&data, size)
            .and_then(|fields| check::check_refcounts(&fields, size, &read))
        {
            panic!("the image was accepted at open and is now refused: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_opens_and_takes_writes() {
        let (disk, state) = Qcow2Image::open_in_memory(template(), LIMIT, false).unwrap();
        assert_eq!(disk.size(), 1 << 20);
        disk.write_at(8192, &[7; 4096]).unwrap();
        disk.flush().unwrap();
        let mut back = [0u8; 4096];
        disk.read_at(8192, &mut back).unwrap();
        assert_eq!(back, [7; 4096]);
        drop(disk);
        assert!(state.data().len() > 4 * CLUSTER, "no cluster was allocated");
    }

    #[test]
    fn an_image_without_its_first_refcount_block_is_refused_at_open() {
        let mut image = template();
        image[CLUSTER..CLUSTER + 8].fill(0);
        let err = Qcow2Image::open_in_memory(image.clone(), LIMIT, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "qcow2 \"memory.qcow2\" is refused: the header at 0x0 has no refcount block \
             (see `qemu-img check`)"
        );
        // Read-only, nothing is allocated, so the refcounts do not matter.
        let (disk, _) = Qcow2Image::open_in_memory(image, LIMIT, true).unwrap();
        disk.read_at(0, &mut [0; 4096]).unwrap();
    }

    /// The fuzz body on a fixed pseudo-random sequence, so a panic fails `cargo test`.
    #[test]
    fn random_images_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let mut input = vec![(round % 4) as u8 & 2, 6];
            for _ in 0..6 {
                let at = (next() % 16384) as u16;
                input.extend_from_slice(&at.to_le_bytes());
                input.push(4);
                input.extend_from_slice(&next().to_le_bytes()[..4]);
            }
            for _ in 0..12 {
                input.extend_from_slice(&next().to_le_bytes()[..6]);
            }
            fuzz_image(&input);
        }
        // What sent imago into unbounded recursion: no refcount block for the first clusters
        // (refcount table entry 0 zeroed), then a write that allocates.
        let mut recursion = vec![0u8, 1, 0x00, 0x10, 8];
        recursion.extend_from_slice(&[0; 8]);
        recursion.extend_from_slice(&[1, 16, 0, 0, 0, 8]);
        fuzz_image(&recursion);
        let mut whole = vec![1u8];
        whole.extend_from_slice(&template());
        whole[1 + 21] = 30;
        fuzz_image(&whole);
    }
}
