#!/usr/bin/env bash
# Builds hostile-python.wasm (or the path given) from app.py.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../guest-sdk/python/componentize.sh" "$here" app "${1:-$here/hostile-python.wasm}"
