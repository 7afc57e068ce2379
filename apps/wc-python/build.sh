#!/usr/bin/env bash
# Builds wc-python.wasm (or the path given) from app.py; installs
# componentize-py from PyPI the first time. See README.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../guest-sdk/python/componentize.sh" "$here" app "${1:-$here/wc-python.wasm}"
