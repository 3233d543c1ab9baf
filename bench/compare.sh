#!/usr/bin/env bash
# tinylm beside the PyTorch reference on the same model, batch and threads.
#
# usage: bench/compare.sh [TINYLM_BINARY] [FLAGS...]
#   TINYLM_BINARY  default build/tinylm (this script builds nothing)
#   FLAGS          flags of `tinylm bench` (see tinylm bench --help), given to
#                  both tools: --preset, --dim, --layers, --heads, --hidden,
#                  --context, --vocab, --batch, --steps, --warmup-steps,
#                  --threads, --streams, --gen-tokens, --prompt-tokens,
#                  --gemm-size, --gemm-reps, --seed, --only, --corpus, --vocab-train
# Threads default to all cores, passed explicitly to both. The tokenizer is
# measured on --corpus, by default data/sotu when it exists (tinylm only:
# PyTorch has no tokenizer). The PyTorch side is dev/bench_torch.py run by
# /usr/bin/python3 (Debian python3-torch); if that cannot import torch, the
# table has tinylm's column alone. TLM_TORCH_PYTHON names another Python for
# the PyTorch side.
# The tools run one after the other, never at the same time.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/build/tinylm"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then bin="$1"; shift; fi
if [ $# -gt 0 ] && { [ "$1" = "-h" ] || [ "$1" = "--help" ]; }; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 0
fi
if [ ! -x "$bin" ]; then
  echo "compare.sh: error: no tinylm binary at $bin: build it (cmake --build build) or pass its path first" >&2
  exit 2
fi

args=("$@")
has_flag() { local f; for f in "${args[@]}"; do case "$f" in "$1"|"$1"=*) return 0;; esac; done; return 1; }
if ! has_flag --threads; then
  cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
  args+=(--threads "$cores")
fi
if ! has_flag --corpus && [ -d "$root/data/sotu" ]; then args+=(--corpus "$root/data/sotu"); fi

# Python for the table: the system one (it also runs the PyTorch side).
py=/usr/bin/python3
[ -x "$py" ] || py="$(command -v python3 || true)"
if [ -z "$py" ]; then echo "compare.sh: error: python3 is needed to print the table" >&2; exit 2; fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "compare.sh: tinylm bench ${args[*]}" >&2
if ! "$bin" bench --json "${args[@]}" >"$tmp/tinylm.json"; then
  echo "compare.sh: error: tinylm bench failed (its message is above)" >&2
  exit 1
fi

tpy="${TLM_TORCH_PYTHON:-/usr/bin/python3}"
torch_note=""
if [ -x "$tpy" ] && torch_ver="$("$tpy" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
  echo "compare.sh: $tpy dev/bench_torch.py ${args[*]} (PyTorch $torch_ver)" >&2
  if ! "$tpy" "$root/dev/bench_torch.py" --json "${args[@]}" >"$tmp/torch.json"; then
    echo "compare.sh: error: dev/bench_torch.py failed (its message is above)" >&2
    exit 1
  fi
else
  torch_note="PyTorch: $tpy cannot import torch (install python3-torch): tinylm's figures alone"
  echo "compare.sh: $torch_note" >&2
fi

"$py" - "$tmp/tinylm.json" "$tmp/torch.json" "$bin" "$torch_note" "$tpy" <<'EOF'
import json, os, platform, sys, time

tl = json.load(open(sys.argv[1]))
pt = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
binary, note, tpy = sys.argv[3], sys.argv[4], sys.argv[5]

def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()

c = tl["config"]
print(f"tinylm vs PyTorch, {time.strftime('%Y-%m-%d %H:%M %Z')}")
print(f"machine: {tl['cpu']}, {os.cpu_count()} logical CPUs ({cores()} usable), {platform.system()} {platform.release()}")
print(f"tinylm:  {binary} {tl['version']}; {tl['device']}")
if pt:
    print(f"PyTorch: {pt['version']} ({tpy}, dev/bench_torch.py); {pt['device']}")
else:
    print(note)
print(f"model:   vocab {c['vocab']}, dim {c['dim']}, layers {c['layers']}, heads {c['heads']}, hidden {c['hidden']}, "
      f"context {c['context']}: {tl['params']:,} parameters, {tl['params_matmul']:,} in matrix products")
print(f"run:     batch {tl['batch']} x {c['context']}, {tl['warmup_steps']} warm-up + {tl['steps']} timed steps, "
      f"{tl['threads']} thread{'s' if tl['threads'] != 1 else ''}")
print()

def gen_rate(d, streams):
    for e in (d or {}).get("gen", []):
        if e["streams"] == streams:
            return e["tokens_per_s"]
    return None

def get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d

# (label, getter, format, higher is better)
rows = [
    ("training tokens/s", lambda d: get(d, "train_tokens_per_s"), "{:,.0f}", True),
    ("training model GFLOP/s", lambda d: get(d, "train_gflops"), "{:,.2f}", True),
    (f"fp32 sgemm peak GFLOP/s ({tl.get('sgemm_size', '?')}^3)", lambda d: get(d, "sgemm_gflops"), "{:,.1f}", True),
    ("training share of that peak", lambda d: get(d, "peak_share") and 100 * get(d, "peak_share"), "{:.1f}%", True),
    (f"prompt tokens/s ({tl.get('prompt_tokens', '?')}-token prompt)", lambda d: get(d, "prompt_tokens_per_s"), "{:,.0f}", True),
]
for e in tl.get("gen", []):
    s = e["streams"]
    rows.append((f"generation tokens/s, {s} stream{'s' if s != 1 else ''}", lambda d, s=s: gen_rate(d, s), "{:,.1f}", True))
if "tokenizer" in tl:
    t = tl["tokenizer"]
    rows += [
        (f"tokenizer training s (vocab {t['vocab']}, {t['bytes'] / 1e6:.1f} MB)", lambda d: get(d, "tokenizer", "train_seconds"), "{:.2f}", False),
        ("encoding MB/s, 1 thread", lambda d: get(d, "tokenizer", "encode_mb_s_1_thread"), "{:.1f}", True),
        (f"encoding MB/s, all {tl['threads']} thread{'s' if tl['threads'] != 1 else ''}", lambda d: get(d, "tokenizer", "encode_mb_s_all_threads"), "{:.1f}", True),
    ]
rows.append(("peak memory MB (max RSS, training alone)", lambda d: get(d, "peak_rss_bytes") and get(d, "peak_rss_bytes") / 1e6, "{:,.1f}", False))

w = max(len(r[0]) for r in rows) + 2
head = f"{'figure':<{w}}{'tinylm':>14}"
if pt:
    head += f"{'PyTorch':>14}{'ratio':>9}"
print(head)
print("-" * len(head))
for label, fn, fmt, higher in rows:
    a = fn(tl)
    if a is None:
        continue
    line = f"{label:<{w}}{fmt.format(a):>14}"
    if pt:
        b = fn(pt)
        line += f"{(fmt.format(b) if b is not None else '-'):>14}"
        line += f"{(f'{a / b:.2f}x' if b else '-'):>9}"
    print(line)
print()
if pt:
    print("ratio = tinylm / PyTorch: above 1 is better for tokens/s, GFLOP/s, share and MB/s; below 1 is better for seconds and memory.")
print(f"FLOPs per training token = {tl['flops_formula']} = {tl['flops_per_token']:,.0f} (model FLOPs, no recomputation).")
if tl.get("gen"):
    line = (f"generation: {tl['gen_new_tokens']} new tokens per stream after a {tl['gen_prompt_tokens']}-token random "
            f"prompt, temperature 0.8, top-p 0.95, end-of-text ignored")
    if tl["gen_context"] > c["context"]:
        line += f"; context raised to {tl['gen_context']} to fit (same weights: RoPE)"
    print(line)
if pt and "tokenizer" in tl:
    print("tokenizer: tinylm only (the PyTorch reference has no tokenizer).")
EOF
