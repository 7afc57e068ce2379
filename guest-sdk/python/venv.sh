#!/usr/bin/env bash
# Makes sure componentize-py (pinned below) is installed in a virtualenv
# under $MR_TOOLS_DIR (default: <repo>/target/guest-tools), installing it
# from PyPI the first time (needs python3 with venv and pip), and prints the
# virtualenv's path.
# Exit status 77: it cannot be installed on this machine.
set -euo pipefail
COMPONENTIZE_PY=0.25.1

sdk=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$sdk/../.." && pwd)
venv=${MR_TOOLS_DIR:-$repo/target/guest-tools}/python-componentize-py-$COMPONENTIZE_PY

if [ ! -f "$venv/installed" ]; then
    command -v python3 >/dev/null || { echo "python3 not found: install Python 3 (with venv and pip)" >&2; exit 77; }
    echo "installing componentize-py $COMPONENTIZE_PY into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { echo "python3 -m venv failed: install Python's venv module" >&2; exit 77; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "componentize-py==$COMPONENTIZE_PY" >&2 ||
        { echo "pip could not install componentize-py $COMPONENTIZE_PY" >&2; exit 77; }
    touch "$venv/installed"
fi
echo "$venv"
