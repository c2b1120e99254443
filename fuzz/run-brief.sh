#!/usr/bin/env bash
# Runs every fuzz target briefly (CI): installs cargo-fuzz if missing, builds the targets once,
# then fuzzes each for FUZZ_SECONDS (default 30) and prints the executions it ran. A crash
# fails the script; its input is left in fuzz/artifacts/TARGET/.
#
# Only the stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it accept the sanitizer flags
# cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1

# A missing tool or a failed build is the machine's problem, not a finding: say so loudly and
# let the tests' verdict stand. Only a crash found by a fuzzer fails this script.
skip() {
    echo "fuzz/run-brief.sh: FUZZING SKIPPED: $*" >&2
    exit 0
}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run-brief.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz || skip "cargo install cargo-fuzz failed"
fi

cargo fuzz build || skip "cargo fuzz build failed"

# Targets with a known, filed crash that a brief run would find again, so that CI still
# guards every other target: FUZZ_SKIP="target ..." (none today).
skip_targets=" ${FUZZ_SKIP-} "

status=0
for target in $(cargo fuzz list); do
    if [[ $skip_targets == *" $target "* ]]; then
        echo "fuzz $target: SKIPPED (known crash, see fuzz/run-brief.sh)"
        continue
    fi
    log=$(mktemp)
    mkdir -p "corpus/$target"
    # libFuzzer stops itself at -max_total_time; timeout is the backstop if it hangs.
    if timeout $((seconds + 60)) cargo fuzz run "$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
        tail -n 40 "$log" >&2
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "fuzz $target: ${execs:-?} executions in ${seconds} s: $result"
    rm -f "$log"
done
exit $status
