#!/usr/bin/env bash
# Install what tinylm needs to build and test on Debian 12 (run as root).
# Usage: scripts/deps.sh [--corpus]   (--corpus adds npm, for the default corpus)
set -euo pipefail
pkgs="build-essential cmake pkg-config libopenblas-dev libpcre2-dev libcjson-dev libcmocka-dev"
if [ "${1:-}" = "--corpus" ]; then
  pkgs="$pkgs openssl ca-certificates"
  command -v npm >/dev/null || pkgs="$pkgs npm"
fi
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "deps: installing$missing"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq $missing >/dev/null
fi
echo "deps: ok"
