#!/usr/bin/env bash
# Kernel-mode proof of the shared-folder devices (issue 14): the test kernel mounts a host
# directory as its root over virtio-9p or virtio-fs, runs /init from it, and /init lists,
# writes, renames across directories, hard- and sym-links, df's and deletes, printing
# "SFTEST: ..." lines; the host then checks what the guest wrote.
#
#   KERNEL=test/build/test-kernel/vmlinux INITRAMFS=test/build/test-kernel/initramfs.cpio \
#       test/sharedfs-root.sh 9p|virtiofs
#
# KERNEL needs 9p/virtiofs built in (test/kernel/xhyve-test.config on branch linuxguest);
# the share is the busybox tree of INITRAMFS. Boots run under the machine's heavy lock.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: $0 9p|virtiofs}"
: "${KERNEL:?KERNEL=path to the test kernel vmlinux}" "${INITRAMFS:?INITRAMFS=path to the test initramfs.cpio}"
xhyve="${XHYVE:-target/debug/xhyve}"
root=$(mktemp -d /tmp/xhyve-sfroot-XXXXXX)
trap 'rm -rf "$root"' EXIT
initramfs=$(realpath "$INITRAMFS")
(cd "$root" && cpio -idm --quiet < "$initramfs")
rm -f "$root/init"
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
echo "SFTEST: root $(grep ' / ' /proc/mounts)"
echo "SFTEST: host says $(cat /host-wrote.txt)"
echo hello-from-guest > /guest-wrote.txt
mkdir -p /d1 /d2 && echo moved > /d1/f && mv /d1/f /d2/g && echo "SFTEST: renamed $(cat /d2/g)"
ln /d2/g /d2/hard && ln -s /d2/g /d2/sym && echo "SFTEST: links $(stat -c %h /d2/g) $(readlink /d2/sym)"
df / | tail -1 | sed 's/^/SFTEST: df /'
rm /d2/hard /d2/sym /d2/g && rmdir /d1 /d2 && echo "SFTEST: deleted"
echo "SFTEST: done"
poweroff -f
INIT
chmod +x "$root/init"
echo host-file-content > "$root/host-wrote.txt"
case "$kind" in
9p) dev="virtio-9p,$root,tag=root9"; args="root=root9 rootfstype=9p rootflags=trans=virtio,version=9p2000.L,msize=262144" ;;
virtiofs) dev="virtio-fs,$root,tag=rootfs"; args="root=rootfs rootfstype=virtiofs" ;;
*) echo "usage: $0 9p|virtiofs" >&2; exit 64 ;;
esac
log=$(mktemp)
flock /tmp/xhyve-heavy.lock timeout "${TIMEOUT:-900}" "$xhyve" -m 512M -c 1 -s 0:0,hostbridge -s 31,lpc \
    -s "3,$dev" -l com1,stdio \
    -f "kexec,$KERNEL,,console=ttyS0 noxsave clearcpuid=popcnt,smap,cx16 $args rw init=/init" \
    </dev/null >"$log" 2>&1 || true
grep SFTEST "$log" || { tail -n 30 "$log" >&2; echo "sharedfs-root $kind: FAILED (no SFTEST lines)" >&2; exit 1; }
grep -q "SFTEST: done" "$log" && [ "$(cat "$root/guest-wrote.txt" 2>/dev/null)" = hello-from-guest ] &&
    [ ! -e "$root/d1" ] && { echo "sharedfs-root $kind: ok"; exit 0; }
echo "sharedfs-root $kind: FAILED" >&2
exit 1
