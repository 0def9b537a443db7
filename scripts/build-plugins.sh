#!/usr/bin/env bash
# Builds every crate under plugins/ for wasm32-wasip2 and lays the components out as
# dist/plugins/<task>@<version>.wasm, with the crate's manifest.toml beside each.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-dist/plugins}

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    rustup target add wasm32-wasip2
fi

packages=()
for dir in plugins/*/; do
    packages+=(-p "plugin-$(basename "$dir")")
done
cargo build --quiet --profile plugin --target wasm32-wasip2 "${packages[@]}"

mkdir -p "$out"
for dir in plugins/*/; do
    name=$(basename "$dir")
    task=$(sed -n 's/^task *= *"\(.*\)"/\1/p' "$dir/Cargo.toml")
    version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n1)
    artifact="target/wasm32-wasip2/plugin/plugin_${name//-/_}.wasm"
    cp "$artifact" "$out/$task@$version.wasm.tmp"
    mv "$out/$task@$version.wasm.tmp" "$out/$task@$version.wasm"
    if [ -f "$dir/manifest.toml" ]; then
        cp "$dir/manifest.toml" "$out/$task@$version.toml"
    else
        rm -f "$out/$task@$version.toml"
    fi
done
echo "built $(ls "$out"/*.wasm | wc -l) components into $out"
