#!/usr/bin/env bash
# Fuzzes every parser taskhost runs on bytes from outside (fuzz/fuzz_targets), with
# cargo-fuzz (libFuzzer). Usage: scripts/fuzz.sh [RUNS per target, default 10000000]
# [target...]. New interesting inputs land in fuzz/corpus/<target>/, minimized after each
# run (kept in git, and replayed by `make test`); a crash leaves its input in fuzz/artifacts/.
#
# cargo-fuzz needs nightly Rust. Where only stable is installed (as here), it runs the
# stable compiler with RUSTC_BOOTSTRAP=1, which unlocks the -Z flags it passes; with
# --sanitizer=none no nightly-only runtime is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10000000}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(messages manifest schedule workflow)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi
cd fuzz
for t in "${targets[@]}"; do
    echo "== $t: $runs inputs"
    cargo fuzz run --sanitizer none --release "$t" "corpus/$t" -- -runs="$runs" -max_len=65536 -print_final_stats=1 2>&1 \
        | grep -E '^(stat::|==|INFO: Running|Done|#[0-9]+ *DONE)|ERROR|panicked' || true
    test "${PIPESTATUS[0]}" -eq 0
    # Keep only inputs that add coverage: what is committed, and replayed by make test.
    cargo fuzz cmin --sanitizer none --release "$t" "corpus/$t" >/dev/null 2>&1
    echo "   corpus/$t: $(ls "corpus/$t" | wc -l) inputs kept"
done
