//! virtio-blk driven by the test guest's minimal driver (`test/guests/virtio_blk.c`), with
//! interrupts off. The host prepares a sparse image, the guest reads, writes, flushes,
//! write-zeroes and discards through the device, and the host checks the image afterwards:
//! contents, blocks freed by the discard, and that the file stayed sparse. The `ring3` variants
//! also take one completion interrupt end to end, waiting in ring 3 of long mode.

#[macro_use]
mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use common::{Outcome, Vm};

const IMAGE_SIZE: u64 = 4 << 20;
/// Where the guest writes 4 KiB of `i * 7 + 1` (sector 16) and zeroes 2 sectors (sector 20).
const WRITE_OFFSET: u64 = 16 * 512;
const ZERO_OFFSET: u64 = 20 * 512;
/// The 1 MiB the host fills and the guest discards.
const DISCARD_OFFSET: u64 = 1 << 20;
const DISCARD_LEN: u64 = 1 << 20;
const SECTOR0: &[u8; 8] = b"XHYVEBLK";

/// A sparse image with a marker in sector 0 and 1 MiB of data at 1 MiB, removed on drop.
struct Image {
    dir: PathBuf,
    path: PathBuf,
}

impl Image {
    fn new(name: &str) -> Image {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("virtio-blk-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let mut file = File::create(&path).unwrap();
        file.set_len(IMAGE_SIZE).unwrap();
        file.write_all(SECTOR0).unwrap();
        file.seek(SeekFrom::Start(DISCARD_OFFSET)).unwrap();
        file.write_all(&vec![0x77; DISCARD_LEN as usize]).unwrap();
        file.sync_all().unwrap();
        Image { dir, path }
    }

    fn spec(&self, options: &str) -> String {
        format!("{}{options}", self.path.display())
    }

    fn bytes(&self, offset: u64, len: u64) -> Vec<u8> {
        let mut file = File::open(&self.path).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0; len as usize];
        file.read_exact(&mut buf).unwrap();
        buf
    }

    /// Bytes of disk the file occupies.
    fn allocated(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().blocks() * 512
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vm(mode: &str, disk_spec: &str) -> Vm {
    Vm::multiboot(&format!("virtio-blk {mode}")).pci(&[
        "0:0,hostbridge",
        &format!("4,virtio-blk,{disk_spec}"),
        "31,lpc",
    ])
}

/// The GET_ID answer xhyve gives for the option string `spec` (the serial less its last
/// character, which xhyve's snprintf cuts off).
fn expected_id(spec: &str) -> String {
    let serial = xhyve::block::serial::serial_for(spec);
    String::from_utf8_lossy(&serial[..19]).into_owned()
}

/// What every read-write run must have left in the image.
fn assert_image_after_writes(image: &Image, allocated_before: u64, out: &Outcome) {
    let written = image.bytes(WRITE_OFFSET, 4096);
    for (i, &b) in written.iter().enumerate() {
        let in_zeroed =
            (ZERO_OFFSET - WRITE_OFFSET..ZERO_OFFSET - WRITE_OFFSET + 1024).contains(&(i as u64));
        let want = if in_zeroed { 0 } else { (i * 7 + 1) as u8 };
        assert_eq!(b, want, "image byte {i} of the written block\n{out}");
    }
    assert_eq!(&image.bytes(0, 8)[..], SECTOR0);
    assert!(
        image
            .bytes(DISCARD_OFFSET, DISCARD_LEN)
            .iter()
            .all(|&b| b == 0),
        "discarded range is not zero on the host"
    );
    assert_eq!(image.len(), IMAGE_SIZE, "the image changed size");
    let allocated = image.allocated();
    assert!(
        allocated + DISCARD_LEN / 2 <= allocated_before,
        "discard freed too little: {allocated_before} -> {allocated} bytes allocated"
    );
    assert!(
        allocated < IMAGE_SIZE / 4,
        "the image is no longer sparse: {allocated} bytes allocated"
    );
}

guest_test!(virtio_blk_legacy_interface_with_intx, |mode| {
    let image = Image::new(&format!("intx-{mode:?}"));
    let before = image.allocated();
    assert!(before >= DISCARD_LEN, "the host fill did not allocate");
    let spec = image.spec("");
    let out = vm("intx", &spec).irqchip(mode).run();
    out.assert_exit(1)
        .assert_line("virtio-blk capacity 8192 blk_size 512")
        .assert_line("virtio-blk seg_max 126 phys_exp 0 max_discard_seg 32 max_zeroes_seg 32")
        .assert_line("virtio-blk intx irq pending")
        .assert_line("virtio-blk isr 01")
        .assert_line(&format!("virtio-blk id {}", expected_id(&spec)))
        .assert_line("virtio-blk sector0 5848595645424c4b")
        .assert_line("virtio-blk write read back")
        .assert_line("virtio-blk flush ok")
        .assert_line("virtio-blk discard ok")
        .assert_line("virtio-blk ok");
    assert_image_after_writes(&image, before, &out);
});

guest_test!(virtio_blk_modern_interface_with_msix, |mode| {
    let image = Image::new(&format!("msix-{mode:?}"));
    let before = image.allocated();
    let spec = image.spec(",sectorsize=512/4096");
    let out = vm("msix", &spec).irqchip(mode).run();
    out.assert_exit(1)
        .assert_line("virtio-blk capacity 8192 blk_size 512")
        .assert_line("virtio-blk seg_max 126 phys_exp 3 max_discard_seg 32 max_zeroes_seg 32")
        .assert_line("virtio-blk msix pending while masked")
        .assert_line(&format!("virtio-blk id {}", expected_id(&spec)))
        .assert_line("virtio-blk write read back")
        .assert_line("virtio-blk discard ok")
        .assert_line("virtio-blk msix irq pending")
        .assert_line("virtio-blk ok");
    assert_image_after_writes(&image, before, &out);
});

guest_test!(virtio_blk_read_only_rejects_writes_with_ioerr, |mode| {
    let image = Image::new(&format!("ro-{mode:?}"));
    let before = image.bytes(0, IMAGE_SIZE);
    let allocated = image.allocated();
    let out = vm("intx ro", &image.spec(",ro")).irqchip(mode).run();
    out.assert_exit(1)
        .assert_line("virtio-blk sector0 5848595645424c4b")
        .assert_line("virtio-blk ro write ioerr")
        .assert_line("virtio-blk ro discard ioerr")
        .assert_line("virtio-blk ok");
    assert!(
        image.bytes(0, IMAGE_SIZE) == before,
        "a read-only image changed"
    );
    assert_eq!(image.allocated(), allocated);
});

guest_test!(virtio_blk_missing_or_bad_image_fails_at_start, |mode| {
    let image = Image::new(&format!("missing-{mode:?}"));
    let missing = image.dir.join("no-such.img");
    let out = vm("intx", &missing.display().to_string())
        .irqchip(mode)
        .run();
    out.assert_exit(1);
    assert!(
        out.stderr
            .contains(&format!("{:?}", missing.display().to_string())),
        "the error does not name the image\n{out}"
    );
    assert!(!out.stdout.contains("virtio-blk"), "the guest ran\n{out}");

    let out = vm("intx", &image.dir.display().to_string())
        .irqchip(mode)
        .run();
    out.assert_exit(1);
    assert!(
        out.stderr.to_lowercase().contains("is a directory"),
        "{out}"
    );

    let out = vm("intx", &format!("{},sectorsize=1000", image.path.display()))
        .irqchip(mode)
        .run();
    out.assert_exit(1);
    assert!(out.stderr.contains("sectorsize"), "{out}");
});

/// "<prefix>N" -> N.
fn number_after(out: &Outcome, prefix: &str) -> u32 {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix)?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} line\n{out}"))
}

/// After the usual run, one more read whose completion interrupt the guest takes while it
/// waits in ring 3 of long mode with interrupts on (test/guests/ring3.h): the handler ran.
fn completion_taken_in_ring3(mode: common::IrqChip, transport: &str) {
    let image = Image::new(&format!("ring3-{transport}-{mode:?}"));
    let out = vm(&format!("{transport} ring3"), &image.spec(""))
        .irqchip(mode)
        .run();
    out.assert_exit(1)
        .assert_line("virtio-blk ring3 sector0 5848595645424c4b")
        .assert_line("virtio-blk ok");
    // MSI-X: exactly one. INTx: KVM's in-kernel IOAPIC on this host may deliver the level
    // line once more before the handler masks the pin (measured 2).
    let runs = number_after(&out, "virtio-blk ring3 handler runs ");
    let expected = if transport == "msix" { 1..=1 } else { 1..=2 };
    assert!(expected.contains(&runs), "{out}");
    if transport == "intx" {
        // The device raised the line for this request (the guest cleared ISR before it).
        out.assert_line("virtio-blk ring3 isr 01");
    }
}

guest_test!(virtio_blk_intx_completion_is_taken_in_ring3, |mode| {
    completion_taken_in_ring3(mode, "intx");
});

guest_test!(virtio_blk_msix_completion_is_taken_in_ring3, |mode| {
    completion_taken_in_ring3(mode, "msix");
});
