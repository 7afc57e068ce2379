#!/usr/bin/env bash
# Makes sure the Prometheus project's Python client (pinned below; its
# text-format parser checks what /metrics serves) is installed in a
# virtualenv under $MR_TOOLS_DIR (default: <repo>/target/test-tools),
# installing it from PyPI the first time, and prints the virtualenv's path.
# Exit status 77: it cannot be installed on this machine.
set -euo pipefail
PROMETHEUS_CLIENT=0.26.0

repo=$(cd "$(dirname "$0")/../.." && pwd)
venv=${MR_TOOLS_DIR:-$repo/target/test-tools}/prometheus-client-$PROMETHEUS_CLIENT

if [ ! -f "$venv/installed" ]; then
    command -v python3 >/dev/null || { echo "python3 not found: install Python 3 (with venv and pip)" >&2; exit 77; }
    echo "installing prometheus_client $PROMETHEUS_CLIENT into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { echo "python3 -m venv failed: install Python's venv module" >&2; exit 77; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "prometheus_client==$PROMETHEUS_CLIENT" >&2 ||
        { echo "pip could not install prometheus_client $PROMETHEUS_CLIENT" >&2; exit 77; }
    touch "$venv/installed"
fi
echo "$venv"
