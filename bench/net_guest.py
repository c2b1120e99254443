#!/usr/bin/env python3
"""TCP throughput through a Linux guest's network, host -> guest and guest -> host.

The same guest loop (the xhyve-rs test kernel and its busybox initramfs, `ip=dhcp`) runs on:
  user        xhyve, the built-in network (`-s 2,virtio-net`, libslirp)
  passt       xhyve, `-s 2,virtio-net,socket=PATH` to Debian's passt, started here
  qemu-user   QEMU `-accel tcg`, `-netdev user` (the same libslirp) on virtio-net-pci
  qemu-passt  QEMU `-accel tcg`, `-netdev stream` to passt (QEMU 7.2 and later)

Both directions go through a TCP port forward from 127.0.0.1 (hostfwd= for libslirp, -t for
passt); the guest never sends anywhere else:
  host -> guest: the guest runs `nc -l -p 5001 -e wc -c`; this script connects, sends N MiB,
                 closes its sending side and waits for the byte count the guest sends back,
                 so the clock stops when the guest's user space has read everything.
  guest -> host: the guest runs `nc -l -p 5002 -e /tmp/g2h`, a script that reads one byte
                 and then runs `dd if=/dev/zero bs=16k count=...`; this script connects,
                 sends that byte and reads to the end. The byte is for passt: before 2023-09
                 it never completes the handshake of a forwarded connection whose host
                 client is silent (test/passt-handshake.py), so `nc -l -e dd ...` alone
                 stalls there (--silent shows it).
Rates are MB/s (10^6 bytes) of payload, timed on the host from connect to the last byte.

What the figures mean on the build machines: their KVM emulates every guest instruction at
CPL 0 (~1.4 M instructions/s; ring 3 runs natively), so the guest's own TCP/IP stack and
virtio-net driver, not the VMM or the back end, bound every xhyve figure. QEMU here cannot
use KVM at all (it stops on `lock cmpxchg16b`), so its figures come from TCG, QEMU's own
binary translator, which runs ring 0 at a different (much higher) speed. The xhyve/QEMU
ratios therefore compare two emulators of the guest kernel more than two network paths; the
user/passt ratio (same VMM, same guest, only the back end differs) and `cargo bench --bench
net` (the back ends alone, no guest) are the comparisons of our own code.

    cargo build --release
    flock /tmp/xhyve-heavy.lock python3 bench/net_guest.py [--mib 4] [--runs 2] [--only user,qemu-user]
"""

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "test/build/test-kernel/vmlinux")
INITRAMFS = os.path.join(ROOT, "test/build/test-kernel/initramfs.cpio")
PROMPT = b"xhyve-guest:/# "
H2G_PORT, G2H_PORT = 5001, 5002
BACK_ENDS = ["user", "passt", "qemu-user", "qemu-passt"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=4, help="MiB per transfer (default 4)")
    p.add_argument("--runs", type=int, default=2, help="transfers per direction and boot")
    p.add_argument("--only", default=",".join(BACK_ENDS), help="back ends to run")
    p.add_argument("--xhyve", default=os.path.join(ROOT, "target/release/xhyve"))
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--boot-timeout", type=float, default=900)
    p.add_argument("--transfer-timeout", type=float, default=600)
    p.add_argument("--silent", action="store_true",
                   help="guest -> host: the host's client sends nothing before the guest's data "
                        "(passt before 2023-09 never completes that handshake)")
    return p.parse_args()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Console:
    """A VMM whose COM1 is its stdin/stdout."""

    def __init__(self, name, cmd, env=None):
        self.name = name
        self.out = bytearray()
        self.lock = threading.Lock()
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            chunk = self.proc.stdout.read1(4096)
            if not chunk:
                return
            with self.lock:
                self.out += chunk

    def text(self, start=0):
        with self.lock:
            return bytes(self.out[start:])

    def mark(self):
        with self.lock:
            return len(self.out)

    def wait_for(self, needle, timeout, start=0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            at = self.text(start).find(needle)
            if at >= 0:
                return start + at + len(needle)
            if self.proc.poll() is not None:
                time.sleep(0.3)
                if self.text(start).find(needle) >= 0:
                    return self.mark()
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before "
                                   f"{needle!r}:\n{self.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: no {needle!r} in {timeout:.0f} s:\n{self.tail()}")

    def type(self, line):
        # A guest whose ring 0 is emulated drains the UART slowly: type as a person would.
        data = (line + "\n").encode()
        for i in range(0, len(data), 4):
            self.proc.stdin.write(data[i:i + 4])
            self.proc.stdin.flush()
            time.sleep(0.03)

    def tail(self, n=3000):
        return self.text()[-n:].decode(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.type("poweroff -f")
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


class Passt:
    def __init__(self, h2g, g2h):
        self.dir = tempfile.mkdtemp(prefix="xhyve-bench-passt-")
        # passt started as root drops to nobody before it creates its socket.
        os.chmod(self.dir, 0o777)
        self.socket = os.path.join(self.dir, "passt.sock")
        self.proc = subprocess.Popen(
            ["passt", "-f", "-1", "-4", "-D", "none", "--no-dhcp-dns", "--no-dhcp-search",
             "-u", "none", "-t", f"127.0.0.1/{h2g}:{H2G_PORT}", "-t", f"127.0.0.1/{g2h}:{G2H_PORT}",
             "--socket", self.socket],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not os.path.exists(self.socket):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("passt made no socket")
            time.sleep(0.05)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def vmm_command(args, back_end, h2g, g2h, passt):
    cmdline = "console=ttyS0 ip=dhcp"
    if back_end.startswith("qemu"):
        if back_end == "qemu-user":
            netdev = (f"user,id=n0,hostfwd=tcp:127.0.0.1:{h2g}-:{H2G_PORT},"
                      f"hostfwd=tcp:127.0.0.1:{g2h}-:{G2H_PORT}")
        else:
            netdev = f"stream,id=n0,server=off,addr.type=unix,addr.path={passt.socket}"
        return [args.qemu, "-accel", "tcg", "-M", "pc", "-m", "256M", "-kernel", KERNEL,
                "-initrd", INITRAMFS, "-append", cmdline, "-netdev", netdev,
                "-device", "virtio-net-pci,netdev=n0", "-serial", "stdio", "-display", "none",
                "-monitor", "none", "-no-reboot"], None
    if back_end == "user":
        net = (f"2,virtio-net,dns=off,hostfwd=tcp:127.0.0.1:{h2g}-:{H2G_PORT},"
               f"hostfwd=tcp:127.0.0.1:{g2h}-:{G2H_PORT}")
    else:
        net = f"2,virtio-net,socket={passt.socket}"
    return [args.xhyve, "-A", "-m", "256M", "-s", "0:0,hostbridge", "-s", "31,lpc", "-s", net,
            "-l", "com1,stdio", "-f",
            f"kexec,{KERNEL},{INITRAMFS},{cmdline}"], \
        dict(os.environ, XHYVE_IRQCHIP="kernel", XHYVE_LOG="info")


def connect(port, vm, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except OSError:
            if vm.proc.poll() is not None:
                raise RuntimeError(f"{vm.name} exited:\n{vm.tail()}")
            time.sleep(0.2)
    raise RuntimeError(f"cannot connect to 127.0.0.1:{port}")


def host_to_guest(vm, port, size, timeout, _silent):
    mark = vm.mark()
    vm.type(f"nc -l -p {H2G_PORT} -e wc -c")
    vm.wait_for(f"-e wc -c".encode(), 60, mark)
    time.sleep(1.0)
    chunk = b"\x5a" * 65536
    for attempt in range(20):
        s = connect(port, vm, timeout)
        s.settimeout(timeout)
        start = time.time()
        try:
            sent = 0
            while sent < size:
                n = min(len(chunk), size - sent)
                s.sendall(chunk[:n])
                sent += n
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                got = s.recv(64)
                if not got:
                    break
                reply += got
            elapsed = time.time() - start
        except (ConnectionResetError, BrokenPipeError):
            # The forward accepted before the guest listened (libslirp, passt): again.
            s.close()
            time.sleep(0.5)
            continue
        s.close()
        if not reply.strip():
            time.sleep(0.5)
            continue
        if int(reply.strip()) != size:
            raise RuntimeError(f"the guest counted {reply!r}, {size} sent")
        vm.wait_for(PROMPT, 120, mark)
        return size / elapsed / 1e6
    raise RuntimeError(f"host -> guest: no transfer:\n{vm.tail()}")


def guest_to_host(vm, port, size, timeout, silent):
    mark = vm.mark()
    count = size // 16384
    if silent:
        vm.type(f"nc -l -p {G2H_PORT} -e dd if=/dev/zero bs=16k count={count}")
    else:
        # The guest waits for the client's first byte (reads it, so that closing the
        # socket sends a FIN, not a reset), then sends.
        vm.type(f"printf 'dd bs=1 count=1 of=/dev/null 2>/dev/null\\nexec dd if=/dev/zero "
                f"bs=16k count=%s\\n' {count} > /tmp/g2h && chmod +x /tmp/g2h")
        vm.wait_for(PROMPT, 60, mark)
        mark = vm.mark()
        vm.type(f"nc -l -p {G2H_PORT} -e /tmp/g2h # count={count}")
    vm.wait_for(f"count={count}".encode(), 60, mark)
    time.sleep(1.0)
    # A silent client never gets through passt before 2023-09: do not retry for long.
    for attempt in range(2 if silent else 20):
        s = connect(port, vm, timeout)
        s.settimeout(timeout)
        start = time.time()
        got = 0
        try:
            if not silent:
                s.sendall(b"g")
            while True:
                data = s.recv(1 << 16)
                if not data:
                    break
                got += len(data)
        except (ConnectionResetError, BrokenPipeError):
            pass
        elapsed = time.time() - start
        s.close()
        if got == 0:
            time.sleep(0.5)
            continue
        if got != count * 16384:
            raise RuntimeError(f"guest -> host: {got} bytes, expected {count * 16384}")
        vm.wait_for(PROMPT, 120, mark)
        return got / elapsed / 1e6
    raise RuntimeError(f"guest -> host: no transfer:\n{vm.tail()}")


def run_back_end(args, back_end, results):
    h2g, g2h = free_port(), free_port()
    passt = Passt(h2g, g2h) if back_end.endswith("passt") else None
    cmd, env = vmm_command(args, back_end, h2g, g2h, passt)
    vm = Console(back_end, cmd, env)
    try:
        at = vm.wait_for(PROMPT, args.boot_timeout)
        boot = time.time() - vm.started
        lease = re.search(rb"IP-Config: Got DHCP answer from ([0-9.]+), my address is ([0-9.]+)",
                          vm.text())
        mtu = re.search(rb"Unable to set interface mtu to \d+", vm.text())
        print(f"{back_end}: prompt after {boot:.0f} s; "
              f"{lease.group(0).decode() if lease else 'no IP-Config lease line'}"
              f"{'; ' + mtu.group(0).decode() if mtu else ''}", flush=True)
        size = args.mib << 20
        for run in range(args.runs):
            for direction, fn, port in (("host->guest", host_to_guest, h2g),
                                        ("guest->host", guest_to_host, g2h)):
                rate = fn(vm, port, size, args.transfer_timeout, args.silent)
                results.setdefault((back_end, direction), []).append(rate)
                print(f"  {back_end:10} {direction} run {run + 1}: {rate:7.2f} MB/s", flush=True)
    finally:
        vm.stop()
        if passt:
            passt.stop()


def main():
    args = parse_args()
    for f in (KERNEL, INITRAMFS):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: run test/build-test-kernel.sh")
    chosen = [b for b in args.only.split(",") if b]
    for b in chosen:
        if b not in BACK_ENDS:
            sys.exit(f"unknown back end {b!r}: choose from {', '.join(BACK_ENDS)}")
    if any(not b.startswith("qemu") for b in chosen) and not os.path.exists(args.xhyve):
        sys.exit(f"{args.xhyve} not found: run cargo build --release")
    if any(b.endswith("passt") for b in chosen) and not shutil.which("passt"):
        print("passt not installed (apt-get install passt): skipping its back ends")
        chosen = [b for b in chosen if not b.endswith("passt")]
    if any(b.startswith("qemu") for b in chosen) and not shutil.which(args.qemu):
        print(f"{args.qemu} not installed (apt-get install qemu-system-x86): skipping QEMU")
        chosen = [b for b in chosen if not b.startswith("qemu")]
    print(f"{args.mib} MiB per transfer, {args.runs} runs per direction; load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for b in chosen:
        try:
            run_back_end(args, b, results)
        except RuntimeError as e:
            print(f"{b}: FAILED: {e}", flush=True)
    print(f"\nmedian MB/s (load average now {os.getloadavg()[0]:.2f})")
    print(f"{'back end':12} {'host->guest':>12} {'guest->host':>12}")
    med = {}
    for b in chosen:
        row = []
        for d in ("host->guest", "guest->host"):
            v = results.get((b, d))
            med[(b, d)] = statistics.median(v) if v else None
            row.append(f"{med[(b, d)]:12.2f}" if v else f"{'-':>12}")
        print(f"{b:12} {' '.join(row)}")
    print("\nratios (median against median)")
    for a, b in (("user", "passt"), ("user", "qemu-user"), ("passt", "qemu-passt")):
        for d in ("host->guest", "guest->host"):
            if med.get((a, d)) and med.get((b, d)):
                print(f"  {a}/{b} {d}: {med[(a, d)] / med[(b, d)]:.3g}")


if __name__ == "__main__":
    main()
