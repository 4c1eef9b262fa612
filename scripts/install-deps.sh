#!/usr/bin/env bash
# Installs everything fpf needs on a fresh Debian 12 machine (root or sudo).
#   scripts/install-deps.sh          build + test dependencies
#   scripts/install-deps.sh --report  also chromium (for the HTML report test)
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
pkgs=(build-essential cmake ninja-build pkg-config git python3
      libxtensor-dev libboost-json1.81-dev doctest-dev libbenchmark-dev libcli11-dev libfmt-dev
      libpcre2-dev libutf8proc-dev libpoppler-cpp-dev)
if [ "${1:-}" = "--report" ] || [ -n "${FPF_WITH_CHROMIUM:-}" ]; then pkgs+=(chromium python3-numpy); fi
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
