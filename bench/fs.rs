//! Shared-folder request paths against the host system calls they wrap: the 9P2000.L server
//! and the virtio-fs FUSE server, each driven with whole request messages in memory (what the
//! device hands them after reading a virtqueue chain), against `pread`/`pwrite`, `openat`,
//! `fstatat` and `unlinkat` on the same files.
//!
//!     cargo bench --bench fs [-- --dir DIR --size-mib N --seconds S]
//!
//! Large I/O: sequential 512 KiB (9P, msize 512 KiB + header) and 1 MiB (FUSE max_write) over a
//! file of `--size-mib` (default 64 MiB, page-cache warm). Metadata, per operation: stat of a
//! name (9P walk + getattr + clunk; FUSE lookup + forget), open+close (9P walk + lopen + clunk;
//! FUSE open + release on a looked-up node), unlink. Each workload runs ROUNDS times per side,
//! alternating which side goes first; the best round of each counts. Ratios are server/host
//! throughput (1.00 = as fast as the bare system calls).

use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xhyve::fs::fuse::abi::{op, IN_HEADER, ROOT_ID};
use xhyve::fs::p9::wire::{Reader, Writer};
use xhyve::fs::sandbox::Share;
use xhyve::fs::{fuse, p9};

const ROUNDS: usize = 3;
const FILES: usize = 2000;

struct Settings {
    dir: PathBuf,
    size: u64,
    per_run: Duration,
}

fn parse_args() -> Result<Settings, String> {
    let mut s = Settings {
        dir: std::env::temp_dir(),
        size: 64 << 20,
        per_run: Duration::from_millis(700),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--dir" => s.dir = PathBuf::from(value("--dir")?),
            "--size-mib" => {
                let v = value("--size-mib")?;
                s.size = v
                    .parse::<u64>()
                    .map_err(|_| format!("invalid --size-mib \"{v}\""))?
                    .max(2)
                    << 20;
            }
            "--seconds" => {
                let v = value("--seconds")?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|x: &f64| x.is_finite() && *x > 0.0)
                    .ok_or(format!("invalid --seconds \"{v}\""))?;
                s.per_run = Duration::from_secs_f64(secs);
            }
            "--bench" => {}
            other => return Err(format!("unknown argument \"{other}\"")),
        }
    }
    Ok(s)
}

fn p9_msg(ty: u8, f: impl FnOnce(&mut Writer)) -> Vec<u8> {
    let mut m = Vec::new();
    let mut w = Writer::new(&mut m, ty, 1);
    f(&mut w);
    w.finish();
    m
}

fn p9_call(srv: &mut p9::Server, out: &mut Vec<u8>, msg: &[u8]) {
    out.clear();
    srv.handle(msg, out);
    assert_ne!(out[4], 7, "9P error {:?}", Reader::new(&out[7..]).u32());
}

fn p9_session(share: &Path) -> p9::Server {
    let mut srv = p9::Server::new(Share::new(share, false).unwrap(), p9::Options::default());
    let mut out = Vec::new();
    p9_call(
        &mut srv,
        &mut out,
        &p9_msg(100, |w| {
            w.u32(512 * 1024 + 11).str(b"9P2000.L");
        }),
    );
    p9_call(
        &mut srv,
        &mut out,
        &p9_msg(104, |w| {
            w.u32(0).u32(u32::MAX).str(b"").str(b"").u32(0);
        }),
    );
    srv
}

fn fuse_req(opcode: u32, unique: u64, node: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(IN_HEADER + body.len());
    m.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&node.to_le_bytes());
    m.extend_from_slice(&[0u8; 16]);
    m.extend_from_slice(body);
    m
}

fn fuse_call(srv: &mut fuse::Server, out: &mut Vec<u8>, req: &[u8]) {
    out.clear();
    if srv.handle(req, out) {
        assert_eq!(
            &out[4..8],
            &[0, 0, 0, 0],
            "FUSE error {}",
            i32::from_le_bytes(out[4..8].try_into().unwrap())
        );
    }
}

fn fuse_session(share: &Path) -> fuse::Server {
    let mut srv = fuse::Server::new(Share::new(share, false).unwrap(), fuse::Options::default());
    let mut body = Vec::new();
    for v in [7u32, 31, 1 << 20, u32::MAX] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    let mut out = Vec::new();
    fuse_call(&mut srv, &mut out, &fuse_req(op::INIT, 1, 0, &body));
    srv
}

fn fuse_lookup(srv: &mut fuse::Server, out: &mut Vec<u8>, name: &[u8]) -> u64 {
    let mut n = name.to_vec();
    n.push(0);
    fuse_call(srv, out, &fuse_req(op::LOOKUP, 2, ROOT_ID, &n));
    u64::from_le_bytes(out[16..24].try_into().unwrap())
}

/// Runs `op` repeatedly for `per_run` (or until it says it is out of work); returns ops/s and
/// bytes/s.
fn timed(per_run: Duration, mut op: impl FnMut(usize) -> Option<usize>) -> (f64, f64) {
    let start = Instant::now();
    let (mut ops, mut bytes) = (0usize, 0usize);
    while start.elapsed() < per_run {
        match op(ops) {
            Some(b) => bytes += b,
            None => break,
        }
        ops += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    (ops as f64 / secs, bytes as f64 / secs)
}

fn report(name: &str, unit: &str, server: f64, host: f64) {
    let ratio = server / host;
    println!("{name:<34} {server:>12.1} {host:>12.1} {unit:<6} {ratio:>6.2}");
}

fn main() {
    let s = match parse_args() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench fs: {e}");
            std::process::exit(64);
        }
    };
    let root = s.dir.join(format!("xhyve-bench-fs-{}", std::process::id()));
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    let data: Vec<u8> = (0..s.size).map(|i| (i % 251) as u8).collect();
    fs::write(root.join("big"), &data).unwrap();
    drop(data);
    println!(
        "{:<34} {:>12} {:>12} {:<6} {:>6}",
        "workload", "server", "host", "unit", "ratio"
    );

    let host_file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("big"))
        .unwrap();
    let hfd = host_file.as_raw_fd();
    let size = s.size as usize;

    // --- large I/O ---
    for (label, chunk, is_write, proto) in [
        ("9p read 512 KiB", 512 << 10, false, 0),
        ("9p write 512 KiB", 512 << 10, true, 0),
        ("fuse read 1 MiB", 1 << 20, false, 1),
        ("fuse write 1 MiB", 1 << 20, true, 1),
    ] {
        let (mut best_srv, mut best_host) = (0f64, 0f64);
        let mut p9srv = p9_session(&root);
        let mut fsrv = fuse_session(&root);
        let mut out: Vec<u8> = Vec::with_capacity(chunk + 64);
        // Open the file through the server once: fid 1 / fh from OPEN.
        p9_call(
            &mut p9srv,
            &mut out,
            &p9_msg(110, |w| {
                w.u32(0).u32(1).u16(1).str(b"big");
            }),
        );
        p9_call(
            &mut p9srv,
            &mut out,
            &p9_msg(12, |w| {
                w.u32(1).u32(2);
            }),
        );
        let node = fuse_lookup(&mut fsrv, &mut out, b"big");
        fuse_call(
            &mut fsrv,
            &mut out,
            &fuse_req(op::OPEN, 3, node, &[2, 0, 0, 0, 0, 0, 0, 0]),
        );
        let fh = u64::from_le_bytes(out[16..24].try_into().unwrap());
        let payload = vec![0x5au8; chunk];
        // Requests built once; only the offset changes per call.
        let mut p9req = if is_write {
            p9_msg(118, |w| {
                w.u32(1).u64(0).u32(chunk as u32).raw(&payload);
            })
        } else {
            p9_msg(116, |w| {
                w.u32(1).u64(0).u32(chunk as u32);
            })
        };
        let mut fbody = Vec::new();
        fbody.extend_from_slice(&fh.to_le_bytes());
        fbody.extend_from_slice(&0u64.to_le_bytes());
        fbody.extend_from_slice(&(chunk as u32).to_le_bytes());
        fbody.extend_from_slice(&[0u8; 20]);
        if is_write {
            fbody.extend_from_slice(&payload);
        }
        let mut freq = fuse_req(if is_write { op::WRITE } else { op::READ }, 4, node, &fbody);
        let mut hbuf = vec![0u8; chunk];
        for round in 0..ROUNDS {
            let mut run_server = || {
                timed(s.per_run, |i| {
                    let off = ((i * chunk) % (size - chunk + 1)) as u64;
                    out.clear();
                    if proto == 0 {
                        p9req[11..19].copy_from_slice(&off.to_le_bytes());
                        p9srv.handle(&p9req, &mut out);
                    } else {
                        freq[IN_HEADER + 8..IN_HEADER + 16].copy_from_slice(&off.to_le_bytes());
                        fsrv.handle(&freq, &mut out);
                    }
                    Some(chunk)
                })
                .1
            };
            let mut run_host = || {
                timed(s.per_run, |i| {
                    let off = ((i * chunk) % (size - chunk + 1)) as libc::off_t;
                    // SAFETY: hbuf/payload are valid for `chunk` bytes.
                    let n = unsafe {
                        if is_write {
                            libc::pwrite(hfd, payload.as_ptr().cast(), chunk, off)
                        } else {
                            libc::pread(hfd, hbuf.as_mut_ptr().cast(), chunk, off)
                        }
                    };
                    assert_eq!(n as usize, chunk);
                    Some(chunk)
                })
                .1
            };
            let (a, b) = if round % 2 == 0 {
                let a = run_server();
                (a, run_host())
            } else {
                let b = run_host();
                (run_server(), b)
            };
            best_srv = best_srv.max(a);
            best_host = best_host.max(b);
        }
        report(
            label,
            "MiB/s",
            best_srv / (1 << 20) as f64,
            best_host / (1 << 20) as f64,
        );
    }

    // --- metadata ---
    let names: Vec<String> = (0..FILES).map(|i| format!("f{i:05}")).collect();
    let make_files = |dir: &Path| {
        let _ = fs::create_dir_all(dir);
        for n in &names {
            fs::write(dir.join(n), b"x").unwrap();
        }
    };
    let mk = root.join("meta");
    for proto in ["9p", "fuse"] {
        make_files(&mk);
        let mut out = Vec::with_capacity(4096);
        let mut p9srv = p9_session(&mk);
        let mut fsrv = fuse_session(&mk);
        let dfd = fs::File::open(&mk).unwrap();
        let dfd = dfd.as_raw_fd();
        let cnames: Vec<CString> = names
            .iter()
            .map(|n| CString::new(n.as_str()).unwrap())
            .collect();
        // stat of a name
        let (mut bs, mut bh) = (0f64, 0f64);
        for _ in 0..ROUNDS {
            let srv_rate = timed(s.per_run, |i| {
                let name = names[i % FILES].as_bytes();
                if proto == "9p" {
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(110, |w| {
                            w.u32(0).u32(5).u16(1).str(name);
                        }),
                    );
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(24, |w| {
                            w.u32(5).u64(0x7ff);
                        }),
                    );
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(120, |w| {
                            w.u32(5);
                        }),
                    );
                } else {
                    let id = fuse_lookup(&mut fsrv, &mut out, name);
                    fuse_call(
                        &mut fsrv,
                        &mut out,
                        &fuse_req(op::FORGET, 9, id, &1u64.to_le_bytes()),
                    );
                }
                Some(0)
            })
            .0;
            let host_rate = timed(s.per_run, |i| {
                // SAFETY: a NUL-terminated name relative to an open directory; st is plain data.
                unsafe {
                    let mut st: libc::stat = std::mem::zeroed();
                    assert_eq!(
                        libc::fstatat(
                            dfd,
                            cnames[i % FILES].as_ptr(),
                            &mut st,
                            libc::AT_SYMLINK_NOFOLLOW
                        ),
                        0
                    );
                }
                Some(0)
            })
            .0;
            bs = bs.max(srv_rate);
            bh = bh.max(host_rate);
        }
        report(&format!("{proto} stat (lookup+getattr)"), "ops/s", bs, bh);
        // open + close
        let (mut bs, mut bh) = (0f64, 0f64);
        let fuse_ids: Vec<u64> = if proto == "fuse" {
            names
                .iter()
                .map(|n| fuse_lookup(&mut fsrv, &mut out, n.as_bytes()))
                .collect()
        } else {
            vec![]
        };
        for _ in 0..ROUNDS {
            let srv_rate = timed(s.per_run, |i| {
                if proto == "9p" {
                    let name = names[i % FILES].as_bytes();
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(110, |w| {
                            w.u32(0).u32(6).u16(1).str(name);
                        }),
                    );
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(12, |w| {
                            w.u32(6).u32(0);
                        }),
                    );
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(120, |w| {
                            w.u32(6);
                        }),
                    );
                } else {
                    let id = fuse_ids[i % FILES];
                    fuse_call(&mut fsrv, &mut out, &fuse_req(op::OPEN, 10, id, &[0; 8]));
                    let fh = u64::from_le_bytes(out[16..24].try_into().unwrap());
                    let mut b = fh.to_le_bytes().to_vec();
                    b.extend_from_slice(&[0; 16]);
                    fuse_call(&mut fsrv, &mut out, &fuse_req(op::RELEASE, 11, id, &b));
                }
                Some(0)
            })
            .0;
            let host_rate = timed(s.per_run, |i| {
                // SAFETY: as above; the descriptor is closed at once.
                unsafe {
                    let fd = libc::openat(
                        dfd,
                        cnames[i % FILES].as_ptr(),
                        libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    );
                    assert!(fd >= 0);
                    libc::close(fd);
                }
                Some(0)
            })
            .0;
            bs = bs.max(srv_rate);
            bh = bh.max(host_rate);
        }
        report(&format!("{proto} open+close"), "ops/s", bs, bh);
        // unlink: FILES names per side per round, recreated between runs (not timed).
        let (mut bs, mut bh) = (0f64, 0f64);
        for _ in 0..ROUNDS {
            make_files(&mk);
            let srv_rate = timed(Duration::from_secs(3600), |i| {
                let name = names.get(i)?.as_bytes();
                if proto == "9p" {
                    p9_call(
                        &mut p9srv,
                        &mut out,
                        &p9_msg(76, |w| {
                            w.u32(0).str(name).u32(0);
                        }),
                    );
                } else {
                    let mut n = name.to_vec();
                    n.push(0);
                    fuse_call(&mut fsrv, &mut out, &fuse_req(op::UNLINK, 12, ROOT_ID, &n));
                }
                Some(0)
            })
            .0;
            make_files(&mk);
            let host_rate = timed(Duration::from_secs(3600), |i| {
                let c = cnames.get(i)?;
                // SAFETY: a NUL-terminated name relative to an open directory.
                assert_eq!(unsafe { libc::unlinkat(dfd, c.as_ptr(), 0) }, 0);
                Some(0)
            })
            .0;
            bs = bs.max(srv_rate);
            bh = bh.max(host_rate);
        }
        report(&format!("{proto} unlink"), "ops/s", bs, bh);
    }
    let _ = fs::remove_dir_all(&root);
}
