#!/usr/bin/env bash
# Makes sure the C toolchain for mr apps is installed, installing it the
# first time, and prints the path of wasm-component-ld (for mr.mk):
# - clang 19 and lld with wasi-libc and compiler-rt for wasm32, from Debian's
#   packages (apt-get, as root or through sudo);
# - wasm-component-ld, the linker that turns a wasm32-wasi module into a
#   component, which ships with Rust (rustup) for its wasm32-wasip2 target.
# Exit status 77: the toolchain cannot be installed on this machine.
set -euo pipefail

CLANG=${CLANG:-clang-19}
packages="clang-19 lld-19 libclang-rt-19-dev-wasm32 wasi-libc"

have_clang() {
    command -v "$CLANG" >/dev/null &&
        [ -f /usr/lib/wasm32-wasi/libc.a ] &&
        compgen -G "/usr/lib/llvm-19/lib/clang/*/lib/wasi/libclang_rt.builtins-wasm32.a" >/dev/null &&
        command -v wasm-ld-19 >/dev/null
}

if [ "$CLANG" = clang-19 ] && ! have_clang; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "the C toolchain is missing; install it with: sudo apt-get install $packages" >&2
        exit 77
    fi
    command -v apt-get >/dev/null ||
        { echo "no apt-get: install clang 19, lld and wasi-libc for wasm32-wasi, then run make CLANG=..." >&2; exit 77; }
    echo "installing $packages (apt-get)" >&2
    install() {
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends $packages >&2
    }
    # A machine's package lists may be missing or stale: update them once.
    install || { "${sudo[@]}" apt-get update -q >&2 && install; } ||
        { echo "apt-get could not install $packages" >&2; exit 77; }
    have_clang || { echo "installed $packages, but the toolchain is still incomplete" >&2; exit 77; }
fi

ld=""
if command -v rustc >/dev/null; then
    for f in "$(rustc --print sysroot)"/lib/rustlib/*/bin/wasm-component-ld; do
        [ -x "$f" ] && ld=$f
    done
fi
command -v wasm-component-ld >/dev/null && [ -z "$ld" ] && ld=$(command -v wasm-component-ld)
if [ -z "$ld" ]; then
    echo "wasm-component-ld not found: install Rust with rustup (it ships with rustc), or cargo install wasm-component-ld" >&2
    exit 77
fi
echo "$ld"
