#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks need. Idempotent: a
# package already present is not fetched again.
set -euo pipefail
packages=(build-essential pkg-config ca-certificates git curl)
if [ -f scripts/debian-packages.txt ]; then
    while read -r pkg; do
        [ -n "$pkg" ] && [ "${pkg:0:1}" != "#" ] && packages+=("$pkg")
    done < scripts/debian-packages.txt
fi
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
