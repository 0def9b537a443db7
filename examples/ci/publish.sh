#!/usr/bin/env bash
# Build a task component, sign it and publish it to the fleet's registry: what a CI job
# runs (github-actions.yml calls this script; the test suite runs it against a real Redis).
#
#   TASKHOST_SIGNING_KEY   the private key from `taskhost keygen` (a CI secret)
#   TASKHOST_BROKER        the registry: the broker's URL (redis://… or sqlite://…)
#   CRATE  TASK  VERSION   the crate under plugins/ to build, the task name, its semver
#   TASKHOST               the taskhost binary [taskhost]
#   ROLLOUT                if set (e.g. "1,10,50,100"), roll the version out in steps after publishing
set -euo pipefail
: "${TASKHOST_SIGNING_KEY:?set TASKHOST_SIGNING_KEY to the key text from taskhost keygen}"
: "${TASKHOST_BROKER:?set TASKHOST_BROKER to the registry (the broker URL)}"
CRATE=${CRATE:?} TASK=${TASK:?} VERSION=${VERSION:?}
TASKHOST=${TASKHOST:-taskhost}
cd "$(dirname "$0")/../.."

rustup target list --installed | grep -qx wasm32-wasip2 || rustup target add wasm32-wasip2
cargo build --quiet --profile plugin --target wasm32-wasip2 -p "$CRATE"
wasm="target/wasm32-wasip2/plugin/${CRATE//-/_}.wasm"
manifest_args=()
crate_dir="plugins/${CRATE#plugin-}"
if [ -f "$crate_dir/manifest.toml" ]; then
    manifest_args=(--manifest "$crate_dir/manifest.toml")
fi

"$TASKHOST" publish "$wasm" --task "$TASK" --version "$VERSION" "${manifest_args[@]}" --json
if [ -n "${ROLLOUT:-}" ]; then
    "$TASKHOST" rollout "$TASK" "$VERSION" --steps "$ROLLOUT" --interval "${ROLLOUT_INTERVAL:-60s}" \
        --max-failure-rate "${MAX_FAILURE_RATE:-5%}"
fi
