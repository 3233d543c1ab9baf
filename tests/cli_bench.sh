#!/usr/bin/env bash
# Smoke checks of `tinylm bench` and bench/compare.sh on a very small model:
# every figure is printed; the JSON's counts match values worked out here by
# hand (FLOPs per token, parameters, tokens trained and generated, corpus
# bytes); a random model's first loss is about ln V; bad flags give one
# error line and a non-zero exit. No timing is asserted.
# usage: cli_bench.sh <tinylm binary> <source dir>
set -uo pipefail
bin="$1"
src="${2:-$(cd "$(dirname "$0")/.." && pwd)}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fails=0; passes=0
ok()   { echo "ok   - $1"; passes=$((passes+1)); }
bad()  { echo "FAIL - $1"; fails=$((fails+1)); }

expect_error() {
  local name="$1" pat="$2"; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"; local rc=$?
  if [ $rc -ne 0 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -q 'error:' "$tmp/err" && grep -Eq -- "$pat" "$tmp/err"; then ok "$name"
  else bad "$name (rc=$rc, stderr: $(head -c 400 "$tmp/err"))"; fi
}

# A small corpus: a folder of three .txt documents.
mkdir -p "$tmp/corpus"
for d in 1 2 3; do
  for i in $(seq 1 40); do echo "Document $d, line $i: the quick brown fox jumps over the lazy dog $((d*i)) times."; done >"$tmp/corpus/doc$d.txt"
done
corpus_bytes=$(cat "$tmp/corpus"/*.txt | wc -c)

# The model: V=300, D=32, L=1, H=2, F=64, T=16.
V=300; D=32; L=1; F=64; T=16; B=2; STEPS=2; G=4; P=5
small=(--vocab $V --dim $D --layers $L --heads 2 --hidden $F --context $T --batch $B --steps $STEPS
       --warmup-steps 1 --gen-tokens $G --prompt-tokens $P --streams 1,3 --gemm-size 64 --gemm-reps 2
       --threads 2 --corpus "$tmp/corpus" --vocab-train 280)
# Worked out independently of the C code (see bench_run.h for the formula).
pm=$(( L*(4*D*D + 3*D*F) + V*D ))
flops=$(( 6*pm + 6*L*D*(T+1) ))
params=$(( V*D + L*(4*D*D + 3*D*F + 2*D) + D ))

# ---- the table ----------------------------------------------------------------------
if "$bin" bench "${small[@]}" >"$tmp/table" 2>"$tmp/err"; then ok "bench runs"; else bad "bench runs: $(cat "$tmp/err")"; fi
for fig in "training tokens/s" "training model GFLOP/s" "fp32 sgemm peak GFLOP/s (64^3, best of 2)" \
           "training share of the sgemm peak" "prompt tokens/s (5-token prompt" \
           "generation tokens/s, 1 stream (4 tokens, " "generation tokens/s, 3 streams (12 tokens, " \
           "tokenizer training s (vocab 280" "encoding MB/s, 1 thread" "encoding MB/s, all 2 threads" \
           "peak memory MB (max RSS, training alone)"; do
  if grep -qF -- "$fig" "$tmp/table"; then ok "table has: $fig"; else bad "table lacks: $fig"; fi
done
commas() { echo "$1" | sed ':a;s/\B[0-9]\{3\}\>/,&/;ta'; }
line="FLOPs per training token = 6 x P_matmul + 6 x L x D x (T+1) = 6 x $(commas $pm) + 6 x $L x $D x $((T+1)) = $(commas $flops)"
if grep -qF -- "$line" "$tmp/table"; then ok "table: $line"; else bad "table lacks: $line"; fi

# ---- the JSON ------------------------------------------------------------------------
py=/usr/bin/python3; [ -x "$py" ] || py="$(command -v python3 || true)"
if "$bin" bench --json "${small[@]}" >"$tmp/j.json" 2>"$tmp/err"; then ok "bench --json runs"; else bad "bench --json runs: $(cat "$tmp/err")"; fi
if [ -n "$py" ]; then
  "$py" - "$tmp/j.json" <<EOF >"$tmp/jcheck" 2>&1
import json, math, sys
j = json.load(open(sys.argv[1]))
def check(name, cond):
    print(("ok   - " if cond else "FAIL - ") + name + ("" if cond else f" (json: {json.dumps(j)[:600]})"))
check("json flops_per_token = 6 Pm + 6 L D (T+1) = $flops", j["flops_per_token"] == $flops)
check("json params_matmul = $pm", j["params_matmul"] == $pm)
check("json params = $params", j["params"] == $params)
check("json trained tokens = B T steps", j["train_tokens"] == $B * $T * $STEPS)
check("json first loss about ln V", abs(j["train_loss_first"] - math.log($V)) < 0.3)
check("json train_gflops = flops_per_token x tokens/s", abs(j["train_gflops"] - $flops * j["train_tokens_per_s"] / 1e9) <= 1e-9 * max(1, j["train_gflops"]))
check("json peak_share = train/sgemm GFLOP/s", abs(j["peak_share"] - j["train_gflops"] / j["sgemm_gflops"]) < 1e-9)
check("json rates are positive", all(j[k] > 0 for k in ("train_tokens_per_s", "sgemm_gflops", "prompt_tokens_per_s")))
check("json generation streams 1 and 3", [e["streams"] for e in j["gen"]] == [1, 3])
check("json every stream made all its tokens (end-of-text ignored)", [e["new_tokens"] for e in j["gen"]] == [$G, 3 * $G])
check("json generation rates positive", all(e["tokens_per_s"] > 0 for e in j["gen"]))
check("json generation names one resolved format", len({e["dtype"] for e in j["gen"]}) == 1 and j["gen"][0]["dtype"] in ("bf16", "fp32"))
check("json generation context fits prompt + new tokens", j["gen_context"] == max($T, $P + $G))
t = j["tokenizer"]
check("json tokenizer read the whole corpus", t["bytes"] == $corpus_bytes and t["documents"] == 3)
check("json tokenizer encoded it", 0 < t["tokens"] <= $corpus_bytes + 3 and t["encode_mb_s_1_thread"] > 0 and t["encode_mb_s_all_threads"] > 0)
check("json peak memory measured", j["peak_rss_bytes"] > 1e6 and j["peak_rss_of"] == "training alone")
check("json threads", j["threads"] == 2)
EOF
  cat "$tmp/jcheck"
  passes=$((passes + $(grep -c '^ok' "$tmp/jcheck"))); fails=$((fails + $(grep -c '^FAIL' "$tmp/jcheck")))
  [ -s "$tmp/jcheck" ] || bad "json checks ran"
else
  ok "json checks skipped (no python3)"
fi

# --only picks parts: the training child's own report, and generation alone.
"$bin" bench --only train --json "${small[@]}" >"$tmp/t.json" 2>"$tmp/err"
if grep -q '"train_tokens_per_s"' "$tmp/t.json" && grep -q '"peak_rss_bytes"' "$tmp/t.json" && ! grep -q '"gen"' "$tmp/t.json" \
   && ! grep -q '"sgemm_gflops"' "$tmp/t.json"; then ok "--only train: training and its memory only"
else bad "--only train: $(head -c 300 "$tmp/t.json") $(cat "$tmp/err")"; fi
"$bin" bench --only gen,prompt --json "${small[@]}" >"$tmp/g.json" 2>"$tmp/err"
if grep -q '"gen"' "$tmp/g.json" && grep -q '"prompt_tokens_per_s"' "$tmp/g.json" && ! grep -q '"train_tokens_per_s"' "$tmp/g.json" \
   && ! grep -q '"peak_rss_bytes"' "$tmp/g.json" && ! grep -q '"tokenizer"' "$tmp/g.json"; then ok "--only gen,prompt"
else bad "--only gen,prompt: $(head -c 300 "$tmp/g.json") $(cat "$tmp/err")"; fi
# Without --corpus the tokenizer is left out.
"$bin" bench --only train,tokenizer --json --vocab $V --dim $D --layers $L --heads 2 --hidden $F --context $T \
  --batch 1 --steps 1 --warmup-steps 0 --threads 1 >"$tmp/n.json" 2>"$tmp/err"; rc=$?
if [ $rc -ne 0 ] && grep -q -- "--corpus" "$tmp/err"; then ok "--only tokenizer needs --corpus"; else bad "--only tokenizer without --corpus (rc=$rc)"; fi

# --gen-dtype: every format at every stream count, in order, named in the table and the JSON.
if "$bin" bench --only gen --gen-dtype bf16,int8 "${small[@]}" >"$tmp/gd" 2>"$tmp/err" \
   && grep -qF "generation tokens/s, 1 stream (4 tokens, bf16)" "$tmp/gd" && grep -qF "generation tokens/s, 3 streams (12 tokens, bf16)" "$tmp/gd" \
   && grep -qF "generation tokens/s, 1 stream (4 tokens, int8)" "$tmp/gd" && grep -qF "generation tokens/s, 3 streams (12 tokens, int8)" "$tmp/gd"; then
  ok "--gen-dtype bf16,int8: four rows"
else bad "--gen-dtype bf16,int8: $(cat "$tmp/gd" "$tmp/err")"; fi
"$bin" bench --only gen --json --gen-dtype int8,ref "${small[@]}" >"$tmp/gd.json" 2>"$tmp/err"
if tr -d ' \n\t' <"$tmp/gd.json" | grep -qE '"streams":1,"dtype":"int8".*"streams":3,"dtype":"int8".*"streams":1,"dtype":"fp32-ref".*"streams":3,"dtype":"fp32-ref"'; then
  ok "--gen-dtype int8,ref --json: dtype per entry"
else bad "--gen-dtype int8,ref --json: $(head -c 600 "$tmp/gd.json") $(cat "$tmp/err")"; fi

# --only loader: blocks with the batch on the device alternate with blocks fed by the loader.
"$bin" bench --only loader --json --loader-rounds 2 --workers 1 --prefetch 2 "${small[@]}" >"$tmp/l.json" 2>"$tmp/err"
if [ -n "$py" ] && "$py" - "$tmp/l.json" <<EOF >"$tmp/lcheck" 2>&1
import json, sys
j = json.load(open(sys.argv[1]))
l = j["loader"]
assert "train_tokens_per_s" not in j and "gen" not in j, "only the loader part"
assert l["data"] == "synthetic" and l["workers"] == 1 and l["prefetch"] == 2
assert l["steps_each"] == 2 * $STEPS, l
assert l["pinned"] is False, "the CPU hands out ordinary memory"
assert l["resident_step_s"] > 0 and l["loader_step_s"] > 0
assert abs(l["ratio"] - l["loader_step_s"] / l["resident_step_s"]) < 1e-9 * l["ratio"]
assert abs(l["loader_tokens_per_s"] * l["loader_step_s"] - $B * $T) < 1e-6 * $B * $T
EOF
then ok "--only loader --json: both step times and their ratio"
else bad "--only loader: $(head -c 600 "$tmp/l.json") $(cat "$tmp/err" "$tmp/lcheck" 2>/dev/null)"; fi
# on a prepared folder (its train.bin), in the table
"$bin" prepare --input "$tmp/corpus" --out "$tmp/prep" --vocab $V --val-fraction 0.2 >/dev/null 2>"$tmp/err" || bad "prepare for --data: $(cat "$tmp/err")"
if "$bin" bench --only loader --data "$tmp/prep" --loader-rounds 1 "${small[@]}" >"$tmp/lt" 2>"$tmp/err" \
   && grep -qF "step ms, batch on the device ($STEPS steps)" "$tmp/lt" && grep -qF "step ms, batch from the loader ($STEPS steps)" "$tmp/lt" \
   && grep -qF "loader / on-device step time" "$tmp/lt" && grep -qF "data $tmp/prep, 2 workers, 4 ring slots" "$tmp/lt"; then
  ok "--only loader --data DIR: table rows"
else bad "--only loader --data DIR: $(cat "$tmp/lt" "$tmp/err")"; fi
expect_error "--data missing" "--data: .*nope" "$bin" bench --only loader --data "$tmp/nope" "${small[@]}"
expect_error "--data vocabulary larger than the model's" "use --vocab $V" "$bin" bench --only loader --data "$tmp/prep" \
  --vocab 260 --dim $D --layers $L --heads 2 --hidden $F --context $T --batch 1 --steps 1

# ---- help and bad flags ----------------------------------------------------------------
# (into a file: grep -q on a pipe may quit before the help is written, and pipefail would see SIGPIPE)
"$bin" bench --help >"$tmp/help" 2>&1
if grep -q "6 x P_matmul + 6 x L x D x (T + 1)" "$tmp/help" && grep -q -- "--loader-rounds" "$tmp/help"; then ok "--help documents the FLOP count"; else bad "--help documents the FLOP count"; fi
if "$bin" --help | grep -q "bench"; then ok "tinylm --help lists bench"; else bad "tinylm --help lists bench"; fi
expect_error "unknown flag" "unknown flag '--frobnicate'" "$bin" bench --frobnicate
expect_error "--steps 0" "--steps 0 is out of range" "$bin" bench --steps 0
expect_error "--batch not a number" "--batch expects an integer" "$bin" bench --batch many
expect_error "--streams bad list" "--streams expects" "$bin" bench --streams 1,x
expect_error "--streams zero" "--streams expects" "$bin" bench --streams 0
expect_error "--only unknown part" "--only 'train,fast'.*'fast'" "$bin" bench --only train,fast
expect_error "--gen-dtype unknown format" "--gen-dtype 'bf16,fp8'.*'fp8'" "$bin" bench --gen-dtype bf16,fp8
expect_error "--gen-dtype empty item" "--gen-dtype 'int8,'" "$bin" bench --gen-dtype int8,
expect_error "--heads not dividing --dim" "--dim 32 is not divisible by --heads 3" "$bin" bench --dim 32 --heads 3
expect_error "--preset unknown" "unknown --preset 'huge'" "$bin" bench --preset huge
expect_error "--corpus missing" "--corpus .*does not exist" "$bin" bench --only tokenizer --corpus "$tmp/nope"
expect_error "value missing" "--threads needs a value" "$bin" bench --threads

# ---- compare.sh ------------------------------------------------------------------------
# Without PyTorch: tinylm's column alone, with a note; the script builds nothing.
if TLM_TORCH_PYTHON=/nonexistent/python3 bash "$src/bench/compare.sh" "$bin" "${small[@]}" >"$tmp/cmp" 2>"$tmp/err"; then
  if grep -q "cannot import torch" "$tmp/cmp" && grep -q "training tokens/s" "$tmp/cmp" && grep -q "generation tokens/s, 3 streams" "$tmp/cmp" \
     && grep -q "peak memory MB" "$tmp/cmp" && grep -q "encoding MB/s, 1 thread" "$tmp/cmp" && grep -q "machine: " "$tmp/cmp" \
     && ! grep -q "PyTorch *ratio" "$tmp/cmp"; then ok "compare.sh without torch: tinylm column alone"
  else bad "compare.sh without torch: $(cat "$tmp/cmp")"; fi
else bad "compare.sh without torch failed: $(cat "$tmp/err")"; fi
expect_error "compare.sh without a binary" "no tinylm binary" bash "$src/bench/compare.sh" "$tmp/no-such-tinylm"
# The PyTorch peer rejects bad flags before it imports torch (fast).
if [ -x /usr/bin/python3 ]; then
  /usr/bin/python3 "$src/dev/bench_torch.py" --streams 1,x >"$tmp/out" 2>"$tmp/err"; rc=$?
  if [ $rc -ne 0 ] && grep -q -- "--streams" "$tmp/err"; then ok "bench_torch.py rejects a bad --streams"; else bad "bench_torch.py --streams 1,x (rc=$rc)"; fi
fi

echo "$passes passed, $fails failed"
[ $fails -eq 0 ]
