#!/bin/sh
# Boots the Debian Linux test guest under xhyve, as xhyve's own xhyverun.sh did.
# Every variable can be overridden from the environment, e.g.
#   SMP="-c 2" IMG_HDD="-s 4,virtio-blk,disk.img" ./xhyverun.sh
# An empty value drops the option: ACPI= ./xhyverun.sh
set -eu

cd "$(dirname "$0")"

# Linux
# The default kernel is the uncompressed ELF vmlinux (PVH entry). On the build machines, ring-0
# guest code is emulated at 1-2 million instructions per second, so a bzImage spends most of its
# boot decompressing itself (the generic kernel is xz: far too slow; the cloud kernel is lz4);
# vmlinux skips that step entirely. Measured with QEMU/KVM here (bench/README.md): vmlinux prints
# "Linux version" 27-40 s after start, the lz4 cloud bzImage 119-134 s, and the xz generic bzImage
# was still decompressing at 300 s. Other choices: test/vmlinuz (generic bzImage, what xhyve used) and
# test/cloud/vmlinuz with INITRD=test/cloud/initrd.gz.
KERNEL="${KERNEL-test/vmlinux}"
INITRD="${INITRD-test/initrd.gz}"
CMDLINE="${CMDLINE-earlyprintk=serial console=ttyS0}"

MEM="${MEM--m 1G}"
SMP="${SMP-}"                                         # e.g. "-c 2"
NET="${NET-}"                                         # e.g. "-s 2:0,virtio-net"
IMG_CD="${IMG_CD-}"                                   # e.g. "-s 3,ahci-cd,/path/to/file.iso"
IMG_HDD="${IMG_HDD-}"                                 # e.g. "-s 4,virtio-blk,/path/to/file.img"
PCI_DEV="${PCI_DEV--s 0:0,hostbridge -s 31,lpc}"
LPC_DEV="${LPC_DEV--l com1,stdio}"
ACPI="${ACPI--A}"
UUID="${UUID-}"                                       # e.g. "-U deadbeef-dead-dead-dead-deaddeafbeef"

XHYVE="${XHYVE-target/release/xhyve}"

if [ ! -r "$KERNEL" ] || [ ! -r "$INITRD" ]; then
	echo "xhyverun.sh: $KERNEL or $INITRD missing; building the Linux guest from Debian packages" >&2
	if [ "$(id -u)" -eq 0 ]; then
		test/build-linux-guest.sh
	else
		sudo test/build-linux-guest.sh
	fi
fi

# Always ask cargo: it rebuilds only when the sources changed, so the binary is never stale.
if [ "$XHYVE" = target/release/xhyve ]; then
	cargo build --release -q
fi

# The option variables hold several words each: word splitting is wanted here.
# shellcheck disable=SC2086
exec "$XHYVE" $ACPI $MEM $SMP $PCI_DEV $LPC_DEV $NET $IMG_CD $IMG_HDD $UUID \
	-f "kexec,$KERNEL,$INITRD,$CMDLINE"
