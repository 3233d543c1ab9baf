#!/usr/bin/env bash
# End-to-end checks of `tinylm train`: a tiny run writes a complete Hugging
# Face run folder; an interrupted (SIGINT or --max-time) and resumed run ends
# bit for bit where an uninterrupted one does; existing checkpoints are never
# overwritten or damaged by bad input, a diverging run or a refused resume;
# every error is one line with a non-zero exit.
# usage: cli_train.sh <tinylm binary> <source dir>
set -uo pipefail
bin="$1"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
ok()   { echo "ok   - $1"; passes=$((passes+1)); }
bad()  { echo "FAIL - $1"; fails=$((fails+1)); }
export OMP_NUM_THREADS=1

# expect_error NAME PATTERN CMD...: non-zero exit, exactly one error line on
# stderr, matching PATTERN (a grep -E regex).
expect_error() {
  local name="$1" pat="$2"; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  local lines; lines=$(grep -c 'error:' "$tmp/err")
  if [ $rc -ne 0 ] && [ "$lines" -eq 1 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -Eq -- "$pat" "$tmp/err"; then ok "$name"
  else bad "$name (rc=$rc, stderr: $(head -c 400 "$tmp/err"))"; fi
}

# snapshot DIR / unchanged NAME DIR: the checkpoint files are byte-identical.
snapshot() { rm -rf "$tmp/snap"; cp -r "$1" "$tmp/snap"; }
unchanged() {
  if diff -r "$tmp/snap" "$2" >/dev/null; then ok "$1"; else bad "$1: $(diff -rq "$tmp/snap" "$2" | head -3)"; fi
}
losses() { grep -o '"step": [0-9]*, "tokens": [0-9]*, "loss": [^,]*' "$1/metrics.jsonl"; }

# ---- data ------------------------------------------------------------------
mkdir -p "$tmp/corpus"
for d in 1 2 3 4 5 6 7 8 9 10; do
  for i in $(seq 1 60); do
    echo "Document $d, line $i: the quick brown fox jumps over the lazy dog $((d*i)) times."
  done > "$tmp/corpus/doc$d.txt"
done
if ! "$bin" prepare --input "$tmp/corpus" --out "$tmp/data" --vocab 300 --val-fraction 0.2 >"$tmp/out" 2>&1; then
  echo "FAIL - tinylm prepare: $(cat "$tmp/out")"; exit 1
fi
"$bin" prepare --input "$tmp/corpus" --out "$tmp/data280" --vocab 280 --val-fraction 0.2 >/dev/null 2>&1

M=(--preset tiny --dim 32 --layers 2 --heads 2 --hidden 64 --context 32)
T=(--batch 8 --eval-every 50 --eval-batches 2 --threads 1 --log-every 1)

# ---- help --------------------------------------------------------------------
"$bin" train --help >"$tmp/help" 2>&1 && ok "--help exits 0" || bad "--help failed"
missing=""
for f in --data --out --preset --dim --layers --heads --hidden --context --batch --accum --lr --min-lr --warmup \
         --weight-decay --clip --max-steps --max-time --eval-every --eval-batches --save-every --log-every \
         --workers --prefetch --seed --threads --device --dtype --resume; do
  grep -q -- "$f " "$tmp/help" || missing="$missing $f"
done
[ -z "$missing" ] && ok "--help documents every flag" || bad "--help lacks:$missing"

# ---- a complete run ----------------------------------------------------------
if "$bin" train --data "$tmp/data" --out "$tmp/run" "${M[@]}" "${T[@]}" --max-steps 60 >"$tmp/out1" 2>&1; then
  ok "a 60-step run exits 0"
else bad "60-step run: $(tail -5 "$tmp/out1")"; fi
all=1
for f in config.json model.safetensors tokenizer.json trainer_state.json trainer_state.safetensors metrics.jsonl loss.svg; do
  [ -s "$tmp/run/$f" ] || { all=0; bad "run folder lacks $f"; }
done
[ $all -eq 1 ] && ok "run folder holds the HF files, trainer state, metrics.jsonl and loss.svg"
cmp -s "$tmp/data/tokenizer.json" "$tmp/run/tokenizer.json" && ok "tokenizer.json copied from the data" || bad "tokenizer.json differs"
grep -q '30,240 parameters' "$tmp/out1" && ok "banner: parameter count with separators" || bad "banner parameter count: $(head -8 "$tmp/out1")"
grep -q 'pinned host memory \(yes\|no\)' "$tmp/out1" && grep -q 'BLAS' "$tmp/out1" && grep -q '256 tokens per step' "$tmp/out1" \
  && grep -q 'train [0-9,]* tokens, val [0-9,]* tokens' "$tmp/out1" && grep -q 'device' "$tmp/out1" \
  && ok "banner: device, BLAS, pinned memory, tokens per step, token counts" || bad "banner: $(head -8 "$tmp/out1")"
grep -q '^step 60/60 | loss [0-9.]* | val [0-9.]* | lr [0-9.e+-]* | [0-9,]* tok/s | .* | ETA ' "$tmp/out1" \
  && ok "progress lines: step, loss, val, lr, tok/s, elapsed, ETA" || bad "progress line: $(grep '^step' "$tmp/out1" | tail -1)"
[ "$(wc -l <"$tmp/run/metrics.jsonl")" -eq 60 ] && grep -q '"val_loss"' "$tmp/run/metrics.jsonl" \
  && grep -q '"grad_norm"' "$tmp/run/metrics.jsonl" && ok "metrics.jsonl: one record per step with val_loss and grad_norm" \
  || bad "metrics.jsonl: $(head -2 "$tmp/run/metrics.jsonl")"
first=$(losses "$tmp/run" | head -1 | sed 's/.*"loss": //'); last=$(losses "$tmp/run" | tail -1 | sed 's/.*"loss": //')
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.5) }' && ok "loss falls ($first -> $last)" || bad "loss did not fall: $first -> $last"

# ---- refusing to overwrite -----------------------------------------------------
snapshot "$tmp/run"
expect_error "an existing checkpoint needs --resume" "already holds a checkpoint: pass --resume" \
  "$bin" train --data "$tmp/data" --out "$tmp/run" "${M[@]}" "${T[@]}" --max-steps 60
unchanged "the refused run left the checkpoint untouched" "$tmp/run"

# ---- bad input ---------------------------------------------------------------------
expect_error "--data missing"        "--data"           "$bin" train --out "$tmp/x"
expect_error "--data not a folder"   "nope"             "$bin" train --data "$tmp/nope" --out "$tmp/x"
mkdir -p "$tmp/partial"; cp "$tmp/data/tokenizer.json" "$tmp/data/val.bin" "$tmp/partial/"
expect_error "train.bin missing"     "train.bin.*prepare" "$bin" train --data "$tmp/partial" --out "$tmp/x"
cp "$tmp/data/train.bin" "$tmp/partial/"; truncate -s -10 "$tmp/partial/train.bin"
expect_error "truncated train.bin"   "train.bin"        "$bin" train --data "$tmp/partial" --out "$tmp/x" "${M[@]}"
cp "$tmp/data280/val.bin" "$tmp/partial/val.bin"; cp "$tmp/data/train.bin" "$tmp/partial/"
expect_error "vocab mismatch between files" "val.bin.*prepare" "$bin" train --data "$tmp/partial" --out "$tmp/x" "${M[@]}"
expect_error "--context too long for the data" "--context" "$bin" train --data "$tmp/data" --out "$tmp/x" "${M[@]}" --context 8192 --batch 8
expect_error "--heads not dividing --dim" "--heads"    "$bin" train --data "$tmp/data" --out "$tmp/x" "${M[@]}" --heads 3
expect_error "--batch 0"             "--batch"          "$bin" train --data "$tmp/data" --out "$tmp/x" --batch 0
expect_error "--lr -1"               "--lr"             "$bin" train --data "$tmp/data" --out "$tmp/x" --lr -1
expect_error "--lr not a number"     "--lr"             "$bin" train --data "$tmp/data" --out "$tmp/x" --lr fast
expect_error "--workers 1000"        "--workers"        "$bin" train --data "$tmp/data" --out "$tmp/x" --workers 1000
expect_error "--max-time 5x"         "--max-time"       "$bin" train --data "$tmp/data" --out "$tmp/x" --max-time 5x
expect_error "--min-lr above --lr"   "--min-lr"         "$bin" train --data "$tmp/data" --out "$tmp/x" "${M[@]}" --lr 1e-3 --min-lr 1e-2
expect_error "unknown --preset"      "--preset"         "$bin" train --data "$tmp/data" --out "$tmp/x" --preset huge
expect_error "unknown --device"      "device|cuda|cpu"  "$bin" train --data "$tmp/data" --out "$tmp/x" "${M[@]}" --device tpu
expect_error "unknown --dtype"       "--dtype fp16.*fp32, bf16, tf32 or auto" "$bin" train --data "$tmp/data" --out "$tmp/x" "${M[@]}" --dtype fp16
expect_error "--dtype bf16 on the CPU" "--dtype bf16.*fp32" "$bin" train --data "$tmp/data" --out "$tmp/x" "${M[@]}" --device cpu --dtype bf16
if "$bin" train --data "$tmp/data" --out "$tmp/fp32" "${M[@]}" "${T[@]}" --max-steps 3 --device cpu --dtype fp32 >"$tmp/outf" 2>&1 \
   && grep -Eq '"dtype":[[:space:]]*"fp32"' "$tmp/fp32/trainer_state.json"; then ok "--dtype fp32 on the CPU trains and is saved with the run"
else bad "--dtype fp32: $(tail -2 "$tmp/outf")"; fi
expect_error "unknown flag"          "--frobnicate"     "$bin" train --data "$tmp/data" --out "$tmp/x" --frobnicate
expect_error "flag without a value"  "--lr"             "$bin" train --data "$tmp/data" --out "$tmp/x" --lr
expect_error "unwritable --out"      "plainfile"        bash -c "touch '$tmp/plainfile'; '$bin' train --data '$tmp/data' --out '$tmp/plainfile/run' ${M[*]} --max-steps 2"
[ ! -e "$tmp/x" ] && ok "failed starts created no run folder" || bad "a failed start created $tmp/x"

# ---- refused resumes leave the checkpoint alone ---------------------------------------
expect_error "--resume without a checkpoint" "--resume" "$bin" train --out "$tmp/empty" --resume
expect_error "--resume with another model shape" "--dim 64.*config.json" "$bin" train --out "$tmp/run" --resume --dim 64 --max-steps 100
expect_error "--resume with data of another vocab" "vocab 280.*vocab 300" "$bin" train --out "$tmp/run" --resume --data "$tmp/data280" --max-steps 100
expect_error "--resume of a finished run" "--max-steps" "$bin" train --out "$tmp/run" --resume
cp "$tmp/run/trainer_state.json" "$tmp/ts.json"; echo '{"broken":' > "$tmp/run/trainer_state.json"
expect_error "--resume with a damaged trainer_state.json" "trainer_state.json" "$bin" train --out "$tmp/run" --resume --max-steps 100
cp "$tmp/ts.json" "$tmp/run/trainer_state.json"
cp "$tmp/run/model.safetensors" "$tmp/ms"; printf 'garbage' | dd of="$tmp/run/model.safetensors" bs=1 seek=2000 conv=notrunc 2>/dev/null
expect_error "--resume with a damaged model.safetensors" "model.safetensors" "$bin" train --out "$tmp/run" --resume --max-steps 100
cp "$tmp/ms" "$tmp/run/model.safetensors"
unchanged "refused resumes left the checkpoint untouched" "$tmp/run"

# ---- divergence: no bad state is saved --------------------------------------------------
expect_error "a diverging run stops with a hint about --lr" "diverged.*step 60 .* kept.*lower --lr" \
  "$bin" train --out "$tmp/run" --resume --max-steps 100 --lr 1e6
unchanged "the diverged run kept the last good checkpoint" "$tmp/run"

# ---- resume: --max-time and SIGINT runs end bit for bit where a straight run does ---------
R=(--data "$tmp/data" "${M[@]}" "${T[@]}" --max-steps 300 --save-every 40)
"$bin" train "${R[@]}" --out "$tmp/A" >/dev/null 2>&1 || bad "straight 300-step run failed"

"$bin" train "${R[@]}" --out "$tmp/B" --max-time 0.15s --workers 3 >"$tmp/outB" 2>&1
stepB=$(grep -o '"step":[[:space:]]*[0-9]*' "$tmp/B/trainer_state.json" | head -1 | grep -o '[0-9]*$')
echo "     (--max-time stopped at step $stepB)"
if [ "$stepB" -lt 300 ]; then
  "$bin" train --out "$tmp/B" --resume --max-time 1h --workers 0 >"$tmp/outB2" 2>&1 || bad "resume after --max-time: $(tail -2 "$tmp/outB2")"
  grep -q "resume    from step $stepB" "$tmp/outB2" && ok "resume reports its starting step" || bad "resume banner: $(head -9 "$tmp/outB2")"
fi
cmp -s "$tmp/A/model.safetensors" "$tmp/B/model.safetensors" && cmp -s "$tmp/A/trainer_state.safetensors" "$tmp/B/trainer_state.safetensors" \
  && ok "--max-time + --resume (other --workers): final weights and optimizer state bit-identical" || bad "--max-time + resume: final state differs"
diff <(losses "$tmp/A") <(losses "$tmp/B") >/dev/null && ok "--max-time + --resume: every step's loss identical" \
  || bad "--max-time + resume losses differ: $(diff <(losses "$tmp/A") <(losses "$tmp/B") | head -3)"

"$bin" train "${R[@]}" --out "$tmp/C" >"$tmp/outC" 2>&1 &
pid=$!
for _ in $(seq 1 100); do [ -e "$tmp/C/trainer_state.json" ] && break; sleep 0.05; done
kill -INT $pid 2>/dev/null
wait $pid; rc=$?
stepC=$(grep -o '"step":[[:space:]]*[0-9]*' "$tmp/C/trainer_state.json" | head -1 | grep -o '[0-9]*$')
if [ $rc -eq 0 ] && { grep -q "interrupted: saved step $stepC" "$tmp/outC" || [ "$stepC" = 300 ]; }; then
  ok "SIGINT saves at a step boundary and exits 0 (step $stepC)"
else bad "SIGINT: rc=$rc, $(tail -2 "$tmp/outC")"; fi
if [ "$stepC" -lt 300 ]; then
  "$bin" train --out "$tmp/C" --resume >"$tmp/outC2" 2>&1 || bad "resume after SIGINT: $(tail -2 "$tmp/outC2")"
fi
cmp -s "$tmp/A/model.safetensors" "$tmp/C/model.safetensors" && diff <(losses "$tmp/A") <(losses "$tmp/C") >/dev/null \
  && ok "SIGINT + --resume: same losses and bit-identical final weights" || bad "SIGINT + resume differs from the straight run"

echo "# $passes passed, $fails failed"
[ $fails -eq 0 ]
