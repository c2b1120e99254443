#!/usr/bin/env python3
"""Guest virtio-blk throughput, xhyve against QEMU, on the same raw image in one run.

Both VMMs boot the same multiboot test guest (test/guests, command `blkbench MODE COUNT`),
which drives a virtio-blk disk through the legacy PCI interface, keeps QD requests in flight,
polls the used ring (no interrupts) and times itself with the ACPI PM timer it finds in the
FADT. Workloads: sequential read and write (64 KiB requests), random read and write (4 KiB).

    cargo build --release
    python3 bench/blk_guest.py                      # about 5 minutes with the defaults
    python3 bench/blk_guest.py --ring0 --runs 3     # the loop at CPL 0 (emulated here)
    python3 bench/blk_guest.py --format qcow2       # qcow2: xhyve vs QEMU, and vs xhyve raw
    python3 bench/blk_guest.py --format qcow2 --alloc   # first-write allocation

With --format qcow2 the filled image is converted to qcow2 (64 KiB clusters, so every
cluster is allocated and no request allocates) and both VMMs open it as qcow2; xhyve also
runs on the raw image, for the qcow2/raw ratio. With --alloc every run gets a new, empty
qcow2 image instead (qemu-img create, 64 KiB clusters), so writes allocate: each seqwrite
request fills one new cluster; randwrite allocates until every cluster has been hit (about
a tenth of its requests with the defaults). Only the write workloads run.

Both disks go through the host page cache with write-back semantics (xhyve's default; QEMU
cache=writeback), so this measures the VMMs' request paths, not the host's disk. The image
is filled with data before the first run, so reads return data from the page cache.
Runs alternate which VMM goes first; the median of RUNS runs counts.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PM_HZ = 3579545
RESULT = re.compile(
    r"^blkbench (\w+) reqs (\d+) bytes (\d+) qd (\d+) ticks (\d+) notifies (\d+) ring (\d)\s*$",
    re.MULTILINE,
)
PM_PORT = re.compile(r"pm port ([0-9a-f]+)")
WORKLOADS = ["seqread", "seqwrite", "randread", "randwrite"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ring0", action="store_true",
                   help="run the guest's submit/poll loop at CPL 0 (emulated on the build "
                   "machines, so the guest caps the rate) instead of CPL 3 (native)")
    p.add_argument("--runs", type=int, default=5, help="runs per VMM per workload (median)")
    p.add_argument("--seq-count", type=int, default=4096, help="64 KiB requests per seq run")
    p.add_argument("--rand-count", type=int, default=40000, help="4 KiB requests per random run")
    p.add_argument("--qd", type=int, default=32, help="requests in flight (1-32)")
    p.add_argument("--size-mib", type=int, default=256, help="image size")
    p.add_argument("--image", default=os.path.join(ROOT, "bench", "out", "blk_guest.img"))
    p.add_argument("--cache", choices=["writeback", "writethrough"], default="writeback",
                   help="writethrough: xhyve ',sync' (O_SYNC) against QEMU cache=writethrough, "
                   "with the guest not negotiating FLUSH (else QEMU turns its write cache on)")
    p.add_argument("--xhyve", default=os.path.join(ROOT, "target", "release", "xhyve"))
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--timeout", type=float, default=120, help="seconds per VM run")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--format", choices=["raw", "qcow2"], default="raw",
                   help="image format both VMMs open (qcow2: also xhyve on raw)")
    p.add_argument("--alloc", action="store_true",
                   help="with --format qcow2: a new empty image for every run, so writes "
                   "allocate (write workloads only)")
    args = p.parse_args()
    if args.alloc and args.format != "qcow2":
        p.error("--alloc needs --format qcow2")
    if args.alloc and p.get_default("workloads") == args.workloads:
        args.workloads = "seqwrite,randwrite"
    return args


def build_guest(out_dir):
    subprocess.run(["sh", os.path.join(ROOT, "test", "guests", "build.sh"), out_dir],
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.join(out_dir, "guest.elf")


def make_image(path, size_mib):
    """A fully written image (no holes): a 1 MiB random block, each copy tagged by its index."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    block = bytearray(os.urandom(1 << 20))
    with open(path, "wb") as f:
        for i in range(size_mib):
            block[0:8] = i.to_bytes(8, "little")
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


def qcow2_path(args):
    return os.path.splitext(args.image)[0] + ".qcow2"


def make_qcow2(args):
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
                    "cluster_size=65536", args.image, qcow2_path(args)], check=True)


def empty_qcow2(args):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536",
                    qcow2_path(args), f"{args.size_mib}M"], check=True)


def xhyve_cmd(args, guest, command, fmt=None):
    fmt = fmt or args.format
    image = qcow2_path(args) + ",format=qcow2" if fmt == "qcow2" else args.image
    disk = image + (",sync" if args.cache == "writethrough" else "")
    return [args.xhyve, "-A", "-m", "256M", "-s", "0:0,hostbridge", "-s", f"4,virtio-blk,{disk}",
            "-s", "31,lpc", "-l", "com1,stdio", "-f", f"multiboot,{guest},,{command}"]


def qemu_cmd(args, guest, command):
    return [args.qemu, "-accel", "kvm,kernel-irqchip=on", "-M", "pc", "-m", "256M",
            "-kernel", guest, "-append", f"{command} qemu",
            "-drive", f"file={qcow2_path(args) if args.format == 'qcow2' else args.image},"
            f"format={args.format},if=none,id=blk0,cache={args.cache},aio=threads",
            "-device", "virtio-blk-pci,drive=blk0",
            "-serial", "stdio", "-display", "none", "-monitor", "none", "-no-reboot"]


def run_once(cmd, timeout, env):
    """Runs one VM; returns (MB/s, IOPS, notifications per request, ring, pm port), or raises
    RuntimeError with its output."""
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=timeout, env=env)
        out = p.stdout.decode(errors="replace").replace("\r", "")
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace")
        raise RuntimeError(f"timed out after {timeout} s:\n{out}") from None
    m = RESULT.search(out)
    if not m or "FAIL" in out:
        raise RuntimeError(f"no result (exit {p.returncode}):\n{out}")
    reqs, size, ticks = int(m.group(2)), int(m.group(3)), int(m.group(5))
    seconds = ticks / PM_HZ
    if seconds <= 0:
        raise RuntimeError(f"zero elapsed time:\n{out}")
    port = PM_PORT.search(out)
    return (reqs * size / seconds / 1e6, reqs / seconds, int(m.group(6)) / reqs, m.group(7),
            port.group(1) if port else "?")


def main():
    args = parse_args()
    if not os.path.exists(args.xhyve):
        sys.exit(f"{args.xhyve} not found: run cargo build --release")
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload \"{w}\": choose from {', '.join(WORKLOADS)}")
        if args.alloc and not w.endswith("write"):
            sys.exit(f"--alloc runs write workloads only, not \"{w}\"")
    env = dict(os.environ, XHYVE_IRQCHIP="kernel")
    with tempfile.TemporaryDirectory() as tmp:
        guest = build_guest(tmp)
        t = time.time()
        if args.alloc:
            empty_qcow2(args)
            what = f"image {qcow2_path(args)}: {args.size_mib} MiB, empty before every run"
        else:
            make_image(args.image, args.size_mib)
            if args.format == "qcow2":
                make_qcow2(args)
            what = (f"image {args.image} ({args.format}): {args.size_mib} MiB written in "
                    f"{time.time() - t:.1f} s")
        print(f"{what}; "
              f"cache={args.cache}, qd {args.qd}, {args.runs} runs each, guest loop in ring "
              f"{0 if args.ring0 else 3}; load average {os.getloadavg()[0]:.2f}", flush=True)
        results = {}
        for w in workloads:
            count = args.seq_count if w.startswith("seq") else args.rand_count
            command = f"blkbench {w} {count} qd {args.qd}" + (" ring0" if args.ring0 else "")
            if args.cache == "writethrough":
                command += " noflush"
            vmms = [("xhyve", xhyve_cmd(args, guest, command)),
                    ("qemu", qemu_cmd(args, guest, command))]
            if args.format == "qcow2" and not args.alloc:
                vmms.append(("xraw", xhyve_cmd(args, guest, command, "raw")))
            for run in range(args.runs):
                for name, cmd in vmms if run % 2 == 0 else vmms[::-1]:
                    if args.alloc:
                        empty_qcow2(args)
                    try:
                        mbs, iops, kicks, ring, port = run_once(cmd, args.timeout, env)
                    except RuntimeError as e:
                        sys.exit(f"{name} {w} run {run + 1}: {e}")
                    results.setdefault((w, name), []).append((mbs, iops))
                    print(f"  {w:9} {name:5} run {run + 1}: {mbs:9.1f} MB/s {iops:9.0f} IOPS "
                          f"{kicks:5.3f} notifies/req (ring {ring}, pm port 0x{port})", flush=True)
    print(f"\nmedian of {args.runs} runs (best run in the last column); load average now "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{'workload':10} {'req':>4} {'xhyve MB/s':>11} {'xhyve IOPS':>11} "
          f"{'QEMU MB/s':>10} {'QEMU IOPS':>10} {'xhyve/QEMU':>11} {'best/best':>10}")
    for w in workloads:
        xhyve, qemu = results[(w, "xhyve")], results[(w, "qemu")]
        xm = statistics.median(r[0] for r in xhyve)
        xi = statistics.median(r[1] for r in xhyve)
        qm = statistics.median(r[0] for r in qemu)
        qi = statistics.median(r[1] for r in qemu)
        best = max(r[0] for r in xhyve) / max(r[0] for r in qemu)
        size = "64k" if w.startswith("seq") else "4k"
        print(f"{w:10} {size:>4} {xm:11.1f} {xi:11.0f} {qm:10.1f} {qi:10.0f} {xm / qm:11.2f} "
              f"{best:10.2f}")
    if args.format == "qcow2" and not args.alloc:
        print(f"\nxhyve qcow2 against xhyve raw (median MB/s)")
        print(f"{'workload':10} {'qcow2':>9} {'raw':>9} {'qcow2/raw':>10}")
        for w in workloads:
            xm = statistics.median(r[0] for r in results[(w, "xhyve")])
            rm = statistics.median(r[0] for r in results[(w, "xraw")])
            print(f"{w:10} {xm:9.1f} {rm:9.1f} {xm / rm:10.2f}")

if __name__ == "__main__":
    main()
