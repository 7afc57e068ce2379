#!/usr/bin/env bash
# Builds an mr app written in JavaScript into a component:
#
#   guest-sdk/js/componentize.sh APP.js OUT.wasm
#
# APP.js is an ES module exporting `map`, `reduce` and `combine` (see
# mr.js); it may import modules by relative path (this SDK's mr.js among
# them) and 'mr:app/host@0.1.2'. The first run installs componentize-js
# (pinned by package.json and package-lock.json here) from the npm registry into
# $MR_TOOLS_DIR/js (default: <repo>/target/guest-tools/js); it needs node
# and npm. A build whose output is newer than its inputs (the app's folder,
# this SDK, wit/) is skipped.
# Exit status 77: the toolchain cannot be installed on this machine.
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 APP.js OUT.wasm" >&2; exit 2; }
src=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
out=$2
sdk=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$sdk/../.." && pwd)
tools=${MR_TOOLS_DIR:-$repo/target/guest-tools}/js

if [ -f "$out" ] && [ -z "$(find "$(dirname "$src")" "$sdk" "$repo/wit/0.1" -newer "$out" \
        -not -path '*/node_modules/*' -print -quit)" ]; then
    echo "$out is up to date"
    exit 0
fi

if ! cmp -s "$sdk/package-lock.json" "$tools/package-lock.json" || [ ! -f "$tools/installed" ]; then
    command -v npm >/dev/null || { echo "npm not found: install Node.js 18 or later with npm" >&2; exit 77; }
    echo "installing componentize-js into $tools" >&2
    rm -rf "$tools"
    mkdir -p "$tools"
    cp "$sdk/package.json" "$sdk/package-lock.json" "$tools/"
    # `npm install` with the committed lock installs the locked versions;
    # `npm ci` would refuse it (npm 11 leaves other platforms' optional
    # packages out of a lock, then calls it out of sync).
    (cd "$tools" && npm install --no-audit --no-fund --loglevel=error) ||
        { echo "npm could not install componentize-js" >&2; exit 77; }
    cp "$sdk/package-lock.json" "$tools/package-lock.json"
    touch "$tools/installed"
fi

mkdir -p "$(dirname "$out")"
out=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
# componentize-js resolves the app's imports (this SDK's mr.js among them)
# only inside the current directory, and mishandles `/` as that directory:
# stage the app's folder and this SDK in a scratch directory, at their own
# absolute paths under it, so relative imports between them still work.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for dir in "$(dirname "$src")" "$sdk"; do
    tar -C / --exclude=node_modules --exclude='*.wasm' -cf - "${dir#/}" | tar -C "$stage" -xf -
done
cd "$stage"
node "$tools/node_modules/@bytecodealliance/componentize-js/src/cli.js" \
    --wit "$repo/wit/0.1" --world-name mapreduce -d http -d fetch-event \
    -o "$out.tmp" "${src#/}"
mv "$out.tmp" "$out"
echo "built $out"
