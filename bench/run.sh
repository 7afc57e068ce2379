#!/usr/bin/env bash
# The word-count benchmark: builds mr, the wc app and the benchmark driver
# (release), and the wc apps in C, Python and JavaScript with their own build
# commands (installing their toolchains the first time), then runs mr-bench
# from the repository root. Arguments go to mr-bench, e.g.
#   bench/run.sh --size-mib 64 --lang-size-mib 8   or   bench/run.sh --mr-args --parallelism 1
# MR_BENCH_LANGS=0 leaves the other languages out. A subcommand of mr-bench
# skips them too: `bench/run.sh backups` (backup tasks with a slowed worker,
# and --verify 2; see bench/src/backups.rs), `bench/run.sh state-machine`,
# `bench/run.sh s3` (the word count from a bucket against local disk, with
# Ceph's S3 gateway on this machine; see bench/src/s3.rs), `bench/run.sh
# no-combiner` (wc without its combiner and the indexer against native
# equivalents; see bench/src/plain.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add wasm32-wasip2 >/dev/null 2>&1 || true
cargo build --release -q -p mr-cli -p mr-bench
cargo build --release -q --target wasm32-wasip2 --manifest-path apps/Cargo.toml -p wc -p wc-nocombiner -p indexer

langs=()
case "${1:-}" in
    backups | state-machine | native-wc | native-indexer | no-combiner | s3 | scale) MR_BENCH_LANGS=0 ;;
esac
if [ "${MR_BENCH_LANGS:-1}" != 0 ]; then
    apps=target/bench/apps
    mkdir -p "$apps"
    build() { # NAME COMMAND...
        local name=$1 status=0
        shift
        "$@" >"$apps/$name.log" 2>&1 || status=$?
        if [ $status -eq 0 ]; then
            langs+=(--lang-app "$name=$apps/wc-$name.wasm")
        elif [ $status -eq 77 ]; then
            echo "warning: no $name toolchain on this machine, $name left out (see $apps/$name.log)" >&2
        else
            echo "building the $name app failed:" >&2
            cat "$apps/$name.log" >&2
            exit 1
        fi
    }
    # toolchain.sh first: its exit status 77 means "not installable here".
    build c bash -c "guest-sdk/c/toolchain.sh >/dev/null && make -C apps/wc-c OUT=$PWD/$apps/wc-c.wasm"
    build python apps/wc-python/build.sh "$apps/wc-python.wasm"
    build js apps/wc-js/build.sh "$apps/wc-js.wasm"
fi
# DuckDB for the main comparison, in a venv of its own (first use installs it).
duck=()
if [ -z "${1:-}" ] || [ "${1#-}" != "$1" ]; then
    venv=target/bench/venv
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
        python3 -m venv "$venv" >/dev/null 2>&1 && "$venv/bin/pip" install -q -r bench/duckdb/requirements.txt >/dev/null 2>&1 \
            || echo "warning: cannot install DuckDB into $venv (pip); its comparison is left out" >&2
    fi
    if "$venv/bin/python" -c 'import duckdb' 2>/dev/null; then
        duck=(--duckdb "$venv/bin/python")
    fi
fi
exec target/release/mr-bench ${langs[@]+"${langs[@]}"} ${duck[@]+"${duck[@]}"} "$@"
