#!/usr/bin/env bash
# Builds wc-js.wasm (or the path given) from app.js; installs componentize-js
# from the npm registry the first time. See README.md.
here=$(cd "$(dirname "$0")" && pwd)
exec "$here/../../guest-sdk/js/componentize.sh" "$here/app.js" "${1:-$here/wc-js.wasm}"
