#!/usr/bin/env bash
# Reference boot timings of the Debian test guest under QEMU with KVM on this machine: each
# kernel (generic bzImage, cloud bzImage, generic vmlinux via PVH) on each machine type
# (microvm, pc), from process start to the first serial byte and to the kernel's milestones.
# Bounded per run (TIMEOUT, default 300 s). Logs go to bench/out/.
#
#   bench/qemu_reference.sh [KERNEL...]      (default: test/vmlinux test/cloud/vmlinuz test/vmlinuz)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly OUT=$ROOT/bench/out
readonly TIMER=$ROOT/bench/boot_timer.pl
TIMEOUT=${TIMEOUT:-300}
MACHINES=${MACHINES:-"microvm pc"}
CMDLINE=${CMDLINE:-"earlyprintk=serial console=ttyS0"}
MEM=${MEM:-1G}
# Empty: QEMU's default CPU model (qemu64), whose CX16 the emulator here cannot run
# (lock cmpxchg16b ends in a KVM internal error). QEMU_CPU=qemu64,-cx16 hides it, as xhyve does.
QEMU_CPU=${QEMU_CPU:-}

cd "$ROOT"
if (($# == 0)); then
	set -- test/vmlinux test/cloud/vmlinuz test/vmlinuz
fi
for k in "$@"; do
	[[ -r $k ]] || { echo "qemu_reference: $k missing (run test/build-linux-guest.sh)" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null ||
	{ echo "qemu_reference: qemu-system-x86_64 missing (apt-get install qemu-system-x86)" >&2; exit 1; }
mkdir -p "$OUT"

# The initrd that belongs to a kernel file: the one beside it.
initrd_for() { echo "$(dirname "$1")/initrd.gz"; }

field() { awk -v k="$1" '$1 == k { $1 = ""; sub(/^ /, ""); print; exit }' "$2"; }

stamp=$(date -u +%Y%m%dT%H%M%SZ)
table=$OUT/qemu-reference-$stamp.txt
{
	echo "QEMU reference boot timings, $(date -u '+%F %T') UTC, $(qemu-system-x86_64 --version | head -1)"
	echo "host: $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); -accel kvm -m $MEM; cmdline \"$CMDLINE\"; -cpu ${QEMU_CPU:-default}"
	echo "seconds from process start; '-' = not reached"
	printf '%-20s %-8s %10s %10s %10s %10s  %s\n' kernel machine first_byte linux_ver smpboot console "end"
} | tee "$table"

for kernel in "$@"; do
	for machine in $MACHINES; do
		name=$(echo "$kernel-$machine${QEMU_CPU:+-$QEMU_CPU}" | tr '/,' '__')
		result=$OUT/qemu-$name-$stamp.result
		"$TIMER" --timeout "$TIMEOUT" --log "$OUT/qemu-$name-$stamp.log" -- \
			qemu-system-x86_64 -accel kvm -M "$machine" -m "$MEM" ${QEMU_CPU:+-cpu "$QEMU_CPU"} \
			-display none -monitor none -serial stdio \
			-kernel "$kernel" -initrd "$(initrd_for "$kernel")" -append "$CMDLINE" >"$result"
		printf '%-20s %-8s %10s %10s %10s %10s  %s\n' "$kernel" "$machine" \
			"$(field first_byte "$result")" "$(field linux_version "$result")" \
			"$(field smpboot "$result")" "$(field console "$result")" \
			"$(field end "$result")" | tee -a "$table"
		echo "    last console line: $(field last "$result" | cut -c1-110)" | tee -a "$table"
	done
done
echo "table: $table; logs: $OUT/qemu-*-$stamp.log"
