#!/usr/bin/env python3
"""Start-up latency and memory overhead: xhyve against QEMU on the same multiboot guest.

Both VMMs boot bench/guests/startup.S with 1 GiB of RAM and COM1 on their stdout. Runs
alternate between the two VMMs, so that host noise (the build machines are shared) falls on
both alike. The result is a table and the xhyve/QEMU ratios, checked against the targets of
issue 2 item 10: at most half QEMU's start latency, at most a quarter of its memory overhead.

Run from anywhere, after `cargo build --release`:  python3 bench/startup.py
"""

import argparse
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_DIR = os.path.join(REPO, "bench", "guests")
GUEST_RAM = "1G"
GUEST_RAM_BYTES = 1 << 30
GUEST_MARKER = b"X"
LATENCY_TARGET = 0.5
MEMORY_TARGET = 0.25
KIB = 1024
MIB = 1024 * 1024


class BenchError(Exception):
    pass


@dataclass
class Vmm:
    name: str
    argv: list
    latencies: list = field(default_factory=list)
    memory: list = field(default_factory=list)
    early_output: bytes = b""


def build_guest(workdir):
    source = os.path.join(GUEST_DIR, "startup.S")
    script = os.path.join(GUEST_DIR, "link.ld")
    obj = os.path.join(workdir, "startup.o")
    elf = os.path.join(workdir, "startup.elf")
    for argv in (["as", "--32", "-o", obj, source],
                 ["ld", "-m", "elf_i386", "-T", script, "-o", elf, obj]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{argv[0]} failed: {done.stderr.strip()}")
    return elf


def stop(proc):
    """Ask the guest to power off (a byte on COM1), then escalate; never leave a VMM behind."""
    if proc.poll() is None:
        try:
            proc.stdin.write(b"q")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
    for sig, grace in ((None, 1.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for pipe in (proc.stdin, proc.stdout):
        try:
            pipe.close()
        except OSError:
            pass


def start_and_wait_for_marker(vmm, timeout):
    """Fork/exec the VMM; return (process, seconds until the guest's marker byte on stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(vmm.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, bufsize=0)
    seen = b""
    fd = proc.stdout.fileno()
    while True:
        left = timeout - (time.perf_counter() - t0)
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            stop(proc)
            raise BenchError(f"{vmm.name}: no guest byte within {timeout:.0f} s")
        chunk = os.read(fd, 4096)
        elapsed = time.perf_counter() - t0
        if not chunk:
            stop(proc)
            raise BenchError(f"{vmm.name}: exited (code {proc.wait()}) before the guest wrote")
        seen += chunk
        at = seen.find(GUEST_MARKER)
        if at >= 0:
            vmm.early_output = seen[:at]
            return proc, elapsed


def read_kib_fields(path, names):
    values = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in names:
                values[key] = int(rest.split()[0])
    return values


def guest_ram_rss_kib(pid):
    """Resident KiB of the mappings that hold guest RAM: those sized like the guest's RAM.

    Both VMMs map guest RAM as one anonymous region (QEMU may round it up for alignment), so
    a mapping of 1 GiB to 1 GiB + 8 MiB is guest RAM; its Rss is what the guest touched.
    """
    total = 0
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split()[0] if line.strip() else ""
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                size = end - start
            elif first == "Rss:" and GUEST_RAM_BYTES <= size <= GUEST_RAM_BYTES + 8 * MIB:
                total += int(line.split()[1])
    return total


def measure_memory(pid):
    status = read_kib_fields(f"/proc/{pid}/status",
                             {"VmRSS", "RssAnon", "RssFile", "RssShmem", "Threads"})
    rollup = read_kib_fields(f"/proc/{pid}/smaps_rollup", {"Pss"})
    guest = guest_ram_rss_kib(pid)
    return {
        "rss": status["VmRSS"],
        "anon": status["RssAnon"],
        "file": status["RssFile"],
        "shmem": status["RssShmem"],
        "pss": rollup["Pss"],
        "guest": guest,
        "beyond_guest": status["VmRSS"] - guest,
        "threads": status["Threads"],
    }


def run_once(vmm, settle, timeout, want_memory):
    proc, latency = start_and_wait_for_marker(vmm, timeout)
    try:
        vmm.latencies.append(latency)
        if want_memory:
            time.sleep(settle)
            if proc.poll() is not None:
                raise BenchError(f"{vmm.name}: exited (code {proc.returncode}) while waiting")
            vmm.memory.append(measure_memory(proc.pid))
    finally:
        stop(proc)


def percentile(values, fraction):
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(fraction * (len(ordered) - 1))))
    return ordered[rank]


def ms(seconds):
    return f"{seconds * 1000:8.1f} ms"


def mib(kib_value):
    return f"{kib_value / KIB:8.2f} MiB"


def report(xhyve, qemu, qemu_machine):
    print()
    print(f"start latency, process start -> first guest byte on stdout "
          f"({len(xhyve.latencies)} / {len(qemu.latencies)} runs)")
    print(f"  {'':24}{'xhyve':>12}{'qemu':>12}{'xhyve/qemu':>12}")
    rows = (("median", statistics.median), ("p90", lambda v: percentile(v, 0.9)), ("min", min))
    for label, statistic in rows:
        x = statistic(xhyve.latencies)
        q = statistic(qemu.latencies)
        print(f"  {label:24}{ms(x):>12}{ms(q):>12}{x / q:12.3f}")

    print()
    print(f"memory 0.5 s after the first byte, -m {GUEST_RAM} "
          f"(median of {len(xhyve.memory)} / {len(qemu.memory)} runs)")
    print(f"  {'':24}{'xhyve':>12}{'qemu':>12}{'xhyve/qemu':>12}")
    labels = (("VmRSS", "rss"), ("  RssAnon", "anon"), ("  RssFile", "file"),
              ("  RssShmem", "shmem"), ("PSS (smaps_rollup)", "pss"),
              ("guest RAM resident", "guest"), ("VmRSS - guest RAM", "beyond_guest"))
    medians = {}
    for label, key in labels:
        x = statistics.median(m[key] for m in xhyve.memory)
        q = statistics.median(m[key] for m in qemu.memory)
        medians[key] = (x, q)
        ratio = f"{x / q:12.3f}" if q else f"{'-':>12}"
        print(f"  {label:24}{mib(x):>12}{mib(q):>12}{ratio}")
    xt = statistics.median(m["threads"] for m in xhyve.memory)
    qt = statistics.median(m["threads"] for m in qemu.memory)
    print(f"  {'threads':24}{xt:12.0f}{qt:12.0f}")

    latency_ratio = statistics.median(xhyve.latencies) / statistics.median(qemu.latencies)
    x_over, q_over = medians["rss"]
    memory_ratio = x_over / q_over
    x_exact, q_exact = medians["beyond_guest"]
    print()
    print(f"QEMU: qemu-system-x86_64 -M {qemu_machine} -accel kvm")
    if xhyve.early_output or qemu.early_output:
        print(f"output before the guest byte: xhyve {xhyve.early_output!r}, "
              f"qemu {qemu.early_output!r}")
    verdict = {True: "MET", False: "MISSED"}
    print(f"start latency ratio (median)     {latency_ratio:6.3f}  target <= {LATENCY_TARGET}"
          f"  {verdict[latency_ratio <= LATENCY_TARGET]}")
    print(f"memory overhead ratio (VmRSS)    {memory_ratio:6.3f}  target <= {MEMORY_TARGET}"
          f"  {verdict[memory_ratio <= MEMORY_TARGET]}")
    print(f"  same, VmRSS - guest RAM        {x_exact / q_exact:6.3f}  "
          f"(xhyve {x_exact / KIB:.1f} MiB, qemu {q_exact / KIB:.1f} MiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xhyve", default=os.path.join(REPO, "target", "release", "xhyve"))
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--qemu-machine", default="microvm",
                        help="microvm (default: no firmware to emulate) or pc (SeaBIOS, "
                             "about 8 s per start on the emulating build hosts)")
    parser.add_argument("--latency-runs", type=int, default=20)
    parser.add_argument("--memory-runs", type=int, default=5)
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds between the first byte and the memory reading")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for one guest's first byte")
    parser.add_argument("--deadline", type=float, default=170.0,
                        help="stop starting new runs after this many seconds")
    args = parser.parse_args()

    if not os.access(args.xhyve, os.X_OK):
        raise BenchError(f"no xhyve binary at {args.xhyve}: run `cargo build --release`")
    if shutil.which(args.qemu) is None:
        raise BenchError(f"{args.qemu} not found: apt-get install -y qemu-system-x86")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is not usable")

    with tempfile.TemporaryDirectory(prefix="xhyve-bench-") as workdir:
        elf = build_guest(workdir)
        xhyve = Vmm("xhyve", [args.xhyve, "-m", GUEST_RAM, "-s", "0:0,hostbridge",
                              "-s", "31,lpc", "-l", "com1,stdio", "-f", f"multiboot,{elf}"])
        qemu = Vmm("qemu", [args.qemu, "-M", args.qemu_machine, "-accel", "kvm",
                            "-m", GUEST_RAM, "-display", "none", "-monitor", "none",
                            "-serial", "stdio", "-kernel", elf])
        qemu_version = subprocess.run([args.qemu, "--version"], capture_output=True,
                                      text=True).stdout.splitlines()[0]
        print(f"xhyve: {args.xhyve}")
        print(f"qemu:  {qemu_version}")
        print(f"host:  {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

        began = time.monotonic()
        # One untimed start each, so that neither pays for a cold page cache.
        for vmm in (xhyve, qemu):
            run_once(vmm, args.settle, args.timeout, want_memory=False)
            vmm.latencies.clear()
        runs = max(args.latency_runs, args.memory_runs)
        for i in range(runs):
            if time.monotonic() - began > args.deadline:
                print(f"deadline reached after {i} rounds", file=sys.stderr)
                break
            # Alternate which VMM goes first, so neither always follows the other's teardown.
            order = (xhyve, qemu) if i % 2 == 0 else (qemu, xhyve)
            for vmm in order:
                want_memory = i < args.memory_runs
                run_once(vmm, args.settle, args.timeout, want_memory)
                if i >= args.latency_runs:
                    vmm.latencies.pop()
            print(f"round {i + 1}/{runs}: xhyve {ms(xhyve.latencies[-1]).strip()}, "
                  f"qemu {ms(qemu.latencies[-1]).strip()}", flush=True)
        if not xhyve.memory or not qemu.memory:
            raise BenchError("no complete round")
        report(xhyve, qemu, args.qemu_machine)
        print(f"total {time.monotonic() - began:.1f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        sys.exit(1)
