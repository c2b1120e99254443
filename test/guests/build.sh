#!/bin/sh
# Builds guest.elf into $1 (default: /tmp/xhyve-guests) with the host toolchain
# (no cross compiler). The Rust test harness (tests/common) runs this script;
# run it by hand to try the guests under QEMU (see README).
set -eu
src=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/xhyve-guests}
mkdir -p "$out"
CFLAGS="-m32 -march=i686 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2 -Wall -Wextra -fno-asynchronous-unwind-tables"
for f in entry.S trampoline.S lib.c main.c pciscan.c rtc.c highmem.c smp.c virtio.c net.c; do
    cc $CFLAGS -c "$src/$f" -o "$out/${f%.*}.o"
done
ld -m elf_i386 -nostdlib --no-warn-rwx-segments -T "$src/link.ld" -o "$out/guest.elf" \
    "$out/entry.o" "$out/trampoline.o" "$out/lib.o" "$out/main.o" \
    "$out/pciscan.o" "$out/rtc.o" "$out/highmem.o" "$out/smp.o" "$out/virtio.o" "$out/net.o"
