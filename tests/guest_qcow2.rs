//! qcow2 images, made by `qemu-img`, written by the test guests (virtio-blk: test/guests/
//! virtio_blk.c; ahci: test/guests/ahci.c) through the real binary, then judged by `qemu-img`:
//! `check` finds no error, `compare` finds them identical to a raw image the same guest wrote.
//! Also: a backing file is opened read-only and never changes; discard gives blocks back;
//! `kill -9` during writes leaves no corruption and keeps every flushed write; a raw image
//! that holds a qcow2 header is still raw.
//!
//! `qemu-img` comes from Debian's qemu-utils (test/run installs it); without it these tests
//! fail when KVM tests are required (CI), and are skipped otherwise.

#[macro_use]
mod common;

use common::{IrqChip, Vm};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 4 << 20;
const SECTOR0: &[u8; 8] = b"XHYVEBLK";
/// The 1 MiB the host fills and the virtio-blk guest discards.
const DISCARD_OFFSET: u64 = 1 << 20;
const DISCARD_LEN: u64 = 1 << 20;

/// A private scratch directory under the target dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("qcow2-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_qemu_img() -> bool {
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        return true;
    }
    let required = std::env::var_os("CI").is_some()
        || std::env::var("XHYVE_REQUIRE_KVM").as_deref() == Ok("1");
    assert!(
        !required,
        "qemu-img is missing (apt-get install qemu-utils)"
    );
    eprintln!("qcow2 guest tests: qemu-img missing, skipped");
    false
}

/// Runs qemu-img; returns (exit code, stdout + stderr).
fn qemu_img_status(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn qemu_img(args: &[&str]) -> String {
    let (code, text) = qemu_img_status(args);
    assert_eq!(code, 0, "qemu-img {args:?}: {text}");
    text
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn check_clean(path: &Path) {
    let text = qemu_img(&["check", s(path)]);
    assert!(
        text.contains("No errors were found"),
        "{}: {text}",
        path.display()
    );
}

fn assert_identical(qcow2: &Path, raw: &Path) {
    let text = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(qcow2), s(raw)]);
    assert!(text.contains("Images are identical"), "{text}");
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn sha(path: &Path) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).unwrap()).to_vec()
}

/// The virtio-blk guest's starting disk: a marker in sector 0, 1 MiB of 0x77 at 1 MiB.
fn seed_raw(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    file.set_len(SIZE).unwrap();
    file.write_all(SECTOR0).unwrap();
    file.seek(SeekFrom::Start(DISCARD_OFFSET)).unwrap();
    file.write_all(&vec![0x77; DISCARD_LEN as usize]).unwrap();
    file.sync_all().unwrap();
}

fn to_qcow2(raw: &Path, qcow2: &Path, options: &str) {
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        options,
        s(raw),
        s(qcow2),
    ]);
}

fn blk_vm(words: &str, spec: &str) -> Vm {
    Vm::multiboot(&format!("virtio-blk {words}")).pci(&[
        "0:0,hostbridge",
        &format!("4,virtio-blk,{spec}"),
        "31,lpc",
    ])
}

fn run_blk_guest(mode: IrqChip, words: &str, spec: &str) {
    let out = blk_vm(words, spec).irqchip(mode).run();
    out.assert_exit(1)
        .assert_line("virtio-blk capacity 8192 blk_size 512")
        .assert_line("virtio-blk sector0 5848595645424c4b")
        .assert_line("virtio-blk write read back")
        .assert_line("virtio-blk flush ok")
        .assert_line("virtio-blk discard ok")
        .assert_line("virtio-blk ok");
}

/// The raw image the virtio-blk guest leaves behind, for `qemu-img compare`.
fn reference_raw(mode: IrqChip, dir: &Scratch) -> PathBuf {
    let raw = dir.path("reference.img");
    seed_raw(&raw);
    run_blk_guest(mode, "intx", s(&raw));
    raw
}

guest_test!(
    virtio_blk_qcow2_images_pass_qemu_img_check_and_compare,
    |mode| {
        if !have_qemu_img() {
            return;
        }
        let dir = Scratch::new(&format!("blk-{mode:?}"));
        let reference = reference_raw(mode, &dir);
        let seed = dir.path("seed.img");
        seed_raw(&seed);
        for (compat, cluster, transport) in [
            ("0.10", 65536, "intx"),
            ("1.1", 4096, "intx"),
            ("1.1", 2 << 20, "msix"),
        ] {
            let image = dir.path(&format!("disk-{compat}-{cluster}.qcow2"));
            to_qcow2(
                &seed,
                &image,
                &format!("compat={compat},cluster_size={cluster}"),
            );
            let before = allocated(&image);
            run_blk_guest(
                mode,
                transport,
                &format!("{},format=qcow2", image.display()),
            );
            check_clean(&image);
            assert_identical(&image, &reference);
            if compat == "1.1" && cluster as u64 <= DISCARD_LEN {
                // Discarded whole clusters become holes (v2 has no zero clusters: zeroes are
                // written; a 2 MiB cluster is only half discarded: zeroes are written).
                let after = allocated(&image);
                assert!(
                    after + DISCARD_LEN / 2 <= before,
                    "{compat}/{cluster}: discard freed too little: {before} -> {after}"
                );
            }
        }
    }
);

guest_test!(
    virtio_blk_qcow2_overlay_never_writes_its_backing_file,
    |mode| {
        if !have_qemu_img() {
            return;
        }
        let dir = Scratch::new(&format!("backing-{mode:?}"));
        let reference = reference_raw(mode, &dir);
        let base = dir.path("base.img");
        seed_raw(&base);
        // A chain: raw base <- v2 middle (empty) <- v3 top.
        let middle = dir.path("middle.qcow2");
        let top = dir.path("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "-b",
            "base.img",
            "-F",
            "raw",
            s(&middle),
        ]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1,cluster_size=65536",
            "-b",
            "middle.qcow2",
            "-F",
            "qcow2",
            s(&top),
        ]);
        let (base_sum, middle_sum) = (sha(&base), sha(&middle));
        run_blk_guest(mode, "intx", &format!("{},format=qcow2", top.display()));
        assert_eq!(sha(&base), base_sum, "the backing file changed");
        assert_eq!(sha(&middle), middle_sum, "the middle image changed");
        check_clean(&top);
        assert_identical(&top, &reference);
    }
);

/// The slot the stress guest writes `k` to, and what it holds: 4 KiB of the byte k with k
/// (little-endian) in its first word.
const STRESS_OFFSET: u64 = 2 << 20;
const STRESS_SLOTS: u32 = 64;

fn slot_value(disk: &[u8], slot: u32) -> Option<u32> {
    let at = (STRESS_OFFSET + u64::from(slot) * 4096) as usize;
    let block = &disk[at..at + 4096];
    let k = u32::from_le_bytes(block[..4].try_into().unwrap());
    let whole = block[4..].iter().all(|&b| b == k as u8) && k % STRESS_SLOTS == slot;
    whole.then_some(k)
}

/// Kills xhyve with SIGKILL while the guest writes and flushes, then checks the image:
/// no corruption (leaks allowed), every write before the last reported flush is there.
fn killed_mid_write(mode: IrqChip, compat: &str, with_backing: bool) {
    let dir = Scratch::new(&format!("kill-{compat}-{mode:?}"));
    let image = dir.path("disk.qcow2");
    let base = dir.path("base.img");
    seed_raw(&base);
    let base_sum = sha(&base);
    let options = format!("compat={compat},cluster_size=4096");
    if with_backing {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &options,
            "-b",
            "base.img",
            "-F",
            "raw",
            s(&image),
        ]);
    } else {
        to_qcow2(&base, &image, &options);
    }
    let mut vm = blk_vm("intx stress", &format!("{},format=qcow2", image.display()))
        .irqchip(mode)
        .spawn();
    vm.wait_for_line("virtio-blk flushed 24");
    if with_backing {
        // The backing file is open read-only in the VMM.
        let fds = std::fs::read_dir(format!("/proc/{}/fd", vm.pid())).unwrap();
        let mut seen = false;
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).ok().as_deref() == Some(base.as_path()) {
                let info = std::fs::read_to_string(format!(
                    "/proc/{}/fdinfo/{}",
                    vm.pid(),
                    fd.file_name().to_string_lossy()
                ))
                .unwrap();
                let flags = info
                    .lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                    .unwrap();
                assert_eq!(
                    flags & libc::O_ACCMODE as u32,
                    libc::O_RDONLY as u32,
                    "{info}"
                );
                seen = true;
            }
        }
        assert!(seen, "no descriptor of the backing file");
    }
    // Somewhere between two flushes, with writes in flight.
    std::thread::sleep(Duration::from_millis(70));
    vm.signal(libc::SIGKILL);
    let out = vm.finish();
    let flushed = out
        .lines()
        .filter_map(|l| l.strip_prefix("virtio-blk flushed ")?.parse::<u32>().ok())
        .max()
        .unwrap();
    let (code, text) = qemu_img_status(&["check", s(&image)]);
    // 0: clean; 3: leaked clusters only. 2 would be corruption.
    assert!(code == 0 || code == 3, "qemu-img check exit {code}: {text}");
    assert!(!text.contains("ERROR"), "{text}");
    let flat = dir.path("flat.img");
    qemu_img(&["convert", "-O", "raw", s(&image), s(&flat)]);
    let disk = std::fs::read(&flat).unwrap();
    for slot in 0..STRESS_SLOTS.min(flushed) {
        // The last write to this slot before the flush, or a later one.
        let durable = (0..flushed)
            .rev()
            .find(|k| k % STRESS_SLOTS == slot)
            .unwrap();
        let found = slot_value(&disk, slot);
        assert!(
            matches!(found, Some(k) if k >= durable),
            "slot {slot}: flushed write {durable} lost (found {found:?}); {flushed} flushed\n{out}"
        );
    }
    assert_eq!(&disk[..8], SECTOR0, "data below the writes changed");
    assert_eq!(sha(&base), base_sum, "the backing file changed");
}

guest_test!(virtio_blk_qcow2_survives_kill_9_mid_write, |mode| {
    if !have_qemu_img() {
        return;
    }
    killed_mid_write(mode, "0.10", false);
    killed_mid_write(mode, "1.1", true);
});

guest_test!(
    virtio_blk_raw_image_holding_a_qcow2_header_stays_raw,
    |mode| {
        if !have_qemu_img() {
            return;
        }
        let dir = Scratch::new(&format!("noprobe-{mode:?}"));
        let image = dir.path("disk.img");
        qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "1G"]);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(SIZE)
            .unwrap();
        // No format=: the guest sees the file's bytes (the qcow2 magic) and its size.
        let out = blk_vm("intx", s(&image)).irqchip(mode).run();
        out.assert_exit(1)
            .assert_line("virtio-blk capacity 8192 blk_size 512")
            .assert_line("virtio-blk sector0 514649fb00000003")
            .assert_line("virtio-blk ok");
        assert_eq!(std::fs::metadata(&image).unwrap().len(), SIZE);
    }
);

/// ahci-hd's test disk: LBA 1 holds bytes no zero-filled or shifted read could produce.
fn ahci_disk(path: &Path) {
    let mut image = vec![0u8; 1 << 20];
    image[..512].fill(0xEE);
    for (i, b) in image[512..1024].iter_mut().enumerate() {
        *b = (i as u32 * 13 + 0x5A) as u8;
    }
    std::fs::write(path, image).unwrap();
}

fn ahci_run(mode: IrqChip, emulation: &str, words: &str, spec: &str) -> common::Outcome {
    let out = Vm::multiboot(&format!("{emulation} {words}"))
        .pci(&["0:0,hostbridge", &format!("4,{emulation},{spec}"), "31,lpc"])
        .irqchip(mode)
        .run();
    out.assert_exit(1).assert_line("ahci ok");
    out
}

guest_test!(ahci_hd_and_cd_on_qcow2, |mode| {
    if !have_qemu_img() {
        return;
    }
    let dir = Scratch::new(&format!("ahci-{mode:?}"));
    let reference = dir.path("reference.img");
    ahci_disk(&reference);
    let seed = dir.path("seed.img");
    ahci_disk(&seed);
    let reference_out = ahci_run(mode, "ahci-hd", "intx", s(&reference));
    for compat in ["0.10", "1.1"] {
        let image = dir.path(&format!("hd-{compat}.qcow2"));
        to_qcow2(&seed, &image, &format!("compat={compat}"));
        let out = ahci_run(
            mode,
            "ahci-hd",
            "msi",
            &format!("{},format=qcow2", image.display()),
        );
        for line in reference_out.lines().filter(|l| l.starts_with("ahci-hd ")) {
            out.assert_line(line);
        }
        check_clean(&image);
        assert_identical(&image, &reference);
    }
    // A CD from a compressed qcow2 (as cloud images ship): read through zlib.
    let tree = dir.path("tree");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("hello.txt"), "hello from the iso\n").unwrap();
    let iso = dir.path("cd.iso");
    let made = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "XHYVE_AHCI_CD", "-o"])
        .arg(&iso)
        .arg(&tree)
        .output()
        .expect("xorriso is needed (test/run installs it)");
    assert!(made.status.success());
    let cd = dir.path("cd.qcow2");
    qemu_img(&["convert", "-c", "-f", "raw", "-O", "qcow2", s(&iso), s(&cd)]);
    let cd_sum = sha(&cd);
    ahci_run(
        mode,
        "ahci-cd",
        "intx",
        &format!("{},format=qcow2", cd.display()),
    )
    .assert_line("ahci-cd volume XHYVE_AHCI_CD");
    assert_eq!(sha(&cd), cd_sum, "a CD image changed");
});
