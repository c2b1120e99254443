#!/usr/bin/env bash
# Writes the test kernel's initramfs: busybox-static (the Debian package),
# test/initramfs/init-test as /init and test/initramfs/vsock-echo.c compiled freestanding and
# static as /bin/vsock-echo (gcc, with the headers of libc6-dev and linux-libc-dev, which
# test/build-test-kernel.sh installs), as an uncompressed newc cpio. Uncompressed because the
# kernel unpacks it with ring-0 code, which the build machines emulate; written by the kernel's
# own gen_init_cpio from a file list, so /dev/console needs no mknod and nothing needs root.
#   test/build-test-initramfs.sh GEN_INIT_CPIO OUT.cpio
# (test/build-test-kernel.sh calls it with the gen_init_cpio of the kernel it built.)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly INIT_SRC=$ROOT/test/initramfs/init-test
readonly BUSYBOX=/bin/busybox
readonly VSOCK_ECHO_SRC=$ROOT/test/initramfs/vsock-echo.c
gen=${1:?usage: $0 GEN_INIT_CPIO OUT.cpio}
out=${2:?usage: $0 GEN_INIT_CPIO OUT.cpio}

"$BUSYBOX" --list-full >/dev/null 2>&1 || {
	echo "build-test-initramfs: $BUSYBOX is not busybox-static (apt-get install busybox-static)" >&2
	exit 1
}
# Freestanding and static (see its header): a few KB, where static glibc would add 700 KB that
# every boot unpacks with emulated ring-0 code.
gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-asynchronous-unwind-tables -fno-pie -no-pie \
	-Os -s -Wall -Wextra -Werror -o "$out.vsock-echo" "$VSOCK_ECHO_SRC" || {
	echo "build-test-initramfs: cannot build $VSOCK_ECHO_SRC (apt-get install gcc libc6-dev)" >&2
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
	echo "file /bin/vsock-echo $out.vsock-echo 0755 0 0"
	"$BUSYBOX" --list-full | LC_ALL=C sort | while read -r applet; do
		[[ $applet == bin/busybox ]] || echo "slink /$applet /bin/busybox 0777 0 0"
	done
} >"$out.list"
"$gen" "$out.list" >"$out.tmp"
mv "$out.tmp" "$out"
rm -f "$out.list" "$out.vsock-echo"
