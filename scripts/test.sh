#!/usr/bin/env bash
# Install dependencies, build, and run the whole test suite with ctest.
# TLM_SANITIZE=1 builds into build-asan with AddressSanitizer + UBSan.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
if [ "${TLM_SANITIZE:-0}" = 1 ]; then
  build=build-asan; extra="-DTLM_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo"
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
else
  build=build; extra="-DCMAKE_BUILD_TYPE=Release"
fi
cmake -S . -B "$build" $extra >/dev/null
cmake --build "$build" -j"$(nproc)"
cd "$build"
ctest --output-on-failure --timeout 900
