#!/usr/bin/env bash
# The word-count benchmark: builds mr, the wc app and the benchmark driver
# (release), then runs mr-bench from the repository root. Arguments go to
# mr-bench, e.g.  bench/run.sh --size-mib 64   or   bench/run.sh --mr-args --parallelism 1
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
cargo build --release -q -p mr-cli -p mr-bench
cargo build --release -q --target wasm32-wasip2 --manifest-path apps/Cargo.toml -p wc
exec target/release/mr-bench "$@"
