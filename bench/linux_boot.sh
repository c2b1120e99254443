#!/usr/bin/env bash
# Linux boot benchmark: the same kernel, initrd and command line under xhyve
# (target/release/xhyve) and under qemu-system-x86_64 -accel kvm -M microvm, one after the other
# in one run, each timed from process start to the same console milestones, then a table of
# seconds and xhyve/QEMU ratios. Each run is bounded (TIMEOUT, default 300 s) and killed with
# everything it started. A benchmark, not a test: it reports, it does not judge.
#
#   bench/linux_boot.sh                       KERNEL=test/cloud/vmlinuz bench/linux_boot.sh
# Environment: KERNEL (default test/vmlinux), INITRD (default: initrd.gz beside the kernel),
# CMDLINE, MEM (1G), TIMEOUT (300), QEMU_CPU (qemu64,-cx16,-xsave), XHYVE (target/release/xhyve), NO_BUILD=1 (do not run cargo).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly OUT=$ROOT/bench/out
readonly TIMER=$ROOT/bench/boot_timer.pl
KERNEL=${KERNEL:-test/vmlinux}
INITRD=${INITRD:-$(dirname "$KERNEL")/initrd.gz}
CMDLINE=${CMDLINE:-"earlyprintk=serial console=ttyS0"}
MEM=${MEM:-1G}
TIMEOUT=${TIMEOUT:-300}
XHYVE=${XHYVE:-target/release/xhyve}
# The emulator here cannot run cmpxchg16b or xsave; xhyve hides both from CPUID, and so must
# QEMU for the same guest to get as far (KVM shows XSAVE even with -cpu qemu64).
QEMU_CPU=${QEMU_CPU:-qemu64,-cx16,-xsave}
readonly MILESTONES=(first_byte linux_version smpboot console guest_init)

cd "$ROOT"
die() {
	echo "linux_boot: $*" >&2
	exit 1
}
[[ -r $KERNEL && -r $INITRD ]] || die "$KERNEL or $INITRD missing (run test/build-linux-guest.sh)"
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
mkdir -p "$OUT"

if [[ ${NO_BUILD:-0} != 1 && $XHYVE == target/release/xhyve ]]; then
	cargo build --release -q || echo "linux_boot: cargo build failed; timing whatever binary exists" >&2
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
xhyve_result=$OUT/linux_boot-xhyve-$stamp.result
qemu_result=$OUT/linux_boot-qemu-$stamp.result

# The VMM under test may be missing or broken: that is a row of '-' and its reason, not a
# failed benchmark.
if [[ -x $XHYVE ]]; then
	echo "linux_boot: xhyve (log $OUT/linux_boot-xhyve-$stamp.log)" >&2
	"$TIMER" --timeout "$TIMEOUT" --log "$OUT/linux_boot-xhyve-$stamp.log" -- \
		"$XHYVE" -A -m "$MEM" -s 0:0,hostbridge -s 31,lpc -l com1,stdio \
		-f "kexec,$KERNEL,$INITRD,$CMDLINE" >"$xhyve_result"
else
	printf '%s -\n' "${MILESTONES[@]}" >"$xhyve_result"
	printf 'end - not-built\nlast\nlasterr %s does not exist\n' "$XHYVE" >>"$xhyve_result"
fi

echo "linux_boot: qemu microvm (log $OUT/linux_boot-qemu-$stamp.log)" >&2
"$TIMER" --timeout "$TIMEOUT" --log "$OUT/linux_boot-qemu-$stamp.log" -- \
	qemu-system-x86_64 -accel kvm -M microvm -cpu "$QEMU_CPU" -m "$MEM" -display none -monitor none -serial stdio \
	-kernel "$KERNEL" -initrd "$INITRD" -append "$CMDLINE" >"$qemu_result"

field() { awk -v k="$1" '$1 == k { $1 = ""; sub(/^ /, ""); print; exit }' "$2"; }

# xhyve/QEMU, when both reached the milestone.
ratio() {
	if [[ $1 == - || $2 == - || -z $1 || -z $2 ]]; then
		echo -
	else
		awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'
	fi
}

table=$OUT/linux_boot-$stamp.txt
{
	echo "Linux boot, $(date -u '+%F %T') UTC: kernel $KERNEL, initrd $INITRD, -m $MEM, cmdline \"$CMDLINE\"; qemu -cpu $QEMU_CPU"
	echo "host: $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg); $(qemu-system-x86_64 --version | head -1)"
	echo "seconds from process start; '-' = not reached; ratio = xhyve / qemu"
	printf '%-14s %10s %10s %8s\n' milestone xhyve qemu ratio
	for m in "${MILESTONES[@]}"; do
		x=$(field "$m" "$xhyve_result")
		q=$(field "$m" "$qemu_result")
		printf '%-14s %10s %10s %8s\n' "$m" "$x" "$q" "$(ratio "$x" "$q")"
	done
	x_end=$(field end "$xhyve_result")
	q_end=$(field end "$qemu_result")
	printf '%-14s %10s %10s %8s\n' "end" "${x_end%% *}" "${q_end%% *}" "$(ratio "${x_end%% *}" "${q_end%% *}")"
	echo "xhyve ended: ${x_end#* }; last console line: $(field last "$xhyve_result" | cut -c1-100)"
	echo "             last stderr line: $(field lasterr "$xhyve_result" | cut -c1-100)"
	echo "qemu ended:  ${q_end#* }; last console line: $(field last "$qemu_result" | cut -c1-100)"
} | tee "$table"
echo "table: $table" >&2
