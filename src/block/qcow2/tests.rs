//! qcow2 against images `qemu-img` made, judged by `qemu-img check` and `compare`.
//! Without `qemu-img` (Debian `qemu-utils`, which `test/run` installs) these tests fail when
//! `XHYVE_REQUIRE_QEMU_IMG=1` or CI is set, and are skipped with a message otherwise.

use super::*;
use crate::block::test_util::TempImage;
use crate::block::{open_image, ImageFormat, RawImage};
use std::os::unix::fs::MetadataExt;
use std::process::Command;

fn have_qemu_img() -> bool {
    let found = Command::new("qemu-img").arg("--version").output().is_ok();
    if !found {
        let required = std::env::var_os("CI").is_some()
            || std::env::var_os("XHYVE_REQUIRE_QEMU_IMG").is_some();
        assert!(
            !required,
            "qemu-img is missing (apt-get install qemu-utils)"
        );
        eprintln!("qcow2 tests: qemu-img missing, skipped");
    }
    found
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-img {args:?}: {text}");
    text
}

/// `qemu-img check` must find neither corruption nor leaks.
fn check_clean(path: &Path) {
    let text = qemu_img(&["check", path.to_str().unwrap()]);
    assert!(text.contains("No errors were found"), "{text}");
}

fn create(path: &Path, options: &str, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        options,
        path.to_str().unwrap(),
        size,
    ]);
}

fn open(path: &Path, extra: &str) -> Result<Qcow2Image, Qcow2Error> {
    let spec = format!("{},format=qcow2{extra}", path.display());
    Qcow2Image::open(&BlockOptions::parse(&spec).unwrap())
}

/// A pattern that differs per sector and per pass, so misplaced sectors show.
fn pattern(offset: u64, len: usize, pass: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let at = offset + i as u64;
            ((at / 512) as u8).wrapping_mul(31) ^ (at as u8) ^ pass
        })
        .collect()
}

/// The writes every format test makes: unaligned, cluster-crossing, far apart, overwrites.
fn writes(size: u64) -> Vec<(u64, usize, u8)> {
    vec![
        (0, 4096, 1),
        (512, 1024, 2),
        (65536 - 512, 8192, 3),
        (3 << 20, 1 << 20, 4),
        (size - 4096, 4096, 5),
        ((size / 2) + 512, 3 * 512, 6),
        (3 << 20, 4096, 7),
    ]
}

fn apply(disk: &dyn BlockBackend, raw: &RawImage, size: u64) {
    for (offset, len, pass) in writes(size) {
        let data = pattern(offset, len, pass);
        let mut copy = data.clone();
        disk.write_from(offset, &VolatileSlice::from(&mut copy[..]))
            .unwrap();
        raw.write_at(offset, &data).unwrap();
    }
}

#[test]
fn qemu_img_images_of_both_versions_and_cluster_sizes_stay_clean() {
    if !have_qemu_img() {
        return;
    }
    let size = 64u64 << 20;
    for compat in ["0.10", "1.1"] {
        for cluster in [4096u32, 65536, 2 << 20] {
            let raw_img = TempImage::new("q-raw", size);
            let path = raw_img.dir.join("disk.qcow2");
            create(
                &path,
                &format!("compat={compat},cluster_size={cluster}"),
                "64M",
            );
            let raw = RawImage::open(&BlockOptions::new(&raw_img.path)).unwrap();
            {
                let disk = open(&path, "").unwrap();
                assert_eq!(disk.size(), size);
                apply(&disk, &raw, size);
                disk.flush().unwrap();
                let mut back = vec![0u8; 8192];
                disk.read_at(65536 - 512, &mut back).unwrap();
                assert_eq!(back, pattern(65536 - 512, 8192, 3));
            }
            check_clean(&path);
            let text = qemu_img(&[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "raw",
                path.to_str().unwrap(),
                raw_img.path.to_str().unwrap(),
            ]);
            assert!(
                text.contains("Images are identical"),
                "{compat} {cluster}: {text}"
            );
        }
    }
}

#[test]
fn other_refcount_widths_work() {
    if !have_qemu_img() {
        return;
    }
    for bits in ["1", "8", "64"] {
        let img = TempImage::new("q-rc", 1 << 20);
        let path = img.dir.join("disk.qcow2");
        create(&path, &format!("refcount_bits={bits}"), "16M");
        {
            let disk = open(&path, "").unwrap();
            disk.write_at(1 << 20, &[0x5A; 65536 * 2]).unwrap();
            disk.flush().unwrap();
        }
        check_clean(&path);
    }
}

#[test]
fn backing_chain_is_read_and_never_written() {
    if !have_qemu_img() {
        return;
    }
    let base = TempImage::new("q-backing", 8 << 20);
    let raw = RawImage::open(&BlockOptions::new(&base.path)).unwrap();
    raw.write_at(0, &pattern(0, 1 << 20, 9)).unwrap();
    drop(raw);
    let mid = base.dir.join("mid.qcow2");
    let top = base.dir.join("top.qcow2");
    // Relative names: resolved against the naming image's directory.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk.img",
        "-F",
        "raw",
        mid.to_str().unwrap(),
    ]);
    {
        let disk = open(&mid, "").unwrap();
        disk.write_at(4096, &[0xAB; 512]).unwrap();
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    let base_before = std::fs::read(&base.path).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    {
        let disk = open(&top, "").unwrap();
        assert_eq!(disk.size(), 8 << 20);
        let mut buf = vec![0u8; 8192];
        disk.read_at(0, &mut buf).unwrap();
        let mut expected = pattern(0, 8192, 9);
        expected[4096..4608].fill(0xAB);
        assert_eq!(buf, expected);
        // A partial write copies the rest of the cluster up from the chain.
        disk.write_at(10 * 512, &[0xCD; 512]).unwrap();
        disk.write_zeroes(65536 * 2, 65536).unwrap();
        disk.discard(65536 * 3, 65536).unwrap();
        disk.flush().unwrap();
        disk.read_at(0, &mut buf).unwrap();
        expected[10 * 512..11 * 512].fill(0xCD);
        assert_eq!(buf, expected);
        let mut zero = vec![0xFFu8; 65536 * 2];
        disk.read_at(65536 * 2, &mut zero).unwrap();
        assert!(
            zero.iter().all(|&b| b == 0),
            "discard shows the backing data"
        );
    }
    assert_eq!(
        std::fs::read(&base.path).unwrap(),
        base_before,
        "base written"
    );
    assert_eq!(
        std::fs::read(&mid).unwrap(),
        mid_before,
        "middle image written"
    );
    check_clean(&top);
    check_clean(&mid);
}

#[test]
fn backing_files_are_locked_shared_and_opened_read_only() {
    if !have_qemu_img() {
        return;
    }
    let base = TempImage::new("q-ro", 1 << 20);
    let top = base.dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "disk.img",
        "-F",
        "raw",
        top.to_str().unwrap(),
    ]);
    // A read-only backing file can still be used: it is never opened for writing.
    let mut perms = std::fs::metadata(&base.path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
    std::fs::set_permissions(&base.path, perms).unwrap();
    let disk = open(&top, "").unwrap();
    // While the overlay is open nobody may write the base (shared lock) ...
    assert!(matches!(
        RawImage::open(&BlockOptions::new(&base.path)),
        Err(BlockError::Locked(_) | BlockError::Open { .. })
    ));
    // ... and a second VM may not open the overlay.
    assert!(matches!(open(&top, ""), Err(Qcow2Error::Locked(_))));
    drop(disk);
}

#[test]
fn missing_backing_format_is_refused_not_probed() {
    if !have_qemu_img() {
        return;
    }
    for compat in ["0.10", "1.1"] {
        let base = TempImage::new("q-noformat", 1 << 20);
        let top = base.dir.join("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("compat={compat}"),
            "-b",
            "disk.img",
            "-F",
            "raw",
            top.to_str().unwrap(),
        ]);
        // Turn the backing-format extension into an unknown one, as in images written before
        // qemu-img recorded the format (today's qemu-img refuses to make such an image).
        let mut bytes = std::fs::read(&top).unwrap();
        let magic = 0xE279_2ACAu32.to_be_bytes();
        let at = bytes[72..4096]
            .windows(4)
            .position(|w| w == magic)
            .expect("no backing format extension")
            + 72;
        bytes[at..at + 4].copy_from_slice(&0x7868_7976u32.to_be_bytes());
        std::fs::write(&top, &bytes).unwrap();
        let info = qemu_img(&["info", "-U", top.to_str().unwrap()]);
        assert!(!info.contains("backing file format"), "{info}");
        let err = open(&top, "").unwrap_err();
        assert!(
            matches!(err, Qcow2Error::BackingFormatMissing { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("qemu-img rebase -u"), "{err}");
    }
}

#[test]
fn version_2_discard_reads_back_zeroes() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-v2zero", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    create(&path, "compat=0.10", "8M");
    {
        let disk = open(&path, "").unwrap();
        disk.write_at(0, &[0x33; 256 << 10]).unwrap();
        disk.discard(4096, 128 << 10).unwrap();
        let mut buf = vec![0u8; 256 << 10];
        disk.read_at(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x33));
        assert!(buf[4096..4096 + (128 << 10)].iter().all(|&b| b == 0));
        assert!(buf[4096 + (128 << 10)..].iter().all(|&b| b == 0x33));
    }
    check_clean(&path);
}

#[test]
fn compressed_clusters_read_back() {
    if !have_qemu_img() {
        return;
    }
    let src = TempImage::new("q-zip", 4 << 20);
    let raw = RawImage::open(&BlockOptions::new(&src.path)).unwrap();
    // Compressible but not uniform data.
    let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i / 1000 % 7) as u8).collect();
    raw.write_at(0, &data).unwrap();
    drop(raw);
    let zipped = src.dir.join("zipped.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        src.path.to_str().unwrap(),
        zipped.to_str().unwrap(),
    ]);
    let info = qemu_img(&["check", zipped.to_str().unwrap()]);
    assert!(info.contains(" 100.00% compressed"), "{info}");
    let disk = open(&zipped, "").unwrap();
    let mut back = vec![0u8; 4 << 20];
    disk.read_at(0, &mut back).unwrap();
    assert!(back == data, "compressed data differs");
    // Overwriting part of a compressed cluster reallocates it.
    disk.write_at(1000, &[0xEE; 600]).unwrap();
    disk.flush().unwrap();
    drop(disk);
    check_clean(&zipped);
}

#[test]
fn discard_gives_blocks_back_to_the_host() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-discard", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    create(&path, "compat=1.1,cluster_size=65536", "64M");
    let disk = open(&path, "").unwrap();
    disk.write_at(0, &vec![0x77u8; 16 << 20]).unwrap();
    disk.flush().unwrap();
    let full = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(full >= 16 << 20, "{full}");
    disk.discard(0, 8 << 20).unwrap();
    disk.write_zeroes(8 << 20, 4 << 20).unwrap();
    disk.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks() * 512;
    assert!(after <= full - (11 << 20), "{full} -> {after}");
    let mut buf = vec![0xFFu8; 12 << 20];
    disk.read_at(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    drop(disk);
    check_clean(&path);
}

#[test]
fn requests_are_checked_against_the_disk_size() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-bounds", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    create(&path, "compat=1.1", "1M");
    let disk = open(&path, ",ro").unwrap();
    let mut buf = [0u8; 512];
    disk.read_at((1 << 20) - 512, &mut buf).unwrap();
    assert!(matches!(
        disk.read_at(1 << 20, &mut buf),
        Err(BlockError::OutOfRange { .. })
    ));
    assert!(matches!(disk.write_at(0, &buf), Err(BlockError::ReadOnly)));
    assert!(matches!(disk.discard(0, 512), Err(BlockError::ReadOnly)));
    assert!(disk.read_at(u64::MAX - 10, &mut buf).is_err());
}

#[test]
fn a_raw_image_holding_a_qcow2_header_stays_raw() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-noprobe", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    create(&path, "compat=1.1", "1G");
    let header = std::fs::read(&path).unwrap();
    // Without format= the file is a raw disk: its size is the file's, its first bytes the
    // qcow2 magic, as a guest that wrote them would see them.
    let options = BlockOptions::parse(&path.display().to_string()).unwrap();
    assert_eq!(options.format, ImageFormat::Raw);
    let disk = open_image(&options).unwrap();
    assert_eq!(disk.size(), header.len() as u64 / 512 * 512);
    let mut first = vec![0u8; 512];
    disk.read_to(0, &VolatileSlice::from(&mut first[..]))
        .unwrap();
    assert_eq!(&first[..4], b"QFI\xfb");
    assert_eq!(first, header[..512]);
}

#[test]
fn hostile_headers_get_clear_errors() {
    let mut header = vec![0u8; 4096];
    header[..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&3u32.to_be_bytes());
    header[20..24].copy_from_slice(&40u32.to_be_bytes()); // cluster_bits
    header[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
    header[96..100].copy_from_slice(&4u32.to_be_bytes());
    header[100..104].copy_from_slice(&104u32.to_be_bytes());
    let err = Qcow2Image::open_in_memory(header.clone(), 1 << 20, false).unwrap_err();
    assert!(err.to_string().contains("cluster_bits = 40"), "{err}");
    let err = Qcow2Image::open_in_memory(vec![0; 4096], 1 << 20, false).unwrap_err();
    assert!(
        err.to_string().starts_with("qcow2 \"memory.qcow2\""),
        "{err}"
    );
}

#[test]
fn in_memory_images_grow_only_to_their_limit() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-mem", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    create(&path, "compat=1.1,cluster_size=4096", "64M");
    let bytes = std::fs::read(&path).unwrap();
    let (disk, state) = Qcow2Image::open_in_memory(bytes, 256 << 10, false).unwrap();
    disk.write_at(0, &[1; 4096]).unwrap();
    let mut failed = false;
    for i in 1..200u64 {
        if disk.write_at(i << 20, &[2; 4096]).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "the memory file grew past its limit");
    assert!(state.data().len() <= 256 << 10);
}

/// `kill -9` between a write that needs a new L2 table (or refcount block) and the next
/// flush: the image must have leaks at worst, never an L1 or refcount table entry pointing at
/// a cluster whose refcount is 0 (what imago alone would leave; see `ordered`).
#[test]
fn a_crash_before_flush_leaves_no_corruption() {
    if !have_qemu_img() {
        return;
    }
    for compat in ["0.10", "1.1"] {
        let img = TempImage::new("q-crash", 1 << 20);
        let path = img.dir.join("disk.qcow2");
        create(&path, &format!("compat={compat},cluster_size=4096"), "256M");
        let disk = open(&path, "").unwrap();
        disk.write_at(0, &[1; 4096]).unwrap();
        disk.flush().unwrap();
        // New L2 tables (one per 2 MiB) and new refcount blocks (one per 8 MiB of clusters).
        for i in 1..40u64 {
            disk.write_at(i * (5 << 20), &[2; 4096]).unwrap();
        }
        // What a SIGKILL leaves: whatever reached the file, and no flush on the way out.
        std::mem::forget(disk);
        let out = Command::new("qemu-img")
            .args(["check", "-U", path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        // 0: clean, 3: leaks only; 2 is corruption.
        assert!(matches!(out.status.code(), Some(0 | 3)), "{compat}: {text}");
        let flat = img.dir.join("flat.img");
        qemu_img(&[
            "convert",
            "-U",
            "-O",
            "raw",
            path.to_str().unwrap(),
            flat.to_str().unwrap(),
        ]);
        let flat = std::fs::read(&flat).unwrap();
        assert!(
            flat[..4096].iter().all(|&b| b == 1),
            "{compat}: a flushed write was lost"
        );
    }
}

#[test]
fn dirty_images_are_refused_and_lazy_refcount_images_work() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-dirty", 1 << 20);
    let lazy = img.dir.join("lazy.qcow2");
    create(&lazy, "compat=1.1,lazy_refcounts=on", "16M");
    {
        // The compatible bit only allows lazy refcounts; we keep them exact.
        let disk = open(&lazy, "").unwrap();
        disk.write_at(0, &[3; 65536 * 3]).unwrap();
        disk.flush().unwrap();
    }
    check_clean(&lazy);
    let mut bytes = std::fs::read(&lazy).unwrap();
    bytes[79] |= 1; // incompatible feature bit 0: dirty
    std::fs::write(&lazy, &bytes).unwrap();
    let err = open(&lazy, "").unwrap_err().to_string();
    assert!(err.contains("dirty"), "{err}");
    assert!(err.starts_with(&format!("qcow2 {:?}", lazy)), "{err}");
}

/// `l2-cache-size=` small enough for one L2 table: requests across many tables evict each
/// other, overwrites of allocated clusters go to the file directly, and every byte reads
/// back as the raw image has it, before and after a reopen.
#[test]
fn a_one_table_mapping_cache_reads_and_writes_right() {
    if !have_qemu_img() {
        return;
    }
    let size = 64u64 << 20;
    let raw_img = TempImage::new("q-l2", size);
    let path = raw_img.dir.join("disk.qcow2");
    create(&path, "compat=1.1,cluster_size=4096", "64M");
    let raw = RawImage::open(&BlockOptions::new(&raw_img.path)).unwrap();
    let read_all = |disk: &dyn BlockBackend| {
        let mut ours = vec![0u8; 1 << 20];
        let mut theirs = vec![0u8; 1 << 20];
        for mib in 0..size >> 20 {
            // Sector by sector so that each read stays in one cluster (the direct path).
            for at in (0..ours.len()).step_by(4096) {
                let slice = VolatileSlice::from(&mut ours[at..at + 4096]);
                disk.read_to((mib << 20) + at as u64, &slice).unwrap();
            }
            raw.read_at(mib << 20, &mut theirs).unwrap();
            assert!(ours == theirs, "MiB {mib} differs");
        }
    };
    {
        let disk = open(&path, ",l2-cache-size=4k").unwrap();
        assert_eq!(disk.map.capacity(), 1);
        apply(&disk, &raw, size);
        // Rewrite what is now allocated, through the cache, in every other L2 table.
        for (offset, len, pass) in writes(size) {
            let data = pattern(offset, len, pass ^ 0x55);
            disk.write_from(offset, &VolatileSlice::from(&mut data.clone()[..]))
                .unwrap();
            raw.write_at(offset, &data).unwrap();
        }
        read_all(&disk);
        disk.discard(3 << 20, 64 << 10).unwrap();
        raw.write_at(3 << 20, &[0; 64 << 10]).unwrap();
        read_all(&disk);
    }
    check_clean(&path);
    read_all(&open(&path, ",ro,l2-cache-size=1M").unwrap());
    // The 32M default would be 8192 tables; a 64 MiB disk has only 32 to map.
    assert_eq!(
        open(&path, "").unwrap().map.capacity(),
        32,
        "one table per span"
    );
}

/// What reached the file under [`OrderedStorage`], in order.
#[derive(Debug, Clone)]
enum FileEvent {
    Write(u64, Vec<u8>),
    Sync,
}

/// A memory file that records every write (with its bytes) and every `fsync`.
#[derive(Debug)]
struct Recorder {
    file: mem::MemStorage,
    log: std::sync::Arc<std::sync::Mutex<Vec<FileEvent>>>,
    helper: imago::storage::drivers::CommonStorageHelper,
}

impl Recorder {
    fn record(&self, event: FileEvent) {
        self.log.lock().unwrap().push(event);
    }
}

impl std::fmt::Display for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.file, f)
    }
}

impl Storage for Recorder {
    fn size(&self) -> io::Result<u64> {
        self.file.size()
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.file.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        let mut bytes = vec![0u8; bufv.len() as usize];
        bufv.copy_into_slice(&mut bytes);
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.file.pure_writev(IoVector::from(&bytes[..]), offset)? };
        self.record(FileEvent::Write(offset, bytes));
        Ok(())
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        // SAFETY: forwarded under the caller's contract.
        unsafe { self.file.pure_write_zeroes(offset, length)? };
        self.record(FileEvent::Write(offset, vec![0; length as usize]));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.record(FileEvent::Sync);
        Ok(())
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        Ok(())
    }

    fn get_storage_helper(&self) -> &imago::storage::drivers::CommonStorageHelper {
        &self.helper
    }
}

/// The refcount block offsets an image's refcount table names.
fn refcount_blocks_of(image: &[u8]) -> std::collections::BTreeSet<u64> {
    let fields = check::parse_header(image, image.len() as u64).unwrap();
    let rt = check::be64(image, 48).unwrap() as usize;
    let len = (check::be32(image, 56).unwrap() as usize) * fields.cluster_size() as usize;
    image[rt..rt + len]
        .chunks(8)
        .map(|e| u64::from_be_bytes(e.try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        .filter(|&b| b != 0)
        .collect()
}

/// A power loss keeps what was synced and any part of what was written after the last
/// `fsync`. For every interval between two `fsync`s, the two worst parts (every refcount
/// block write of the interval but nothing else, and everything else but no refcount block
/// write) laid over what was synced must pass the open-time check, which refuses an image in
/// which a cluster that an L1, L2 or refcount table entry uses has a refcount below its uses.
/// The workload makes imago write both ways: allocations that evict L2 tables (refcount
/// blocks before L2 tables) and refcount blocks and grow the refcount table, flushes, then
/// discards (L2 tables before refcount blocks).
#[test]
fn every_power_loss_point_leaves_consistent_metadata() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-power", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    // 512-byte clusters: an L2 table maps 32 KiB and a refcount block 128 KiB, so a small
    // workload overflows imago's caches (128 L2 tables, 32 refcount blocks).
    create(&path, "compat=1.1,cluster_size=512", "64M");
    let initial = std::fs::read(&path).unwrap();
    let (file, state) = mem::MemStorage::new(initial.clone(), 64 << 20);
    let direct = Box::new(file.direct());
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = Recorder {
        file,
        log: std::sync::Arc::clone(&log),
        helper: Default::default(),
    };
    let storage = OrderedStorage::new(recorder, &initial);
    let qcow2 = Qcow2::<OrderedStorage<Recorder>>::open_image(storage, true).unwrap();
    let layout = Layout::parse(&initial).unwrap();
    let options = BlockOptions::new(&path);
    let disk = Qcow2Image::from_qcow2(qcow2, &path, &options, layout, Vec::new(), direct).unwrap();
    // 4 KiB in each of 1200 L2 tables' ranges: 5 MiB of clusters, over 32 refcount blocks,
    // and the refcount table grows.
    for i in 0..1200u64 {
        disk.write_at(i * (48 << 10), &[i as u8 | 1; 4096]).unwrap();
    }
    disk.flush().unwrap();
    // New clusters mapped by L2 tables the disk already names, in refcount blocks that
    // only held refcount table entries name.
    for i in 0..1200u64 {
        disk.write_at(i * (48 << 10) + (8 << 10), &[3; 4096])
            .unwrap();
    }
    disk.flush().unwrap();
    for i in (0..1200u64).step_by(3) {
        disk.discard(i * (48 << 10), 4096).unwrap();
        disk.write_at(i * (48 << 10) + (16 << 10), &[7; 1024])
            .unwrap();
    }
    disk.flush().unwrap();
    drop(disk);

    let log = std::mem::take(&mut *log.lock().unwrap());
    let apply = |image: &mut Vec<u8>, offset: u64, bytes: &[u8]| {
        let end = offset as usize + bytes.len();
        if image.len() < end {
            image.resize(end, 0);
        }
        image[offset as usize..end].copy_from_slice(bytes);
    };
    let check = |image: &[u8], what: &str, interval: usize| {
        let read = |offset: u64, buf: &mut [u8]| -> io::Result<()> {
            let src = image
                .get(offset as usize..offset as usize + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        };
        let header = &image[..image.len().min(4096)];
        if let Err(e) = check_image(&path, header, image.len() as u64, &read, true) {
            panic!("a power loss in interval {interval} keeping {what}: {e}");
        }
    };
    // A refcount block write: one to a cluster that the refcount table names, as written
    // so far or at the end.
    let last_blocks = refcount_blocks_of(&state.data());
    let mut latest = initial.clone();
    let mut blocks = refcount_blocks_of(&latest);
    let rt_range = |image: &[u8]| {
        let start = check::be64(image, 48).unwrap();
        start..start + (u64::from(check::be32(image, 56).unwrap()) << 9)
    };
    let mut durable = initial;
    let (mut intervals, mut with_blocks) = (0, 0);
    let mut pending: Vec<(u64, Vec<u8>, bool)> = Vec::new();
    for event in log.into_iter().chain([FileEvent::Sync]) {
        match event {
            FileEvent::Write(offset, bytes) => {
                let cluster = offset & !511;
                let is_block = blocks.contains(&cluster) || last_blocks.contains(&cluster);
                apply(&mut latest, offset, &bytes);
                let rt = rt_range(&latest);
                if offset == 0 || (offset < rt.end && rt.start < offset + bytes.len() as u64) {
                    blocks.extend(refcount_blocks_of(&latest));
                }
                pending.push((offset, bytes, is_block));
            }
            FileEvent::Sync => {
                intervals += 1;
                let kinds = (pending.iter().any(|w| w.2), pending.iter().any(|w| !w.2));
                with_blocks += usize::from(kinds.0);
                if kinds == (true, true) {
                    // Blocks the held refcount table entries name, written with other writes
                    // (the wrapper counts them as refcount blocks, the file does not yet):
                    // the worst parts must be consistent too.
                    for (blocks_only, what) in [(true, "refcount blocks"), (false, "the rest")] {
                        let mut image = durable.clone();
                        for (offset, bytes, _) in pending.iter().filter(|w| w.2 == blocks_only) {
                            apply(&mut image, *offset, bytes);
                        }
                        check(&image, what, intervals);
                    }
                }
                for (offset, bytes, _) in pending.drain(..) {
                    apply(&mut durable, offset, &bytes);
                }
                // A power loss right after this `fsync`.
                check(&durable, "all of it", intervals);
            }
        }
    }
    assert!(intervals > 1000, "only {intervals} fsync intervals");
    assert!(
        with_blocks > 100,
        "refcount blocks written in {with_blocks} intervals"
    );
}

/// A memory file whose first read through the mapping cache stops, lets another thread run
/// (over `go`/`done`), then reads.
struct PausingRead {
    file: mem::MemStorage,
    pause: Pause,
}

type Pause = std::sync::Arc<
    std::sync::Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
>;

impl DirectIo for PausingRead {
    fn read_to(&self, host: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        if let Some((go, done)) = self.pause.lock().unwrap().take() {
            go.send(()).unwrap();
            done.recv().unwrap();
        }
        self.file.read_to(host, buf)
    }

    fn write_from(&self, host: u64, buf: &VolatileSlice<'_>) -> io::Result<()> {
        self.file.write_from(host, buf)
    }
}

/// Reads take no lock: one that found cluster A in the mapping cache, then lost the race to
/// a discard of A and a write of B that reused A's freed cluster, must not return B's bytes.
#[test]
fn an_unlocked_read_overtaken_by_a_discard_goes_again() {
    if !have_qemu_img() {
        return;
    }
    let img = TempImage::new("q-race", 1 << 20);
    let path = img.dir.join("disk.qcow2");
    create(&path, "compat=1.1,cluster_size=4096", "1M");
    let initial = std::fs::read(&path).unwrap();
    let (file, _state) = mem::MemStorage::new(initial.clone(), 8 << 20);
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pause = Pause::default();
    let direct = Box::new(PausingRead {
        file: file.direct(),
        pause: std::sync::Arc::clone(&pause),
    });
    let storage = OrderedStorage::new(file, &initial);
    let qcow2 = Qcow2::<OrderedStorage<mem::MemStorage>>::open_image(storage, true).unwrap();
    let layout = Layout::parse(&initial).unwrap();
    let options = BlockOptions::new(&path);
    let disk = Qcow2Image::from_qcow2(qcow2, &path, &options, layout, Vec::new(), direct).unwrap();
    let (a, b) = (0u64, 64 << 10);
    disk.write_at(a, &[0xA1; 4096]).unwrap();
    let mut buf = [0u8; 4096];
    // Fills the mapping cache: A is plain data.
    disk.read_at(a, &mut buf).unwrap();
    pause.lock().unwrap().replace((go_tx, done_rx));
    let disk = &disk;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            go_rx.recv().unwrap();
            disk.discard(a, 4096).unwrap();
            disk.write_at(b, &[0xB2; 4096]).unwrap();
            done_tx.send(()).unwrap();
        });
        disk.read_at(a, &mut buf).unwrap();
    });
    assert!(
        buf.iter().all(|&x| x == 0),
        "read A after its discard: {:#x}",
        buf[0]
    );
    let mut back = [0u8; 4096];
    disk.read_at(b, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0xB2));
}
