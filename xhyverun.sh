#!/bin/sh
# Boots the Debian Linux test guest under xhyve, as xhyve's own xhyverun.sh did.
# Every variable can be overridden from the environment, e.g.
#   SMP="-c 2" IMG_HDD="-s 4,virtio-blk,disk.img" ./xhyverun.sh
# An empty value drops the option: ACPI= ./xhyverun.sh
set -eu

cd "$(dirname "$0")"

# Linux
# The default is the xhyve-rs test kernel (test/build-test-kernel.sh: Debian's linux-source-6.1,
# tinyconfig plus every driver xhyve offers, built in) with a busybox initramfs. It boots to a
# shell on the build machines, whose KVM emulates ring-0 guest code at about 1.4 M instructions/s
# and whose SYSCALL is defective (README, "Linux on emulating hosts"), on the stock command
# line. On ordinary hardware the stock Debian kernel boots as well:
# KERNEL=test/vmlinux INITRD=test/initrd.gz CMDLINE="console=ttyS0"
# (built by test/build-linux-guest.sh; test/vmlinuz is its bzImage, test/cloud/ the lz4 cloud
# kernel). Setting KERNEL to anything else skips building the test kernel.
TEST_KERNEL=test/build/test-kernel/vmlinux
TEST_INITRD=test/build/test-kernel/initramfs.cpio
KERNEL="${KERNEL-$TEST_KERNEL}"
if [ "$KERNEL" = "$TEST_KERNEL" ]; then
	INITRD="${INITRD-$TEST_INITRD}"
	CMDLINE="${CMDLINE-console=ttyS0}"
else
	INITRD="${INITRD-test/initrd.gz}"
	CMDLINE="${CMDLINE-earlyprintk=serial console=ttyS0}"
fi

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
	if [ "$KERNEL" = "$TEST_KERNEL" ]; then
		echo "xhyverun.sh: $KERNEL or $INITRD missing; building the test kernel (a few minutes, once)" >&2
		builder=test/build-test-kernel.sh
	else
		echo "xhyverun.sh: $KERNEL or $INITRD missing; building the Linux guest from Debian packages" >&2
		builder=test/build-linux-guest.sh
	fi
	if [ "$(id -u)" -eq 0 ]; then
		"$builder" >/dev/null
	else
		sudo "$builder" >/dev/null
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
