//! Slow tier: issue 14's proof through a real Linux guest. The xhyve-rs test kernel drives our
//! virtio-9p, virtio-fs and virtio-sock devices with Linux's own drivers (9p, virtiofs,
//! vsock), through the real binary. Three boots:
//!
//! - **kernel mode, 9p root** and **kernel mode, virtiofs root**: no initramfs; a share made
//!   here holds the test initramfs's busybox tree and an `/init`, and the kernel mounts it as
//!   its root (`root=TAG rootfstype=9p rootflags=trans=virtio,...` / `rootfstype=virtiofs`),
//!   execs `/init` from it, and `/init` runs the file operations of [`OPS`] on `/`;
//! - **user space**: the normal initramfs with both shares and a vsock device; the shell mounts
//!   the 9p share on /mnt/a and the virtiofs share on /mnt/b, runs [`OPS`] on each, sees
//!   changes the host makes while they are mounted, times 16 MiB `dd`s, and echoes over vsock
//!   both ways through the Unix sockets in `path=DIR`.
//!
//! After each run of [`OPS`] the host checks what the guest did: contents, a rename across
//! directories, hard and symbolic links, mode, times, truncation, deletions, a copy byte for
//! byte. The guest-side figures (dd throughput, boot times) are printed as information: the
//! guest kernel is emulated here, so they measure the host's emulator, not the devices.
//!
//! Wall time: about 3 minutes (174 s at 16:25 UTC on a shared machine: the user-space boot
//! beside the two kernel-mode boots, 55 s each). Budget: 4 minutes.

#[macro_use]
mod common;
mod linux_common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use linux_common::{
    boot_timeout, test_kernel, unpack_newc, IrqChip, Linux, Scratch, COMMAND_TIMEOUT, PROMPT,
};

const TAG_9P: &str = "share9p";
const TAG_FS: &str = "sharefs";
/// 9p's msize (the largest message); the kernel clamps it to what its virtio transport can
/// carry and /proc/mounts shows the result.
const MSIZE: u32 = 512 * 1024;
/// The guest's vsock CID.
const GUEST_CID: u32 = 3;

/// The guest's half: file operations on the shared folder `$1`, one `SFTEST: NAME: OUTPUT` line
/// each (`NAME: FAILED ...` when a command fails). [`check_ops`] holds the expected outputs and
/// [`check_host_view`] what the host must then see.
///
/// Written for a guest whose kernel is emulated: a fork costs about 0.3 s here and an exec
/// about 1 s, so steps run in the current shell (output through a file in /tmp, which is
/// tmpfs), files are read with the `read` builtin rather than `cat`, and only applets that
/// busybox runs without an exec are used.
const OPS: &str = r#"#!/bin/sh
# Written by tests/linux_sharedfs.rs into each share: the guest runs it on the mounted share.
d=${1%/}
# The first line of a file, read by the shell itself.
line() { l=; IFS= read -r l < "$1" || [ -n "$l" ]; r=$?; echo "$l"; return $r; }
step() {
	if eval "$2" >/tmp/sftest.out 2>&1; then r=; else r="FAILED "; fi
	out=; while IFS= read -r l || [ -n "$l" ]; do out="$out${out:+ }$l"; done </tmp/sftest.out
	echo "SFTEST: $1: $r$out"
}
step read 'line $d/hello.txt'
step list 'cd $d/dir && echo * && cd /'
step write 'echo written by the guest > $d/guest.txt && line $d/guest.txt'
step append 'echo second line >> $d/guest.txt && n=0 && while read -r l; do n=$((n+1)); done < $d/guest.txt && echo $n'
step mkdir 'mkdir $d/d1 $d/d2 $d/empty && echo moved > $d/d1/f && [ -d $d/d2 ] && line $d/d1/f'
step rename 'mv $d/d1/f $d/d2/g && [ ! -e $d/d1/f ] && line $d/d2/g'
step replace 'echo new > $d/r1 && echo old > $d/r2 && mv $d/r1 $d/r2 && [ ! -e $d/r1 ] && line $d/r2'
step hardlink 'ln $d/d2/g $d/d2/hard && line $d/d2/hard'
step symlink 'ln -s g $d/d2/sym && [ -L $d/d2/sym ] && line $d/d2/sym'
step chmod 'chmod 640 $d/guest.txt && [ ! -x $d/guest.txt ] && echo ok'
step touch 'touch -d "2020-01-02 03:04:05" $d/guest.txt && echo ok'
step truncate 'echo 0123456789 > $d/t && truncate -s 4 $d/t && line $d/t'
step df 'df -k ${d:-/}'
step copy 'cp $d/pattern.bin $d/pattern.copy && sync $d/pattern.copy && echo synced'
step delete 'rm $d/delete-me.txt && [ ! -e $d/delete-me.txt ] && echo gone'
step rmdir 'rmdir $d/empty && [ ! -e $d/empty ] && echo gone'
step unlink-open 'echo kept > $d/u && exec 3<$d/u && rm $d/u && [ ! -e $d/u ] && IFS= read -r l <&3 && echo $l && exec 3<&-'
echo "SFTEST: ops: done"
"#;

/// What each step of [`OPS`] must print, but `df`, which depends on the host.
const EXPECTED: &[(&str, &str)] = &[
    ("read", "hello from the host"),
    ("list", "one two"),
    ("write", "written by the guest"),
    ("append", "2"),
    ("mkdir", "moved"),
    ("rename", "moved"),
    ("replace", "new"),
    // Link count, link target, mode and times are checked on the host.
    ("hardlink", "moved"),
    ("symlink", "moved"),
    ("chmod", "ok"),
    ("touch", "ok"),
    ("truncate", "0123"),
    // cp, then fsync (busybox `sync FILE`); the host compares the bytes.
    ("copy", "synced"),
    ("delete", "gone"),
    ("rmdir", "gone"),
    ("unlink-open", "kept"),
    ("ops", "done"),
];

/// The file [`OPS`] copies: a pattern of 600 KiB and a few bytes (more than one 9p message),
/// so that no page or message boundary hides a misplaced block.
fn pattern() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..600 * 1024 + 123)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// Fills a share with what [`OPS`] expects to find.
fn populate(share: &Path) {
    std::fs::create_dir_all(share.join("dir")).unwrap();
    std::fs::write(share.join("sharedfs-ops.sh"), OPS).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    std::fs::write(share.join("dir/one"), "1\n").unwrap();
    std::fs::write(share.join("dir/two"), "2\n").unwrap();
    std::fs::write(share.join("delete-me.txt"), "the guest deletes this\n").unwrap();
    std::fs::write(share.join("pattern.bin"), pattern()).unwrap();
}

/// `SFTEST: NAME: VALUE` lines of `text`, by name (a name seen twice is a test bug).
fn sftest_lines(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.split("SFTEST: ").nth(1) else {
            continue;
        };
        let (name, value) = rest.split_once(':').unwrap_or((rest, ""));
        let old = map.insert(name.trim().to_string(), value.trim().to_string());
        assert!(old.is_none(), "SFTEST {name} printed twice:\n{text}");
    }
    map
}

/// The size of the share's file system as the host sees it, in KiB.
fn host_total_kib(share: &Path) -> u64 {
    let path = std::ffi::CString::new(share.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the zeroed plain-data struct; the path is NUL-terminated.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(path.as_ptr(), &mut st), 0, "statvfs");
        st
    };
    #[allow(clippy::unnecessary_cast)]
    let (blocks, frsize) = (st.f_blocks as u64, st.f_frsize as u64);
    blocks * frsize / 1024
}

/// Checks what one run of [`OPS`] printed in the guest.
fn check_ops(output: &str, share: &Path, who: &str) {
    let got = sftest_lines(output);
    let failed: Vec<String> = EXPECTED
        .iter()
        .filter(|(name, want)| got.get(*name).map(String::as_str) != Some(*want))
        .map(|(name, want)| format!("  {name}: want {want:?}, got {:?}", got.get(*name)))
        .collect();
    assert!(
        failed.is_empty(),
        "{who}: guest-side file operations:\n{}\n--- output ---\n{output}",
        failed.join("\n")
    );
    let total_kib = host_total_kib(share);
    // df -k: "Filesystem 1K-blocks ... TAG TOTAL USED AVAILABLE USE% MOUNTPOINT".
    let df = &got["df"];
    let total: Option<u64> = df.split_whitespace().find_map(|f| f.parse().ok());
    assert_eq!(
        total,
        Some(total_kib),
        "{who}: df's total ({df:?}) is the host file system's"
    );
}

/// Checks on the host what one run of [`OPS`] left in `share`.
fn check_host_view(share: &Path, who: &str) {
    let read = |name: &str| {
        std::fs::read_to_string(share.join(name))
            .unwrap_or_else(|e| panic!("{who}: host reading {name}: {e}"))
    };
    let gone = |name: &str| {
        assert!(
            std::fs::symlink_metadata(share.join(name)).is_err(),
            "{who}: {name} still exists on the host"
        )
    };
    assert_eq!(
        read("guest.txt"),
        "written by the guest\nsecond line\n",
        "{who}: guest.txt"
    );
    let meta = std::fs::metadata(share.join("guest.txt")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640, "{who}: chmod");
    // 2020-01-02 03:04:05 UTC: the guest has no time zone.
    assert_eq!(meta.mtime(), 1_577_934_245, "{who}: touch -d");
    // Renamed across directories: gone from d1, in d2.
    assert!(share.join("d1").is_dir(), "{who}: d1");
    assert_eq!(
        std::fs::read_dir(share.join("d1")).unwrap().count(),
        0,
        "{who}: d1 is empty after the rename"
    );
    assert_eq!(read("d2/g"), "moved\n", "{who}: d2/g");
    let (g, hard) = (
        std::fs::metadata(share.join("d2/g")).unwrap(),
        std::fs::metadata(share.join("d2/hard")).unwrap(),
    );
    assert_eq!((g.ino(), g.nlink()), (hard.ino(), 2), "{who}: hard link");
    assert_eq!(
        std::fs::read_link(share.join("d2/sym")).unwrap(),
        PathBuf::from("g"),
        "{who}: symlink target"
    );
    assert_eq!(read("r2"), "new\n", "{who}: rename over an existing file");
    gone("r1");
    assert_eq!(read("t"), "0123", "{who}: truncate");
    assert!(
        std::fs::read(share.join("pattern.copy")).unwrap() == pattern(),
        "{who}: the guest's copy of pattern.bin differs"
    );
    gone("delete-me.txt");
    gone("empty");
    gone("u");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    NineP,
    VirtioFs,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::NineP => "9p",
            Kind::VirtioFs => "virtiofs",
        }
    }

    fn device(self, slot: u8, dir: &Path) -> String {
        match self {
            Kind::NineP => format!("{slot},virtio-9p,{},tag={TAG_9P}", dir.display()),
            Kind::VirtioFs => format!("{slot},virtio-fs,{},tag={TAG_FS}", dir.display()),
        }
    }

    fn root_args(self) -> String {
        match self {
            Kind::NineP => format!(
                "root={TAG_9P} rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize={MSIZE}"
            ),
            Kind::VirtioFs => format!("root={TAG_FS} rootfstype=virtiofs"),
        }
    }
}

/// The share's /init in kernel mode: reports the root mount, runs [`OPS`] on `/`, reboots.
const ROOT_INIT: &str = r#"#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t tmpfs tmpfs /tmp
while read -r dev on rest; do [ "$on" = / ] && echo "SFTEST: root: $dev $on $rest"; done </proc/mounts
sh /sharedfs-ops.sh /
sync
echo "SFTEST: init: $((6 * 7))"
reboot -f
"#;

/// Kernel mode: the share is the root file system; the kernel execs its /init.
fn root_on(kind: Kind) {
    let Some((kernel, initramfs)) = test_kernel() else {
        return;
    };
    let started = Instant::now();
    let scratch = Scratch::new(&format!("sharedfs-root-{}", kind.name()));
    let share = scratch.path("share");
    unpack_newc(&initramfs, &share);
    std::fs::write(share.join("init"), ROOT_INIT).unwrap();
    std::fs::set_permissions(share.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    populate(&share);

    let mut linux = Linux::new(&kernel, &initramfs, IrqChip::Kernel);
    linux.initramfs = None;
    linux.devices = vec![kind.device(3, &share)];
    linux.cmdline = format!("{} rw init=/init", kind.root_args());
    let mut vm = linux.boot();
    vm.wait_for(
        &format!("VFS: Mounted root ({} filesystem)", kind.name()),
        boot_timeout(),
    );
    let to_init = vm.wait_for("Run /init as init process", boot_timeout());
    let to_end = vm.wait_for("SFTEST: init: 42", boot_timeout());
    assert_eq!(
        vm.wait_exit(COMMAND_TIMEOUT),
        Some(0),
        "reboot -f: exit code"
    );
    let console = vm.console();
    let root = sftest_lines(&console).remove("root").unwrap_or_default();
    assert!(
        root.split_whitespace().take(3).collect::<Vec<_>>()
            == [
                if kind == Kind::NineP { TAG_9P } else { TAG_FS },
                "/",
                kind.name()
            ],
        "{}: / is the share:\n{console}",
        kind.name()
    );
    check_ops(&console, &share, kind.name());
    check_host_view(&share, kind.name());
    eprintln!(
        "figures ({} root): Run /init at {to_init:.0?} ({:?} instructions emulated), /init \
         done at {to_end:.0?} ({:?}), whole boot {:?}; root mount: {root}; test wall time \
         {:.1?}",
        kind.name(),
        vm.emulated_at(to_init),
        vm.emulated_at(to_end),
        vm.emulated_instructions(),
        started.elapsed()
    );
}

// The test harness starts tests in name order, two at a time on the build machines: the
// user-space boot, the longest, goes first, beside the two kernel-mode boots one after the other.

#[test]
fn kernel_mode_root_on_9p() {
    root_on(Kind::NineP);
}

#[test]
fn kernel_mode_root_on_virtiofs() {
    root_on(Kind::VirtioFs);
}

/// 16 MiB for the dd figures.
const BIG: usize = 16 << 20;

fn big_file() -> Vec<u8> {
    (0..BIG).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// 16 MiB over the `real` time of busybox's `time` applet in `out` ("real\t0m 1.23s").
fn throughput(out: &str) -> String {
    let secs = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("real"))
        .and_then(|t| {
            let t = t.trim().strip_suffix('s')?;
            let (m, s) = t.split_once('m')?;
            Some(m.trim().parse::<f64>().ok()? * 60.0 + s.trim().parse::<f64>().ok()?)
        });
    match secs {
        Some(s) if s > 0.0 => format!("{:.2} MB/s ({s:.2} s, guest clock)", BIG as f64 / 1e6 / s),
        _ => format!("(no time in {out:?})"),
    }
}

/// Milestones of a boot: wall time since start and KVM's emulated instructions by then (the
/// load-independent measure of guest kernel work on the build machines).
#[derive(Default)]
struct Phases(Vec<String>);

impl Phases {
    fn mark(&mut self, vm: &linux_common::Booted, what: &str) {
        let at = vm.started.elapsed();
        // The stats sampler writes every 2 s: the last sample before now.
        let emulated = vm
            .emulated_at(at)
            .map_or("?".into(), |n| format!("{:.0} M", n as f64 / 1e6));
        self.0
            .push(format!("{what} {at:.0?} ({emulated} emulated)"));
    }
}

/// Accepts one connection on `listener` (a host service at `DIR/00000002.PPPPPPPP`), reads to
/// the guest's shutdown and answers `host got: <what it read>`.
fn host_service(listener: UnixListener) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept the guest's connection");
        s.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got)
            .expect("read the guest's message");
        s.write_all(format!("host got: {got}").as_bytes())
            .expect("answer the guest");
        got
    })
}

/// Connects to the guest through `path` (after writing `handshake`, for `DIR/connect`), sends
/// `payload` from a second thread while reading the echo, and returns what came back.
fn echo_through(path: &Path, handshake: Option<String>, payload: Vec<u8>) -> Vec<u8> {
    let mut s =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect to {}: {e}", path.display()));
    s.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    if let Some(line) = handshake {
        s.write_all(line.as_bytes()).unwrap();
    }
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        writer.write_all(&payload).expect("send to the guest");
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut back = Vec::new();
    s.read_to_end(&mut back).expect("read the guest's echo");
    sender.join().unwrap();
    back
}

/// User space: both shares mounted by the shell, host changes seen by the guest, dd figures,
/// vsock both ways.
#[test]
fn both_shares_and_vsock_in_user_space() {
    let Some((kernel, initramfs)) = test_kernel() else {
        return;
    };
    let started = Instant::now();
    let scratch = Scratch::new("sharedfs-user");
    let (share9, sharefs, vsock) = (scratch.path("9p"), scratch.path("fs"), scratch.path("v"));
    let big = big_file();
    for share in [&share9, &sharefs] {
        populate(share);
        std::fs::write(share.join("big.bin"), &big).unwrap();
    }
    std::fs::create_dir_all(&vsock).unwrap();
    // A host service the guest connects to (guest port -> host port 1234).
    let service = host_service(
        UnixListener::bind(vsock.join(format!("00000002.{:08x}", 1234))).expect("bind"),
    );

    let mut linux = Linux::new(&kernel, &initramfs, IrqChip::Kernel);
    linux.devices = vec![
        Kind::NineP.device(3, &share9),
        Kind::VirtioFs.device(4, &sharefs),
        format!(
            "5,virtio-sock,guest_cid={GUEST_CID},path={},guest_forwards=1026",
            vsock.display()
        ),
    ];
    let mut vm = linux.boot();
    let mut phases = Phases::default();
    vm.wait_for("Run /init as init process", boot_timeout());
    phases.mark(&vm, "Run /init");
    vm.wait_for(PROMPT, boot_timeout());
    phases.mark(&vm, "prompt");
    // Kernel messages on the console would land in the middle of command output.
    vm.sh("dmesg -n 1");

    let mounts = vm.sh(&format!(
        "mkdir -p /mnt/a /mnt/b && mount -t 9p -o trans=virtio,version=9p2000.L,msize={MSIZE} \
         {TAG_9P} /mnt/a && mount -t virtiofs {TAG_FS} /mnt/b && grep /mnt/ /proc/mounts"
    ));
    assert!(
        mounts.contains(&format!("{TAG_9P} /mnt/a 9p"))
            && mounts.contains(&format!("{TAG_FS} /mnt/b virtiofs")),
        "both shares mounted:\n{mounts}"
    );

    // The file operations, each checked on the host while the share is still mounted.
    phases.mark(&vm, "mounted");
    let out = vm.sh("sh /mnt/a/sharedfs-ops.sh /mnt/a");
    check_ops(&out, &share9, "9p");
    check_host_view(&share9, "9p");
    phases.mark(&vm, "ops 9p");
    let out = vm.sh("sh /mnt/b/sharedfs-ops.sh /mnt/b");
    check_ops(&out, &sharefs, "virtiofs");
    check_host_view(&sharefs, "virtiofs");
    phases.mark(&vm, "ops virtiofs");

    // The host changes the shares while they are mounted. 9p (no cache, the default) sees it
    // at once. virtiofs lets the guest cache names and attributes for 1 s (the server's
    // entry/attr timeouts) and drops a file's page cache on open: the guest waits 2 s first.
    for share in [&share9, &sharefs] {
        std::fs::write(
            share.join("hello.txt"),
            "changed by the host while mounted\n",
        )
        .unwrap();
        std::fs::write(share.join("late.txt"), "made by the host while mounted\n").unwrap();
        std::fs::remove_file(share.join("dir/one")).unwrap();
    }
    let seen = vm.sh(
        "for m in /mnt/a /mnt/b; do [ $m = /mnt/b ] && usleep 2000000; \
         for f in hello.txt late.txt; do read -r l <$m/$f; echo $l; done; ls $m/dir; done",
    );
    assert_eq!(
        seen.lines().map(str::trim).collect::<Vec<_>>(),
        [
            "changed by the host while mounted",
            "made by the host while mounted",
            "two",
            "changed by the host while mounted",
            "made by the host while mounted",
            "two",
        ],
        "the guest sees the host's changes"
    );
    phases.mark(&vm, "host changes");

    // Guest-side throughput (information: the guest kernel is emulated here), timed by the
    // guest's `time` applet: the 16 MiB file the host wrote, read to /dev/null, then copied
    // with fsync (read and write); the host checks the copy.
    let mut figures = Vec::new();
    for (mount, share, name) in [("/mnt/a", &share9, "9p"), ("/mnt/b", &sharefs, "virtiofs")] {
        let read = vm.sh(&format!(
            "time dd if={mount}/big.bin of=/dev/null bs=1M 2>&1"
        ));
        assert!(read.contains("16+0 records in"), "{name}: dd read:\n{read}");
        let copy = vm.sh(&format!(
            "time dd if={mount}/big.bin of={mount}/big.copy bs=1M conv=fsync 2>&1"
        ));
        assert!(
            std::fs::read(share.join("big.copy")).unwrap() == big,
            "{name}: the guest's 16 MiB copy differs:\n{copy}"
        );
        figures.push(format!(
            "{name} dd 16 MiB: read {}, copy {}",
            throughput(&read),
            throughput(&copy)
        ));
        phases.mark(&vm, &format!("dd {name}"));
    }

    // vsock, guest -> host: the guest connects to host port 1234.
    let out = vm.sh("vsock-echo connect 2 1234 hello-from-the-guest");
    assert!(
        out.contains("vsock-echo: got host got: hello-from-the-guest"),
        "guest -> host vsock:\n{out}"
    );
    assert_eq!(service.join().unwrap(), "hello-from-the-guest");

    // vsock, host -> guest through DIR/connect: 256 KiB, more than one credit window.
    vm.sh("vsock-echo listen 1025 >/tmp/l1 2>&1 & \
         until grep -q listening /tmp/l1; do usleep 100000; done");
    let payload = big[..256 << 10].to_vec();
    let back = echo_through(
        &vsock.join("connect"),
        Some(format!("{GUEST_CID:08x}.{:08x}\n", 1025)),
        payload.clone(),
    );
    assert!(
        back == payload,
        "host -> guest vsock through DIR/connect: {} bytes echoed of {}",
        back.len(),
        payload.len()
    );
    let out = vm.sh("wait; cat /tmp/l1");
    assert!(
        out.contains("echoed 262144 bytes"),
        "guest listener:\n{out}"
    );

    // vsock, host -> guest on a forwarded port, through the guest.PPPPPPPP link.
    vm.sh("vsock-echo listen 1026 >/tmp/l2 2>&1 & \
         until grep -q listening /tmp/l2; do usleep 100000; done");
    let back = echo_through(
        &vsock.join(format!("guest.{:08x}", 1026)),
        None,
        b"hello-from-the-host".to_vec(),
    );
    assert_eq!(
        String::from_utf8_lossy(&back),
        "hello-from-the-host",
        "host -> guest vsock on a forwarded port"
    );
    let out = vm.sh("wait; cat /tmp/l2");
    assert!(out.contains("echoed 19 bytes"), "guest listener:\n{out}");
    phases.mark(&vm, "vsock");

    vm.sh("umount /mnt/a /mnt/b");
    vm.end_with("poweroff -f", 1);
    eprintln!(
        "figures (user space): {}; {}; whole boot: {:?} instructions emulated; test wall time \
         {:.1?}",
        phases.0.join(", "),
        figures.join("; "),
        vm.emulated_instructions(),
        started.elapsed()
    );
}
