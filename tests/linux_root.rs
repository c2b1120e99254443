//! Slow tier: the xhyve-rs test kernel mounts its root file system from our disks with Linux's
//! own drivers, with no initramfs: ext2 on virtio-blk (`/dev/vda`) and on ahci-hd (`/dev/sda`),
//! iso9660 on ahci-cd (`/dev/sr0`). The kernel execs the disk's `/init` (busybox), which says
//! so and runs `reboot -f`: xhyve exits 0. For ext2 the superblock's mount count, read on the
//! host with dumpe2fs, proves the kernel mounted it read-write and wrote it back.

#[macro_use]
mod common;
mod linux_common;

use std::path::{Path, PathBuf};

use linux_common::{boot_timeout, host, test_kernel, IrqChip, Linux, Scratch};

/// What the disk's /init prints (the shell computes the number, so the script text never matches).
const ROOT_SAYS: &str = "xhyve-rs root init: 42";

/// A directory with busybox and an /init that reports and reboots.
fn root_tree(scratch: &Scratch) -> PathBuf {
    let dir = scratch.path("root");
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("dev")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static (/bin/busybox)");
    let init = dir.join("init");
    std::fs::write(
        &init,
        "#!/bin/busybox sh\n/bin/busybox echo \"xhyve-rs root init: $((40 + 2))\"\n/bin/busybox reboot -f\n",
    )
    .unwrap();
    host("chmod", &["0755", &init.display().to_string()]);
    dir
}

fn ext2_image(scratch: &Scratch) -> PathBuf {
    let tree = root_tree(scratch);
    let image = scratch.path("root.img");
    host(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext2",
            "-d",
            &tree.display().to_string(),
            &image.display().to_string(),
            "16M",
        ],
    );
    image
}

fn mount_count(image: &Path) -> u32 {
    let header = host("dumpe2fs", &["-h", &image.display().to_string()]);
    header
        .lines()
        .find_map(|l| l.strip_prefix("Mount count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no mount count in dumpe2fs output:\n{header}"))
}

/// Boots with `device` (a `-s` value) and `cmdline`; expects /init to run and reboot.
fn boot_root(kernel: &Path, device: String, cmdline: &str) {
    let mut linux = Linux::new(kernel, Path::new(""), IrqChip::Kernel);
    linux.initramfs = None;
    linux.devices = vec![device];
    linux.cmdline = cmdline.into();
    let mut vm = linux.boot();
    vm.wait_for("Run /init as init process", boot_timeout());
    vm.wait_for(ROOT_SAYS, boot_timeout());
    assert_eq!(
        vm.wait_exit(boot_timeout()),
        Some(0),
        "reboot -f: exit code"
    );
}

fn ext2_root(slot: &str, dev: &str) {
    let Some((kernel, _)) = test_kernel() else {
        return;
    };
    let scratch = Scratch::new(&format!("root-{slot}"));
    let image = ext2_image(&scratch);
    let before = mount_count(&image);
    boot_root(
        &kernel,
        format!("2,{slot},{}", image.display()),
        &format!("root={dev} rootfstype=ext2 rw init=/init"),
    );
    let after = mount_count(&image);
    assert!(after > before, "mount count {before} -> {after}");
    host("e2fsck", &["-n", &image.display().to_string()]);
}

#[test]
fn root_on_virtio_blk() {
    ext2_root("virtio-blk", "/dev/vda");
}

#[test]
fn root_on_ahci_hd() {
    ext2_root("ahci-hd", "/dev/sda");
}

#[test]
fn root_on_ahci_cd() {
    let Some((kernel, _)) = test_kernel() else {
        return;
    };
    let scratch = Scratch::new("root-cd");
    let tree = root_tree(&scratch);
    let iso = scratch.path("root.iso");
    // Rock Ridge keeps /init executable.
    host(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-o",
            &iso.display().to_string(),
            &tree.display().to_string(),
        ],
    );
    boot_root(
        &kernel,
        format!("2,ahci-cd,{}", iso.display()),
        "root=/dev/sr0 rootfstype=iso9660 ro init=/init",
    );
}
