#!/usr/bin/env bash
# Writes the test kernel's initramfs: busybox-static (the Debian package) and
# test/initramfs/init-test as /init, as an uncompressed newc cpio. Uncompressed because the
# kernel unpacks it with ring-0 code, which the build machines emulate; written by the kernel's
# own gen_init_cpio from a file list, so /dev/console needs no mknod and nothing needs root.
#   test/build-test-initramfs.sh GEN_INIT_CPIO OUT.cpio
# (test/build-test-kernel.sh calls it with the gen_init_cpio of the kernel it built.)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly INIT_SRC=$ROOT/test/initramfs/init-test
readonly BUSYBOX=/bin/busybox
gen=${1:?usage: $0 GEN_INIT_CPIO OUT.cpio}
out=${2:?usage: $0 GEN_INIT_CPIO OUT.cpio}

"$BUSYBOX" --list-full >/dev/null 2>&1 || {
	echo "build-test-initramfs: $BUSYBOX is not busybox-static (apt-get install busybox-static)" >&2
	exit 1
}
{
	echo "dir /dev 0755 0 0"
	echo "nod /dev/console 0600 0 0 c 5 1"
	for dir in bin sbin usr usr/bin usr/sbin proc sys tmp run root etc mnt; do
		echo "dir /$dir 0755 0 0"
	done
	echo "file /bin/busybox $BUSYBOX 0755 0 0"
	echo "file /init $INIT_SRC 0755 0 0"
	"$BUSYBOX" --list-full | LC_ALL=C sort | while read -r applet; do
		[[ $applet == bin/busybox ]] || echo "slink /$applet /bin/busybox 0777 0 0"
	done
} >"$out.list"
"$gen" "$out.list" >"$out.tmp"
mv "$out.tmp" "$out"
rm -f "$out.list"
