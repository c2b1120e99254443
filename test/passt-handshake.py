#!/usr/bin/env python3
"""Does this passt finish a handshake that the guest's side must speak first on?

No VM: this script is the "guest". It starts passt with a port forward from 127.0.0.1, holds
passt's stream socket itself (QEMU's framing: 4-byte big-endian length + Ethernet frame),
connects to the forward from the host and answers the SYN passt sends the guest with a
SYN-ACK, the way Linux does. Then it waits for passt to complete the handshake toward the
guest (the ACK of our SYN-ACK, alone or carrying data), twice:

  silent client   the host's client sends nothing after connect() (it waits for the guest to
                  speak, as `nc -l -e dd ...`, SMTP or SSH banners need);
  talking client  the host's client sends one byte right after connect().

passt 0.0~git20230309 (Debian 12) sends no ACK for the silent client: after the guest's
SYN-ACK it queues an ACK "if needed", and with no data from the host socket none is, so the
guest stays in SYN-RECV retransmitting its SYN-ACK, never accepts, and the connection dies.
Upstream fixed this in commit 9178a9e "tcp: Always send an ACK segment once the handshake is
completed" (2023-09-27). With a talking client the byte rides on a segment that ACKs the
SYN-ACK, and the connection works.

Only 127.0.0.1 carries real traffic; the frames use the addresses given to passt (guest
10.0.3.15, gateway 10.0.3.2) and never leave passt.

    python3 test/passt-handshake.py     # exit status 0 when the talking client gets through
"""

import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

GUEST_PORT = 5002
GUEST_MAC = bytes.fromhex("525400123456")


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def tcp_frame(dst_mac, src_ip, dst_ip, sport, dport, seq, ack, flags, opts=b"", data=b""):
    hdr_len = 20 + len(opts)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (hdr_len // 4) << 4, flags,
                      29200, 0, 0) + opts + data
    pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0, src_ip,
                     dst_ip)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    return dst_mac + GUEST_MAC + b"\x08\x00" + ip + tcp


class Daemon:
    def __init__(self, host_port):
        self.dir = tempfile.mkdtemp(prefix="passt-handshake-")
        os.chmod(self.dir, 0o777)  # passt started as root drops to nobody first
        path = os.path.join(self.dir, "passt.sock")
        self.proc = subprocess.Popen(
            ["passt", "-f", "-1", "-4", "-q", "--no-dhcp", "-u", "none",
             # The guest's addresses, so that no frame names a real network.
             "-a", "10.0.3.15", "-n", "24", "-g", "10.0.3.2",
             "-t", f"127.0.0.1/{host_port}:{GUEST_PORT}", "--socket", path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not os.path.exists(path):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("passt made no socket")
            time.sleep(0.05)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.inbox = b""

    def send(self, frame):
        self.sock.sendall(struct.pack("!I", len(frame)) + frame)

    def frames(self, timeout):
        """Yields (Ethernet frame) as they come, until `timeout` seconds pass."""
        deadline = time.time() + timeout
        while True:
            while len(self.inbox) >= 4:
                n = struct.unpack("!I", self.inbox[:4])[0]
                if len(self.inbox) < 4 + n:
                    break
                frame, self.inbox = self.inbox[4:4 + n], self.inbox[4 + n:]
                yield frame
            left = deadline - time.time()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                return
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                return
            self.inbox += chunk

    def stop(self):
        self.sock.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def tcp_of(frame):
    """(src ip, dst ip, sport, dport, seq, ack, flags, payload) of an IPv4 TCP frame."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 15) * 4
    ip_len = struct.unpack("!H", frame[16:18])[0]
    t = frame[14 + ihl:14 + ip_len]
    sport, dport, seq, ack, off, flags = struct.unpack("!HHIIBB", t[:14])
    return frame[26:30], frame[30:34], sport, dport, seq, ack, flags, t[(off >> 4) * 4:]


def attempt(talking):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        host_port = s.getsockname()[1]
    daemon = Daemon(host_port)
    client = None
    try:
        client = socket.create_connection(("127.0.0.1", host_port), timeout=5)
        if talking:
            client.sendall(b"g")
        syn = None
        for f in daemon.frames(5):
            t = tcp_of(f)
            if t and t[3] == GUEST_PORT and t[6] & 0x12 == 0x02:
                syn = f, t
                break
        if syn is None:
            return "passt sent the guest no SYN"
        f, (src, dst, sport, dport, seq, _, _, _) = syn
        isn = 0x1000
        # MSS 1460, SACK permitted, window scale 5: what Linux answers.
        opts = bytes.fromhex("020405b4") + bytes.fromhex("0402") + bytes.fromhex("01030305")
        daemon.send(tcp_frame(f[6:12], dst, src, dport, sport, isn, seq + 1, 0x12, opts))
        for f in daemon.frames(3):
            t = tcp_of(f)
            if t and t[2] == sport and t[3] == dport and t[6] & 0x10 and t[5] == isn + 1:
                return f"ACK of the SYN-ACK (with {len(t[7])} bytes of data)"
        return "no ACK of the SYN-ACK in 3 s"
    finally:
        if client:
            client.close()
        daemon.stop()


def main():
    if not shutil.which("passt"):
        sys.exit("passt is not installed")
    silent, talking = attempt(False), attempt(True)
    print(f"silent client:  {silent}")
    print(f"talking client: {talking}")
    if not silent.startswith("ACK"):
        print("this passt never completes a handshake the guest must speak first on "
              "(fixed upstream by 9178a9e, 2023-09-27)")
    return 0 if talking.startswith("ACK") else 1


if __name__ == "__main__":
    sys.exit(main())
