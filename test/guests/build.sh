#!/bin/sh
# Builds guest.elf into $1 (default: /tmp/xhyve-guests) with the host toolchain, exactly as
# the Rust test harness does. For running the guests by hand under QEMU.
# Every .c and .S file here is part of the one guest image; entry.S is linked first.
set -eu
src=$(cd "$(dirname "$0")" && pwd)
out=${1:-/tmp/xhyve-guests}
mkdir -p "$out"
CFLAGS="-m32 -march=i686 -ffreestanding -fno-pic -fno-stack-protector -nostdlib -O2 -Wall -Wextra -fno-asynchronous-unwind-tables"
objects="$out/entry.o"
for f in "$src"/*.c "$src"/*.S; do
    name=$(basename "$f")
    obj="$out/${name%.*}.o"
    cc $CFLAGS -c "$f" -o "$obj"
    [ "$name" = entry.S ] || objects="$objects $obj"
done
# shellcheck disable=SC2086 # the object list is meant to split into words
ld -m elf_i386 -nostdlib --no-warn-rwx-segments -T "$src/link.ld" -o "$out/guest.elf" $objects
