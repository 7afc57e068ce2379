#!/usr/bin/env bash
# Builds an mr app written in Python into a component:
#
#   guest-sdk/python/componentize.sh APP_DIR MODULE OUT.wasm
#
# APP_DIR holds MODULE.py, which defines `WitWorld = mr_sdk.export(...)`.
# The first run installs componentize-py (pinned below) from PyPI into a
# virtualenv under $MR_TOOLS_DIR (default: <repo>/target/guest-tools); it
# needs python3 with the venv module. A build whose output is newer than
# its inputs (the app folder, this SDK, wit/) is skipped.
# Exit status 77: the toolchain cannot be installed on this machine.
set -euo pipefail
COMPONENTIZE_PY=0.25.1

[ $# -eq 3 ] || { echo "usage: $0 APP_DIR MODULE OUT.wasm" >&2; exit 2; }
app=$(cd "$1" && pwd)
module=$2
out=$3
sdk=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$sdk/../.." && pwd)
tools=${MR_TOOLS_DIR:-$repo/target/guest-tools}
venv=$tools/python-componentize-py-$COMPONENTIZE_PY

if [ -f "$out" ] && [ -z "$(find "$app" "$sdk" "$repo/wit" -newer "$out" -print -quit)" ]; then
    echo "$out is up to date"
    exit 0
fi

if [ ! -f "$venv/installed" ]; then
    command -v python3 >/dev/null || { echo "python3 not found: install Python 3 (with venv and pip)" >&2; exit 77; }
    echo "installing componentize-py $COMPONENTIZE_PY into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" || { echo "python3 -m venv failed: install Python's venv module" >&2; exit 77; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY" ||
        { echo "pip could not install componentize-py $COMPONENTIZE_PY" >&2; exit 77; }
    touch "$venv/installed"
fi

mkdir -p "$(dirname "$out")"
"$venv/bin/componentize-py" -d "$repo/wit" -w mapreduce componentize "$module" \
    -p "$app" -p "$sdk" -o "$out.tmp"
mv "$out.tmp" "$out"
echo "built $out"
