#!/usr/bin/env bash
# Makes sure Debian's Chromium and its WebDriver (chromedriver) are
# installed, installing them with apt-get the first time (as root or
# through sudo), and prints the two paths, one per line: chromium, then
# chromedriver.
# Exit status 77: they cannot be installed on this machine.
set -euo pipefail
packages="chromium chromium-driver"

have() { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }

if ! have; then
    if [ "$(id -u)" -eq 0 ]; then
        sudo=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "Chromium is missing; install it with: sudo apt-get install --no-install-recommends $packages" >&2
        exit 77
    fi
    command -v apt-get >/dev/null ||
        { echo "no apt-get: install Chromium and chromedriver yourself" >&2; exit 77; }
    echo "installing $packages (apt-get)" >&2
    install() {
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $packages >&2
    }
    # A machine's package lists may be missing or stale: update them once.
    install || { "${sudo[@]}" apt-get update -q >&2 && install; } ||
        { echo "apt-get could not install $packages" >&2; exit 77; }
    have || { echo "installed $packages, but chromium or chromedriver is still missing" >&2; exit 77; }
fi
command -v chromium
command -v chromedriver
