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

# The Python examples (examples/python/NAME.py → py.NAME@1.0.0.wasm), into a directory of
# their own beside the Rust ones: each is ~18 MB and compiles in ~13 s, which every worker
# serving dist/plugins would otherwise load. Needs componentize-py (make test-deps).
py_out="$(dirname "$out")/python-plugins"
componentize=${TASKHOST_COMPONENTIZE_PY:-.venv/bin/componentize-py}
if [ -x "$componentize" ] || command -v "$componentize" >/dev/null 2>&1; then
    # With the SDK: the same dependency features as `make test`'s test build (one wasmtime build).
    cargo build --quiet -p taskhost -p taskhost-sdk
    mkdir -p "$py_out"
    for module in examples/python/*.py; do
        name=$(basename "$module" .py)
        target="$py_out/py.$name@1.0.0.wasm"
        manifest="examples/python/$name.toml"
        # Rebuilt only when the module, its manifest or the SDK changed.
        if [ -f "$target" ] && [ "$target" -nt "$module" ] && [ "$target" -nt sdk-python/taskhost/__init__.py ] \
            && { [ ! -f "$manifest" ] || [ "$target" -nt "$manifest" ]; }; then
            continue
        fi
        args=("$module" --task "py.$name" --version 1.0.0 -o "$py_out" --componentize-py "$componentize")
        [ -f "$manifest" ] && args+=(--manifest "$manifest")
        [ -f "examples/python/$name.requirements.txt" ] && args+=(-r "examples/python/$name.requirements.txt" --python .venv/bin/python)
        target/debug/taskhost build "${args[@]}" >/dev/null
    done
    echo "built $(ls "$py_out"/*.wasm | wc -l) Python components into $py_out"
else
    echo "componentize-py not found: Python examples not built (make test-deps installs it)"
fi
