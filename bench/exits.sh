#!/bin/sh
# Exit throughput of the interrupt controllers: user (XHYVE_IRQCHIP=user, the intc models in
# the VMM) against kernel (KVM's in-kernel irqchip). The guest (test/guests exitbench) makes
# N LAPIC EOI writes, N PIT counter reads and N PIT latch commands, timing each batch by the
# ACPI PM timer; this prints exits per second per mode (median of RUNS runs) and the ratio.
#
#   cargo build --release && bench/exits.sh [RUNS] [XHYVE]
#
# The guest runs at CPL 0, which the build machines emulate (DESIGN.md), so each figure
# includes the emulated loop instructions; the user/kernel ratio is the comparable number.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
runs=${1:-5}
xhyve=${2:-$root/target/release/xhyve}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
sh "$root/test/guests/build.sh" "$out" >/dev/null
for mode in kernel user; do
    i=0
    while [ "$i" -lt "$runs" ]; do
        XHYVE_IRQCHIP=$mode "$xhyve" -m 256M -s 0:0,hostbridge -s 31,lpc -l com1,stdio \
            -f "multiboot,$out/guest.elf,,exitbench" </dev/null |
            tr -d '\r' | sed -n "s/^exitbench \([a-z-]*\) \([0-9]*\) exits in \([0-9]*\) us$/$mode \1 \2 \3/p"
        i=$((i + 1))
    done
done | awk '
    { rate = $3 * 1000000 / $4; key = $1 " " $2; n[key]++; r[key, n[key]] = rate; kinds[$2] = 1 }
    function median(key,   i, j, t, m) {
        m = n[key]
        for (i = 1; i <= m; i++) for (j = i + 1; j <= m; j++)
            if (r[key, j] < r[key, i]) { t = r[key, i]; r[key, i] = r[key, j]; r[key, j] = t }
        return (m % 2) ? r[key, (m + 1) / 2] : (r[key, m / 2] + r[key, m / 2 + 1]) / 2
    }
    END {
        printf "%-10s %16s %16s %12s\n", "exit", "kernel exits/s", "user exits/s", "user/kernel"
        split("eoi pit-read pit-latch", order, " ")
        for (o = 1; o <= 3; o++) {
            k = order[o]
            if (!(k in kinds)) continue
            kr = median("kernel " k); ur = median("user " k)
            printf "%-10s %16.0f %16.0f %12.2f\n", k, kr, ur, ur / kr
        }
    }'
