#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine (run as root):
# install, build, fetch the default corpus, prepare it, train the seed model
# for a bounded time, then generate a sample and print tokens/s.
# Override with env vars: MAX_TIME (default 5m), THREADS, RUN (runs/seed).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh --corpus
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DTLM_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target tinylm_cli
scripts/get_corpus.sh data/sotu
[ -f data/sotu-prep/train.bin ] || build/tinylm prepare --input data/sotu --out data/sotu-prep --vocab 2560
run="${RUN:-runs/seed}"
resume=""
[ -f "$run/trainer_state.json" ] && resume="--resume"
build/tinylm train --data data/sotu-prep --out "$run" --preset seed --batch 16 --lr 1e-3 \
  --max-time "${MAX_TIME:-5m}" --eval-every 50 ${THREADS:+--threads $THREADS} $resume
build/tinylm generate --model "$run" --prompt "Fellow-Citizens of the Senate and House of Representatives:" \
  --max-tokens 200 --temperature 0.8 --top-p 0.95
