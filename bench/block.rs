//! Block back end against the host: 4 KiB sequential and random reads and writes (and 64 KiB
//! sequential writes) through
//! `RawImage` (the path virtio-blk and AHCI take: `BlockBackend::read_to` / `write_from`
//! on a `VolatileSlice`) and through plain `pread`/`pwrite` on the same file.
//!
//!     cargo bench --bench block [-- --dir DIR --size-mib N --seconds S]
//!
//! Then, when `qemu-img` is installed: the same workloads on a qcow2 image (64 KiB clusters,
//! every cluster allocated) through `Qcow2Image` against `RawImage`, and first-write
//! allocation (one 4 KiB write to each new cluster of a fresh image) through `Qcow2Image`
//! against `qemu-img bench` (QEMU's qcow2 driver, depth 1, writeback cache) on the same
//! pattern.
//!
//! Each of the 5 workloads runs `ROUNDS` times per side, alternating which side goes first,
//! so load from other work on the host falls on both; the best round of each side counts.
//! Total time is about 5 x 2 x ROUNDS x S seconds per comparison (default about 60 s).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vm_memory::VolatileSlice;
use xhyve::block::{BlockBackend, BlockOptions, Qcow2Image, RawImage};

const BLOCK: usize = 4096;
const ROUNDS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Pattern {
    Sequential,
    Random,
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Read,
    Write,
}

struct Settings {
    dir: PathBuf,
    size: u64,
    per_run: Duration,
}

fn parse_args() -> Result<Settings, String> {
    let mut settings = Settings {
        dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/out")),
        size: 256 << 20,
        per_run: Duration::from_secs(2),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--dir" => settings.dir = PathBuf::from(value("--dir")?),
            "--size-mib" => {
                let v = value("--size-mib")?;
                let mib: u64 = v
                    .parse()
                    .map_err(|_| format!("invalid --size-mib \"{v}\""))?;
                settings.size = mib.max(1) << 20;
            }
            "--seconds" => {
                let v = value("--seconds")?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or(format!("invalid --seconds \"{v}\""))?;
                settings.per_run = Duration::from_secs_f64(secs);
            }
            // `cargo bench` passes `--bench` to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument \"{other}\"")),
        }
    }
    Ok(settings)
}

/// The block offsets a run visits, the same sequence for both sides.
struct Offsets {
    pattern: Pattern,
    block: usize,
    blocks: u64,
    next: u64,
    state: u64,
}

impl Offsets {
    fn new(pattern: Pattern, size: u64, block: usize) -> Self {
        Offsets {
            pattern,
            block,
            blocks: size / block as u64,
            next: 0,
            state: 0x2545_F491_4F6C_DD1D,
        }
    }

    fn next_offset(&mut self) -> u64 {
        let block = match self.pattern {
            Pattern::Sequential => {
                let b = self.next;
                self.next = (self.next + 1) % self.blocks;
                b
            }
            Pattern::Random => {
                self.state ^= self.state << 13;
                self.state ^= self.state >> 7;
                self.state ^= self.state << 17;
                self.state % self.blocks
            }
        };
        block * self.block as u64
    }
}

/// One side of the comparison.
trait Target {
    fn read(&self, offset: u64, buf: &mut [u8]);
    fn write(&self, offset: u64, buf: &mut [u8]);
}

struct Host(File);

impl Target for Host {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.0.read_exact_at(buf, offset).expect("pread");
    }
    fn write(&self, offset: u64, buf: &mut [u8]) {
        self.0.write_all_at(buf, offset).expect("pwrite");
    }
}

impl Target for RawImage {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.read_to(offset, &VolatileSlice::from(buf))
            .expect("RawImage read");
    }
    fn write(&self, offset: u64, buf: &mut [u8]) {
        self.write_from(offset, &VolatileSlice::from(buf))
            .expect("RawImage write");
    }
}

impl Target for Qcow2Image {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.read_to(offset, &VolatileSlice::from(buf))
            .expect("Qcow2Image read");
    }
    fn write(&self, offset: u64, buf: &mut [u8]) {
        self.write_from(offset, &VolatileSlice::from(buf))
            .expect("Qcow2Image write");
    }
}

/// Runs one workload for `per_run`; returns operations per second.
fn run(
    target: &dyn Target,
    (pattern, direction, block): (Pattern, Direction, usize),
    settings: &Settings,
) -> f64 {
    let mut buf = vec![0x5Au8; block];
    let mut offsets = Offsets::new(pattern, settings.size, block);
    let start = Instant::now();
    let mut ops = 0u64;
    // Check the clock every 256 operations so timing costs nothing measurable.
    while start.elapsed() < settings.per_run {
        for _ in 0..256 {
            let offset = offsets.next_offset();
            match direction {
                Direction::Read => target.read(offset, &mut buf),
                Direction::Write => target.write(offset, &mut buf),
            }
        }
        ops += 256;
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let settings = match parse_args() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("block bench: {e}");
            std::process::exit(2);
        }
    };
    std::fs::create_dir_all(&settings.dir).expect("create the benchmark directory");
    let path = settings.dir.join("block-bench.img");
    // A fully written file, so reads hit data (not holes) on both sides.
    {
        let file = File::create(&path).expect("create the image");
        let chunk = vec![0xC3u8; 1 << 20];
        for i in 0..settings.size >> 20 {
            file.write_all_at(&chunk, i << 20).expect("fill the image");
        }
        file.sync_all().expect("sync the image");
    }
    let image = RawImage::open(&BlockOptions::new(&path)).expect("open RawImage");
    let host = Host(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the image"),
    );

    println!(
        "block back end vs host pread/pwrite: {} MiB file in {}, 4 KiB blocks, best of {ROUNDS} x {:.1} s",
        settings.size >> 20,
        settings.dir.display(),
        settings.per_run.as_secs_f64()
    );
    compare(("RawImage", &image), ("host", &host), &settings);
    if std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("qcow2: qemu-img not installed (qemu-utils), skipped");
    } else {
        qcow2_against_raw(&image, &settings);
        first_write_allocation(&settings);
    }
    drop(image);
    let _ = std::fs::remove_file(&path);
}

/// Best of `ROUNDS` per workload for two targets, alternating which goes first.
fn compare(a: (&str, &dyn Target), b: (&str, &dyn Target), settings: &Settings) {
    println!(
        "{:<12} {:>14} {:>14} {:>12} {:>12} {:>7}",
        "workload",
        format!("{} IOPS", a.0),
        format!("{} IOPS", b.0),
        format!("{} MB/s", a.0),
        format!("{} MB/s", b.0),
        "ratio"
    );
    let workloads = [
        ("seq read", (Pattern::Sequential, Direction::Read, BLOCK)),
        ("seq write", (Pattern::Sequential, Direction::Write, BLOCK)),
        ("rand read", (Pattern::Random, Direction::Read, BLOCK)),
        ("rand write", (Pattern::Random, Direction::Write, BLOCK)),
        (
            "seq wr 64k",
            (Pattern::Sequential, Direction::Write, 64 << 10),
        ),
    ];
    for (name, workload) in workloads {
        let (mut best_a, mut best_b) = (0f64, 0f64);
        for round in 0..ROUNDS {
            if round % 2 == 0 {
                best_a = best_a.max(run(a.1, workload, settings));
                best_b = best_b.max(run(b.1, workload, settings));
            } else {
                best_b = best_b.max(run(b.1, workload, settings));
                best_a = best_a.max(run(a.1, workload, settings));
            }
        }
        let mb = |iops: f64| iops * workload.2 as f64 / 1e6;
        println!(
            "{name:<12} {best_a:>14.0} {best_b:>14.0} {:>12.1} {:>12.1} {:>7.3}",
            mb(best_a),
            mb(best_b),
            best_a / best_b
        );
    }
}

const QCOW2_CLUSTER: u64 = 64 << 10;

fn qemu_img(args: &[&str]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn new_qcow2(settings: &Settings, name: &str) -> PathBuf {
    let path = settings.dir.join(name);
    let _ = std::fs::remove_file(&path);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=1.1,cluster_size=65536",
        path.to_str().unwrap(),
        &settings.size.to_string(),
    ]);
    path
}

fn open_qcow2(path: &std::path::Path) -> Qcow2Image {
    let spec = format!("{},format=qcow2", path.display());
    Qcow2Image::open(&BlockOptions::parse(&spec).unwrap()).expect("open Qcow2Image")
}

/// Allocated clusters: the qcow2 image fully written first, so no request allocates.
fn qcow2_against_raw(raw: &RawImage, settings: &Settings) {
    let path = new_qcow2(settings, "block-bench.qcow2");
    let qcow2 = open_qcow2(&path);
    let chunk = vec![0xC3u8; 1 << 20];
    for i in 0..settings.size >> 20 {
        Target::write(&qcow2, i << 20, &mut chunk.clone());
    }
    qcow2.flush().expect("flush");
    println!();
    println!("qcow2 (64 KiB clusters, all allocated) vs raw, through BlockBackend:");
    compare(("qcow2", &qcow2), ("raw", raw), settings);
    drop(qcow2);
    let _ = std::fs::remove_file(&path);
}

/// One 4 KiB write to each cluster of a fresh image: every write allocates a cluster.
fn first_write_allocation(settings: &Settings) {
    let count = settings.size / QCOW2_CLUSTER;
    let mut ours = 0f64;
    let mut theirs = 0f64;
    for _ in 0..ROUNDS {
        let path = new_qcow2(settings, "block-bench-alloc.qcow2");
        let qcow2 = open_qcow2(&path);
        let mut buf = vec![0x5Au8; BLOCK];
        let start = Instant::now();
        for i in 0..count {
            Target::write(&qcow2, i * QCOW2_CLUSTER, &mut buf);
        }
        ours = ours.max(count as f64 / start.elapsed().as_secs_f64());
        drop(qcow2);

        let path = new_qcow2(settings, "block-bench-alloc.qcow2");
        let report = qemu_img(&[
            "bench",
            "-w",
            "-f",
            "qcow2",
            "-t",
            "writeback",
            "-d",
            "1",
            "-c",
            &count.to_string(),
            "-s",
            &BLOCK.to_string(),
            "-S",
            &QCOW2_CLUSTER.to_string(),
            path.to_str().unwrap(),
        ]);
        // Its own timing ("Run completed in 0.075 seconds."), without its start-up.
        let seconds: f64 = report
            .lines()
            .find_map(|l| {
                l.strip_prefix("Run completed in ")?
                    .strip_suffix(" seconds.")?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no timing in qemu-img bench output: {report}"));
        theirs = theirs.max(count as f64 / seconds.max(1e-6));
        let _ = std::fs::remove_file(&path);
    }
    println!();
    println!(
        "qcow2 first-write allocation ({count} x 4 KiB, one per 64 KiB cluster), best of {ROUNDS}:"
    );
    println!(
        "{:<12} {:>14} {:>14} {:>7}",
        "workload", "Qcow2Image/s", "qemu-img/s", "ratio"
    );
    println!(
        "{:<12} {ours:>14.0} {theirs:>14.0} {:>7.3}",
        "alloc write",
        ours / theirs
    );
}
