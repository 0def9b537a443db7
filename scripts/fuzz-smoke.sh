#!/usr/bin/env bash
# The fuzz smoke `make test` runs: each cargo-fuzz target (fuzz/fuzz_targets) for 15 s,
# seeded with the kept corpus (60 s of fuzzing in all), where a nightly Rust toolchain is
# installed; where none is, it says so and skips (the unit tests replay the kept corpus
# either way). New inputs go to a scratch directory: the committed corpus is left as it
# is (scripts/fuzz.sh grows it). A crash fails the run and leaves its input in
# fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SMOKE_SECONDS:-15}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz smoke skipped: no nightly Rust toolchain here ('cargo +nightly' fails), which cargo fuzz needs;" \
         "the kept corpus (fuzz/corpus) was replayed by the unit tests instead"
    exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
cd fuzz
# An unoptimised build: a quarter of the optimised one's time for wasmtime, which the
# targets link, and fast enough for a smoke.
cargo +nightly fuzz build --dev --sanitizer none
for t in messages manifest schedule workflow; do
    mkdir -p "$scratch/$t"
    out="$(cargo +nightly fuzz run --dev --sanitizer none "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -max_len=65536 -print_final_stats=1 2>&1)" || {
        echo "$out" | tail -40
        echo "fuzz smoke: $t found a crash (its input is in fuzz/artifacts/$t/)"
        exit 1
    }
    runs="$(echo "$out" | sed -n 's/^stat::number_of_executed_units: *//p')"
    echo "fuzz smoke: $t ran ${runs:-?} inputs in ${seconds} s, no crash"
done
