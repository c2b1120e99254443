//! Escape attempts against the sandbox: each test builds a share next to an "outside"
//! directory holding a secret, and tries to reach the secret from inside.

use std::fs;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::tempdir::TempDir;

use super::*;

const SECRET: &[u8] = b"SECRET-outside-the-share";

struct World {
    _tmp: TempDir,
    share: PathBuf,
    outside: PathBuf,
}

fn world() -> World {
    let tmp = TempDir::new_with_prefix("/tmp/xhyve-sandbox-").unwrap();
    let share = tmp.as_path().join("share");
    let outside = tmp.as_path().join("outside");
    fs::create_dir(&share).unwrap();
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("f"), SECRET).unwrap();
    fs::write(share.join("inside"), b"inside").unwrap();
    World {
        _tmp: tmp,
        share,
        outside,
    }
}

/// Every combination of the host features the sandbox adapts to.
fn modes(dir: &Path, ro: bool) -> Vec<(&'static str, Share)> {
    let mut out = Vec::new();
    for (label, no2, noproc) in [
        ("openat2", false, false),
        ("openat", true, false),
        ("no-proc", true, true),
    ] {
        let mut s = Share::new(dir, ro).unwrap();
        s.force_fallbacks(no2, noproc);
        out.push((label, s));
    }
    out
}

fn read_all(fd: OwnedFd) -> Vec<u8> {
    let mut f = fs::File::from(fd);
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn errno_of<T: std::fmt::Debug>(r: Result<T>) -> i32 {
    r.expect_err("must fail").errno()
}

#[test]
fn names_that_are_not_one_component_are_refused() {
    let w = world();
    for (mode, s) in modes(&w.share, false) {
        let root = s.root();
        for bad in [&b""[..], b".", b"a/b", b"/etc", b"../outside", b"x\0y"] {
            assert_eq!(
                errno_of(s.lookup(&root, bad)),
                errno::EINVAL,
                "{mode}: {bad:?}"
            );
            assert_eq!(
                errno_of(s.create(&root, bad, libc::O_RDWR, 0o644)),
                errno::EINVAL,
                "{mode}: {bad:?}"
            );
            assert_eq!(errno_of(s.mkdir(&root, bad, 0o755)), errno::EINVAL);
            assert_eq!(errno_of(s.unlink(&root, bad, false)), errno::EINVAL);
            assert_eq!(
                errno_of(s.rename(&root, b"inside", &root, bad)),
                errno::EINVAL
            );
        }
        assert_eq!(errno_of(s.lookup(&root, &[b'a'; 256])), errno::ENAMETOOLONG);
    }
}

#[test]
fn dotdot_stops_at_the_root() {
    let w = world();
    fs::create_dir_all(w.share.join("a/b")).unwrap();
    for (mode, s) in modes(&w.share, false) {
        let root = s.root();
        let up = s.lookup(&root, b"..").unwrap();
        assert!(Arc::ptr_eq(&up, &root), "{mode}");
        let a = s.lookup(&root, b"a").unwrap();
        let b = s.lookup(&a, b"b").unwrap();
        let mut n = b.clone();
        for _ in 0..5 {
            n = s.lookup(&n, b"..").unwrap();
        }
        assert!(n.is_root(), "{mode}");
        // From the root, the outside directory is not a name.
        assert_eq!(errno_of(s.lookup(&n, b"outside")), errno::ENOENT);
        let names: Vec<_> = s
            .read_dir(&n)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&b"a".to_vec()) && !names.contains(&b"outside".to_vec()));
    }
}

#[test]
fn symlinks_out_are_never_followed() {
    let w = world();
    symlink(&w.outside, w.share.join("abs")).unwrap();
    symlink("../outside", w.share.join("rel")).unwrap();
    symlink(w.outside.join("f"), w.share.join("absf")).unwrap();
    symlink("../outside/f", w.share.join("relf")).unwrap();
    symlink("/proc/self/root/etc", w.share.join("magic")).unwrap();
    for (mode, s) in modes(&w.share, false) {
        let root = s.root();
        for dirlink in [&b"abs"[..], b"rel", b"magic"] {
            let l = s.lookup(&root, dirlink).unwrap();
            assert_eq!(l.kind, Kind::Symlink, "{mode}");
            assert_eq!(errno_of(s.lookup(&l, b"f")), errno::ENOTDIR, "{mode}");
            assert_eq!(errno_of(s.read_dir(&l)), errno::ELOOP, "{mode}");
            assert_eq!(
                errno_of(s.create(&l, b"new", libc::O_RDWR, 0o644)),
                errno::ENOTDIR
            );
            assert_eq!(errno_of(s.mkdir(&l, b"new", 0o755)), errno::ENOTDIR);
        }
        for filelink in [&b"absf"[..], b"relf"] {
            let l = s.lookup(&root, filelink).unwrap();
            assert_eq!(errno_of(s.open(&l, libc::O_RDONLY)), errno::ELOOP, "{mode}");
            // The guest may read the link text and resolve it itself, inside its own mount.
            assert!(!s.readlink(&l).unwrap().is_empty());
            // Linking the link makes another link, not a link to the target.
            let n = s.link(&l, &root, b"linked").unwrap();
            assert_eq!(n.kind, Kind::Symlink, "{mode}");
            s.unlink(&root, b"linked", false).unwrap();
            // Truncating or chmod through it must not touch the target.
            let _ = s.setattr(
                &l,
                &SetAttr {
                    size: Some(0),
                    mode: Some(0o777),
                    ..Default::default()
                },
            );
        }
        assert_eq!(fs::read(w.outside.join("f")).unwrap(), SECRET);
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(w.outside.join("f"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
}

#[test]
fn create_never_opens_an_existing_link_or_device() {
    let w = world();
    symlink(w.outside.join("f"), w.share.join("trap")).unwrap();
    for (mode, s) in modes(&w.share, false) {
        let root = s.root();
        assert_eq!(
            errno_of(s.create(&root, b"trap", libc::O_RDWR | libc::O_TRUNC, 0o644)),
            errno::EEXIST,
            "{mode}"
        );
    }
    assert_eq!(fs::read(w.outside.join("f")).unwrap(), SECRET);
}

#[test]
fn special_files_are_never_opened_and_devices_never_made() {
    let w = world();
    let fifo = CString::new(w.share.join("fifo").as_os_str().to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path in our temporary directory.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    // As root (CI), also a real character device: a copy of /dev/null's numbers.
    // SAFETY: geteuid has no preconditions.
    let as_root = unsafe { libc::geteuid() } == 0;
    if as_root {
        let dev = CString::new(w.share.join("null").as_os_str().to_str().unwrap()).unwrap();
        // SAFETY: as above; makedev(1, 3) is /dev/null.
        let rc = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
        assert_eq!(rc, 0);
    }
    for (mode, s) in modes(&w.share, false) {
        let root = s.root();
        let f = s.lookup(&root, b"fifo").unwrap();
        assert_eq!(f.kind, Kind::Special);
        // Opening a FIFO for reading would block forever; it must be refused at once.
        assert_eq!(errno_of(s.open(&f, libc::O_RDONLY)), errno::ENXIO, "{mode}");
        assert_eq!(s.getattr(&f).unwrap().mode & lmode::S_IFMT, lmode::S_IFIFO);
        if as_root {
            let d = s.lookup(&root, b"null").unwrap();
            assert_eq!(errno_of(s.open(&d, libc::O_RDWR)), errno::ENXIO, "{mode}");
        }
        for devmode in [lmode::S_IFCHR | 0o666, lmode::S_IFBLK | 0o600] {
            assert_eq!(
                errno_of(s.mknod(&root, b"dev", devmode)),
                errno::EPERM,
                "{mode}"
            );
        }
        let p = s.mknod(&root, b"pipe", lmode::S_IFIFO | 0o600).unwrap();
        assert_eq!(p.kind, Kind::Special);
        s.unlink(&root, b"pipe", false).unwrap();
    }
}

#[test]
fn read_only_share_refuses_every_change() {
    let w = world();
    fs::create_dir(w.share.join("d")).unwrap();
    for (mode, s) in modes(&w.share, true) {
        let root = s.root();
        let f = s.lookup(&root, b"inside").unwrap();
        let d = s.lookup(&root, b"d").unwrap();
        let rofs = errno::EROFS;
        assert_eq!(errno_of(s.open(&f, libc::O_WRONLY)), rofs, "{mode}");
        assert_eq!(errno_of(s.open(&f, libc::O_RDWR)), rofs);
        assert_eq!(errno_of(s.open(&f, libc::O_RDONLY | libc::O_TRUNC)), rofs);
        assert_eq!(errno_of(s.create(&root, b"n", libc::O_RDWR, 0o644)), rofs);
        assert_eq!(errno_of(s.mkdir(&root, b"n", 0o755)), rofs);
        assert_eq!(errno_of(s.symlink(&root, b"n", b"x")), rofs);
        assert_eq!(errno_of(s.mknod(&root, b"n", lmode::S_IFREG | 0o644)), rofs);
        assert_eq!(errno_of(s.link(&f, &root, b"n")), rofs);
        assert_eq!(errno_of(s.rename(&root, b"inside", &d, b"x")), rofs);
        assert_eq!(errno_of(s.unlink(&root, b"inside", false)), rofs);
        assert_eq!(errno_of(s.unlink(&root, b"d", true)), rofs);
        assert_eq!(
            errno_of(s.setattr(
                &f,
                &SetAttr {
                    size: Some(0),
                    ..Default::default()
                }
            )),
            rofs
        );
        assert_eq!(
            errno_of(s.setattr(
                &f,
                &SetAttr {
                    mode: Some(0o777),
                    ..Default::default()
                }
            )),
            rofs
        );
        assert_eq!(read_all(s.open(&f, libc::O_RDONLY).unwrap()), b"inside");
    }
    assert_eq!(fs::read(w.share.join("inside")).unwrap(), b"inside");
}

#[test]
fn everyday_operations_work() {
    let w = world();
    for (mode, s) in modes(&w.share, false) {
        let root = s.root();
        let a = s.mkdir(&root, b"a", 0o755).unwrap();
        let b = s.mkdir(&root, b"b", 0o755).unwrap();
        let (f, fd) = s.create(&a, b"f", libc::O_RDWR, 0o640).unwrap();
        let mut file = fs::File::from(fd);
        std::io::Write::write_all(&mut file, b"hello").unwrap();
        assert_eq!(s.getattr(&f).unwrap().size, 5, "{mode}");
        s.rename(&a, b"f", &b, b"g").unwrap();
        let g = s.lookup(&b, b"g").unwrap();
        assert_eq!(g.ino, f.ino);
        assert_eq!(read_all(s.open(&g, libc::O_RDONLY).unwrap()), b"hello");
        let l = s.link(&g, &a, b"hard").unwrap();
        assert_eq!(s.getattr(&l).unwrap().nlink, 2, "{mode}");
        let sl = s.symlink(&a, b"sym", b"../b/g").unwrap();
        assert_eq!(s.readlink(&sl).unwrap(), b"../b/g");
        s.setattr(
            &g,
            &SetAttr {
                size: Some(2),
                mode: Some(0o600),
                mtime: SetTime::At(1000, 5),
                ..Default::default()
            },
        )
        .unwrap();
        let at = s.getattr(&g).unwrap();
        assert_eq!(
            (at.size, at.mode & 0o7777, at.mtime),
            (2, 0o600, (1000, 5)),
            "{mode}"
        );
        assert!(s.statfs(&g).unwrap().blocks > 0);
        let mut names: Vec<_> = s
            .read_dir(&a)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, vec![b"hard".to_vec(), b"sym".to_vec()]);
        assert_eq!(errno_of(s.unlink(&root, b"a", true)), errno::ENOTEMPTY);
        assert_eq!(errno_of(s.link(&a, &b, b"dirlink")), errno::EPERM);
        for (d, n) in [(&a, &b"hard"[..]), (&a, b"sym"), (&b, b"g")] {
            s.unlink(d, n, false).unwrap();
        }
        s.unlink(&root, b"a", true).unwrap();
        s.unlink(&root, b"b", true).unwrap();
    }
}

fn exchange(a: &Path, b: &Path) {
    let (ca, cb) = (
        CString::new(a.as_os_str().to_str().unwrap()).unwrap(),
        CString::new(b.as_os_str().to_str().unwrap()).unwrap(),
    );
    // SAFETY: NUL-terminated paths in our temporary directory.
    #[cfg(target_os = "linux")]
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    // SAFETY: as above; macOS's atomic exchange.
    #[cfg(target_os = "macos")]
    let rc = unsafe { libc::renamex_np(ca.as_ptr(), cb.as_ptr(), libc::RENAME_SWAP) };
    assert_eq!(rc, 0, "RENAME_EXCHANGE: {}", io::Error::last_os_error());
}

/// A host thread keeps atomically exchanging a directory with a symlink that points outside
/// (and, one level down, a file with a symlink to the secret) while the sandbox walks through
/// the name and reads: it must only ever see inside data, and must see some.
#[test]
fn symlink_swap_race_never_escapes() {
    let w = world();
    let d = w.share.join("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("f"), b"inside").unwrap();
    symlink(w.outside.join("f"), d.join("flink")).unwrap();
    symlink(&w.outside, w.share.join("dlink")).unwrap();
    for (mode, s) in modes(&w.share, false) {
        let stop = Arc::new(AtomicBool::new(false));
        let flips = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let flip = {
            let (stop, flips, share) = (stop.clone(), flips.clone(), w.share.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Whichever of d/dlink is the real directory holds f and flink.
                    exchange(&share.join("d"), &share.join("dlink"));
                    for dir in ["d", "dlink"] {
                        let dir = share.join(dir);
                        if dir.symlink_metadata().map(|m| m.is_dir()).unwrap_or(false) {
                            exchange(&dir.join("f"), &dir.join("flink"));
                        }
                    }
                    n += 1;
                    flips.store(n, Ordering::Relaxed);
                }
            })
        };
        let root = s.root();
        let (mut reads, mut refused, mut i) = (0u64, 0u64, 0u64);
        let start = std::time::Instant::now();
        // At least 3000 attempts and 500 flips, whichever takes longer (bounded).
        while (i < 3000 || flips.load(Ordering::Relaxed) < 500 || reads == 0 || refused == 0)
            && start.elapsed().as_secs() < 20
        {
            i += 1;
            let got = s
                .lookup(&root, b"d")
                .and_then(|d| s.lookup(&d, b"f"))
                .and_then(|f| s.open(&f, libc::O_RDONLY));
            match got {
                Ok(fd) => {
                    assert_ne!(read_all(fd), SECRET, "{mode}: escaped through d/f");
                    reads += 1;
                }
                Err(_) => refused += 1,
            }
        }
        stop.store(true, Ordering::Relaxed);
        flip.join().unwrap();
        let flips = flips.load(Ordering::Relaxed);
        assert!(
            flips >= 100,
            "{mode}: the flipping thread barely ran ({flips})"
        );
        assert!(
            reads > 0 && refused > 0,
            "{mode}: the race was not exercised ({reads} reads, {refused} refused)"
        );
    }
    assert_eq!(fs::read(w.outside.join("f")).unwrap(), SECRET);
}

#[test]
fn set_uid_bits_never_reach_the_host() {
    use std::os::unix::fs::PermissionsExt;
    let w = world();
    let s = Share::new(&w.share, false).unwrap();
    let root = s.root();
    let (f, _) = s.create(&root, b"suid", libc::O_RDWR, 0o6755).unwrap();
    let d = s.mkdir(&root, b"sgid", 0o2775).unwrap();
    let mode = |p: &str| fs::metadata(w.share.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid") & 0o6000, 0);
    s.setattr(
        &f,
        &SetAttr {
            mode: Some(0o4755),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(mode("suid"), 0o755);
    s.setattr(
        &d,
        &SetAttr {
            mode: Some(0o6777),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        mode("sgid"),
        0o2777,
        "set-gid directories keep group inheritance"
    );
}
