#!/usr/bin/env bash
# Builds an mr app written in Python into a component:
#
#   guest-sdk/python/componentize.sh APP_DIR MODULE OUT.wasm
#
# APP_DIR holds MODULE.py, which defines `WitWorld = mr_sdk.export(...)`.
# The first run installs componentize-py from PyPI (venv.sh). A build whose
# output is newer than its inputs (the app folder, this SDK, wit/) is
# skipped.
# Exit status 77: the toolchain cannot be installed on this machine.
set -euo pipefail

[ $# -eq 3 ] || { echo "usage: $0 APP_DIR MODULE OUT.wasm" >&2; exit 2; }
app=$(cd "$1" && pwd)
module=$2
out=$3
sdk=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$sdk/../.." && pwd)

if [ -f "$out" ] && [ -z "$(find "$app" "$sdk" "$repo/wit/0.1" -newer "$out" -not -name '*.pyc' -not -name __pycache__ -print -quit)" ]; then
    echo "$out is up to date"
    exit 0
fi
venv=$("$sdk/venv.sh")
mkdir -p "$(dirname "$out")"
"$venv/bin/componentize-py" -d "$repo/wit/0.1" -w mapreduce componentize "$module" \
    -p "$app" -p "$sdk" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out"
