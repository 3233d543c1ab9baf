#!/usr/bin/env bash
# The one-shot GPU check of the CUDA backend, for a session with a GPU lent
# for a few minutes: build, GPU tests, the rest of ctest, compute-sanitizer,
# the benchmark beside PyTorch, and a short table printed LAST. Logs go to
# $OUT (the device tool's folder that comes back) or build-gpu/logs.
#
# usage: bash bench/gpu_check.sh                 # on the GPU machine: part 1, the figures
#        bash bench/gpu_check.sh --checks        # on the GPU machine: part 2, the checks
#        bash bench/gpu_check.sh --prepare-deps  # here, before: see below
#
# The GPU machine has the CUDA toolkit, CMake and PyTorch but maybe not the
# C libraries tinylm builds with (OpenBLAS, PCRE2, cJSON, cmocka) nor
# pkg-config, and nothing can be installed there. --prepare-deps, run on a
# development machine, packs this machine's copies (headers, shared
# libraries, pkg-config files, pkgconf) into build-gpudeps/deps.tar.xz
# (about 5 MB); the GPU run unpacks it into /tmp when a library is missing.
# The device calls then carry it (the build folder stays on the machine
# between calls, so part 2 only relinks):
#     run(command="bash bench/gpu_check.sh", carry=["build-gpudeps", "data/sotu-prep"], timeout_s=540)
#     run(command="bash bench/gpu_check.sh --checks", carry=["build-gpudeps", "data/sotu-prep"], timeout_s=400)
#
# Each part stops starting steps past TLM_GPU_CHECK_BUDGET seconds (default
# 450) and cuts the last one short, so a call ends by ~8 minutes; the
# steps go most important first, with their time limits:
# part 1 (default), the figures:
#   build (Release, TLM_CUDA=ON)                                      180 s
#   test_cuda on the GPU: every op against the CPU reference in fp32, tf32
#     and bf16, graphs, sampling (max errors printed: TLM_TEST_VERBOSE)  90 s
#   200 training steps on the default corpus in bf16 on the GPU, val
#     losses against the CPU's fp32 run (bench/results/cpu200-metrics.jsonl;
#     needs data/sotu-prep carried), within 1% at every eval            90 s
#   tinylm bench --device cuda, seed preset, context 256: training at batch
#     256 and 64 in bf16, tf32 and fp32 (TLM_CUDA_DTYPE)            6 x 45 s
#   generation with 1 and 1024 streams, with the decode step as a CUDA
#     graph and without (TLM_NO_GRAPH=1)                            2 x 60 s
#   tinylm bench --only loader at batch 256 and 64 (bf16): steps fed by the
#     real loader vs the batch already on the device (target <= 1.02) 2 x 45 s
#   the fp32 sgemm peak and the bf16 (tensor-core) product peak    2 x 45 s
#   dev/bench_torch_gpu.py, the same model in PyTorch (eager fp32 and bf16
#     training, bf16 generation, the bf16 matmul peak for the MFU)    150 s
# part 2 (--checks):
#   compute-sanitizer memcheck, racecheck (training and generation) and
#     synccheck (generation) on a tiny model                       5 x 75 s
#   a GPU-trained run resumed on the CPU and a CPU-trained one on the GPU
#     (same checkpoint files)                                        4 x 60 s
#   ctest, everything but test_cuda (its CLI tests run on the GPU:
#     --device auto)                                                  150 s
# A step that fails or times out is reported in the table; the rest still
# run. TLM_TORCH_COMPILE=1 adds torch.compile to the PyTorch side (slow).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# ---- --prepare-deps: pack the build dependencies (run without a GPU) -----------
if [ "${1:-}" = "--prepare-deps" ]; then
  out="$root/build-gpudeps"
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/include/cjson" "$stage/lib/pkgconfig" "$stage/bin"
  obinc="$(pkg-config --variable=includedir openblas)"
  oblib="$(pkg-config --variable=libdir openblas)"
  cp "$obinc"/*.h "$stage/include/"
  cp /usr/include/pcre2.h /usr/include/cmocka.h /usr/include/cmocka_pbc.h "$stage/include/"
  cp /usr/include/cjson/cJSON.h "$stage/include/cjson/"
  # runtime libraries by soname, plus the unversioned names the linker wants
  copy_lib() { # copy_lib SONAME_PATH DEVNAME
    local real; real="$(readlink -f "$1")"
    cp "$real" "$stage/lib/$(basename "$1")"
    [ -n "${2:-}" ] && ln -sf "$(basename "$1")" "$stage/lib/$2"
    return 0
  }
  copy_lib "$oblib/libopenblas.so.0" libopenblas.so
  for l in libgfortran.so.5 libquadmath.so.0; do
    p="$(ldconfig -p | awk -v l="$l" '$1 == l && /x86-64/ { print $NF; exit }')"
    [ -n "$p" ] && copy_lib "$p"
  done
  copy_lib "$(ldconfig -p | awk '$1 == "libpcre2-8.so.0" && /x86-64/ { print $NF; exit }')" libpcre2-8.so
  copy_lib "$(ldconfig -p | awk '$1 == "libcjson.so.1" && /x86-64/ { print $NF; exit }')" libcjson.so
  copy_lib "$(ldconfig -p | awk '$1 == "libcmocka.so.0" && /x86-64/ { print $NF; exit }')" libcmocka.so
  copy_lib "$(ldconfig -p | awk '$1 == "libpkgconf.so.3" && /x86-64/ { print $NF; exit }')"
  cp "$(readlink -f "$(command -v pkgconf)")" "$stage/bin/pkgconf"
  ln -sf pkgconf "$stage/bin/pkg-config"
  # pkg-config files with a placeholder prefix, set when unpacked
  pc() { # pc NAME VERSION LIBS
    printf 'prefix=@PREFIX@\nlibdir=${prefix}/lib\nincludedir=${prefix}/include\n\nName: %s\nDescription: %s (bundled for the GPU check)\nVersion: %s\nLibs: -L${libdir} %s\nCflags: -I${includedir}\n' \
      "$1" "$1" "$2" "$3" >"$stage/lib/pkgconfig/$1.pc"
  }
  pc openblas "$(pkg-config --modversion openblas)" "-lopenblas"
  pc libpcre2-8 "$(pkg-config --modversion libpcre2-8)" "-lpcre2-8"
  pc libcjson "$(pkg-config --modversion libcjson)" "-lcjson"
  pc cmocka "$(pkg-config --modversion cmocka)" "-lcmocka"
  mkdir -p "$out"
  tar -C "$stage" -cJf "$out/deps.tar.xz" .
  echo "gpu_check: wrote $out/deps.tar.xz ($(du -h "$out/deps.tar.xz" | cut -f1)); carry build-gpudeps in the device call"
  exit 0
fi

# ---- the GPU run -------------------------------------------------------------------
part=bench
case "${1:-}" in
  "") ;;
  --checks) part=checks ;;
  *) echo "gpu_check: unknown argument '$1': use --checks, --prepare-deps or nothing" >&2; exit 2 ;;
esac
logs="${OUT:-$root/build-gpu/logs}"
mkdir -p "$logs"
build="$root/build-gpu"
t_start=$(date +%s)
declare -A RES      # step -> result text for the table
log() { echo "[gpu_check +$(( $(date +%s) - t_start ))s] $*" | tee -a "$logs/summary.txt"; }
# step NAME LIMIT CMD...: run with a time limit, output to $logs/NAME.log
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s)
  if [ $(( t0 - t_start )) -gt "${TLM_GPU_CHECK_BUDGET:-450}" ]; then
    log "$name: skipped (past the ${TLM_GPU_CHECK_BUDGET:-450}s budget)"
    return 125
  fi
  [ $(( t0 - t_start + limit )) -gt "${TLM_GPU_CHECK_BUDGET:-450}" ] && limit=$(( ${TLM_GPU_CHECK_BUDGET:-450} - t0 + t_start + 30 ))
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "$name: TIMED OUT after ${limit}s (log $name.log)"
  elif [ $rc -ne 0 ]; then log "$name: FAILED rc=$rc in ${dt}s (log $name.log); last lines:"; tail -5 "$logs/$name.log" | sed 's/^/    /' | tee -a "$logs/summary.txt"
  else log "$name: ok in ${dt}s"; fi
  return $rc
}

log "start ($part) on $(hostname), $(nproc) cores"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null ||
  echo "no GPU (nvidia-smi failed)"; } | tee "$logs/gpu.txt"
gpu_name="$(head -1 "$logs/gpu.txt" | cut -d, -f1)"
nvcc_bin="$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || true)"
log "nvcc: ${nvcc_bin:-none} $($nvcc_bin --version 2>/dev/null | tail -2 | head -1); cmake: $(cmake --version | head -1)"

# dependencies: the machine's, else the bundle (whose libraries must not
# leak into PyTorch's process: it gets the original library path back)
orig_ld="${LD_LIBRARY_PATH:-}"
if ! { command -v pkg-config >/dev/null && pkg-config --exists openblas libpcre2-8 libcjson cmocka; }; then
  if [ -f "$root/build-gpudeps/deps.tar.xz" ]; then
    deps=/tmp/tlm-gpudeps
    rm -rf "$deps" && mkdir -p "$deps" && tar -C "$deps" -xJf "$root/build-gpudeps/deps.tar.xz"
    sed -i "s|@PREFIX@|$deps|" "$deps"/lib/pkgconfig/*.pc
    export PATH="$deps/bin:$PATH" PKG_CONFIG_LIBDIR="$deps/lib/pkgconfig" PKG_CONFIG_PATH="$deps/lib/pkgconfig"
    export LD_LIBRARY_PATH="$deps/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" LIBRARY_PATH="$deps/lib"
    log "using the bundled build dependencies (build-gpudeps/deps.tar.xz)"
  else
    log "missing build dependencies (OpenBLAS, PCRE2, cJSON, cmocka or pkg-config) and no build-gpudeps/deps.tar.xz:" \
        "run bash bench/gpu_check.sh --prepare-deps on the development machine and carry build-gpudeps"
  fi
fi

cuda_args=(-DTLM_CUDA=ON)
[ -n "$nvcc_bin" ] && cuda_args+=(-DCMAKE_CUDA_COMPILER="$nvcc_bin")
if step configure 120 cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release "${cuda_args[@]}" &&
   step build 180 cmake --build "$build" -j"$(nproc)"; then
  RES[build]="ok"
else
  RES[build]="FAILED (see build.log / configure.log)"
  log "cannot continue without a build"
fi
bin="$build/tinylm"
# a tiny corpus for the short runs (sanitizers, resume)
w="$build/check"
if [ -x "$bin" ]; then
  rm -rf "$w" && mkdir -p "$w/corpus"
  for d in 1 2 3 4 5 6 7 8; do
    for i in $(seq 1 80); do echo "Document $d, line $i: the quick brown fox jumps over the lazy dog $((d*i)) times."; done \
      >"$w/corpus/doc$d.txt"
  done
  [ "$part" = checks ] && step prepare 60 "$bin" prepare --input "$w/corpus" --out "$w/data" --vocab 300 --val-fraction 0.2
fi
TR=(train --data "$w/data" --preset tiny --batch 4 --eval-every 3 --eval-batches 1 --log-every 1 --device cuda)

if [ -x "$bin" ] && [ "$part" = bench ]; then
  # ---- the GPU tests: every op against the CPU reference, graphs, sampling ----
  TLM_TEST_VERBOSE=1 step test_cuda 90 "$build/test_cuda"
  RES[test_cuda]="$(grep -E '^\[  (PASSED|FAILED|SKIPPED) *\]' "$logs/test_cuda.log" | grep -E 'test\(s\)|PASSED' | head -3 | tr -s ' ' | tr '\n' ' ')"
  grep -q '^SKIPPED: no CUDA GPU' "$logs/test_cuda.log" && RES[test_cuda]="$(grep '^SKIPPED' "$logs/test_cuda.log")"

  # ---- 200 steps on the default corpus: the GPU (bf16) curve against the
  # CPU's (fp32), committed in bench/results/cpu200-metrics.jsonl; needs the
  # prepared corpus carried along (carry data/sotu-prep) ----
  ref="$root/bench/results/cpu200-metrics.jsonl"
  if [ -f "$root/data/sotu-prep/train.bin" ] && [ -f "$ref" ]; then
    rm -rf "$w/run200"
    if step curve200 90 "$bin" train --data "$root/data/sotu-prep" --out "$w/run200" --preset seed --batch 16 \
         --lr 1e-3 --min-lr 1e-4 --warmup 100 --max-steps 200 --eval-every 50 --seed 1337 --device cuda; then
      RES[curve200_bf16_vs_cpu]="$(python3 - "$ref" "$w/run200/metrics.jsonl" <<'EOF2'
import json, sys
def vals(p):
    return {r["step"]: r["val_loss"] for r in map(json.loads, open(p)) if r.get("val_loss") is not None}
cpu, gpu = vals(sys.argv[1]), vals(sys.argv[2])
worst = max(abs(gpu[s] - cpu[s]) / cpu[s] for s in cpu if s in gpu) if set(cpu) & set(gpu) else None
pairs = " ".join(f"{s}:{gpu.get(s, float('nan')):.4f}/{cpu[s]:.4f}" for s in sorted(cpu))
print(("ok" if worst is not None and worst <= 0.01 and set(cpu) <= set(gpu) else "FAILED") +
      f" (val gpu/cpu {pairs}; worst {100 * worst:.2f}% of 1%)" if worst is not None else "FAILED (no common evals)")
EOF2
)"
    else
      RES[curve200_bf16_vs_cpu]="FAILED (see curve200.log)"
    fi
  else
    RES[curve200_bf16_vs_cpu]="skipped: carry data/sotu-prep (and bench/results/cpu200-metrics.jsonl)"
  fi

  # ---- benchmark: tinylm, the targets' rows first ----
  B=(bench --device cuda --preset seed --json --warmup-steps 3 --steps 10)
  for cfg in bf16:256 bf16:64 tf32:256 tf32:64 fp32:64 fp32:256; do
    dt="${cfg%%:*}" b="${cfg##*:}"
    TLM_CUDA_DTYPE=$dt step "bench_train_${dt}_b$b" 45 "$bin" "${B[@]}" --only train --batch $b
  done
  # generation runs the packed path (bf16 weights, fp16 KV cache: --dtype
  # auto of generation), whatever TLM_CUDA_DTYPE says; the decode step as a
  # CUDA graph, then op by op (TLM_NO_GRAPH=1) for the comparison
  step bench_gen 60 "$bin" "${B[@]}" --only gen,prompt --streams 1,1024 --gen-tokens 48 --prompt-tokens 128
  TLM_NO_GRAPH=1 step bench_gen_nograph 60 "$bin" "${B[@]}" --only gen --streams 1,1024 --gen-tokens 48 --prompt-tokens 128
  # the data pipeline: steps fed by the loader (pinned ring, uploads on the
  # copy stream) against steps on a batch already on the device, alternating
  # blocks; the real corpus when carried, else synthetic tokens
  LD=(); [ -f "$root/data/sotu-prep/train.bin" ] && LD=(--data "$root/data/sotu-prep")
  for b in 256 64; do
    TLM_CUDA_DTYPE=bf16 step "bench_loader_b$b" 45 "$bin" "${B[@]}" --only loader --batch $b --loader-rounds 3 "${LD[@]}"
  done
  step bench_sgemm 45 "$bin" "${B[@]}" --only sgemm --gemm-size 8192 --gemm-reps 3
  # the bf16 peak that MFU is measured against: the same product with bf16
  # operands and output on the tensor cores (the backend's bf16 mode)
  TLM_CUDA_DTYPE=bf16 step bench_gemm_bf16 45 "$bin" "${B[@]}" --only sgemm --gemm-size 8192 --gemm-reps 5

  # ---- benchmark: PyTorch ----
  py="$(command -v python3 || true)"
  if [ -n "$py" ] && LD_LIBRARY_PATH="$orig_ld" "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    targs=(--json --batches 64,256 --streams 1,1024 --gen-tokens 48 --prompt-tokens 128)
    [ "${TLM_TORCH_COMPILE:-0}" = 1 ] && targs+=(--compile)
    LD_LIBRARY_PATH="$orig_ld" step torch 150 "$py" "$root/dev/bench_torch_gpu.py" "${targs[@]}"
  else
    echo '{"error": "python3 with CUDA PyTorch not available"}' >"$logs/torch.log"
  fi
fi

if [ -x "$bin" ] && [ "$part" = checks ]; then
  # ---- compute-sanitizer on a tiny model: training and generation ----
  cs="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
  if [ -n "$cs" ]; then
    san() { # san NAME TOOL CMD...
      local name="$1" tool="$2"; shift 2
      step "$name" 75 "$cs" --tool "$tool" --error-exitcode 99 --print-limit 20 "$@"
      local rc=$?
      local errs; errs="$(grep -Eo 'ERROR SUMMARY: [0-9]+ error|RACECHECK SUMMARY: [0-9]+ hazard' "$logs/$name.log" | tail -1)"
      RES[$name]="${errs:-no summary} (rc $rc)"
    }
    san memcheck_train memcheck "$bin" "${TR[@]}" --out "$w/run_mc" --max-steps 3
    san racecheck_train racecheck "$bin" "${TR[@]}" --out "$w/run_rc" --max-steps 2
    if [ -d "$w/run_mc" ]; then
      san memcheck_generate memcheck "$bin" generate --model "$w/run_mc" --prompt "the quick" --max-tokens 12 --samples 3 --device cuda --seed 1
      san racecheck_generate racecheck "$bin" generate --model "$w/run_mc" --prompt "the quick" --max-tokens 6 --samples 2 --device cuda --seed 1
      san synccheck_generate synccheck "$bin" generate --model "$w/run_mc" --prompt "the quick" --max-tokens 6 --samples 2 --device cuda --seed 1
    fi
  else
    RES[memcheck_train]="compute-sanitizer not found"
  fi
  # ---- the same checkpoint files: trained on the GPU, resumed on the CPU,
  # and the other way round ----
  if step resume_gpu 60 "$bin" "${TR[@]}" --out "$w/run_x" --max-steps 4 &&
     step resume_cpu 60 "$bin" train --data "$w/data" --out "$w/run_x" --resume --max-steps 6 --device cpu; then
    RES[gpu_to_cpu_resume]="ok"
  else
    RES[gpu_to_cpu_resume]="FAILED"
  fi
  if step resume_cpu0 60 "$bin" train --data "$w/data" --out "$w/run_y" --preset tiny --batch 4 --eval-every 3 \
       --eval-batches 1 --log-every 1 --max-steps 4 --device cpu &&
     step resume_gpu2 60 "$bin" train --data "$w/data" --out "$w/run_y" --resume --max-steps 6 --device cuda; then
    RES[cpu_to_gpu_resume]="ok"
  else
    RES[cpu_to_gpu_resume]="FAILED"
  fi
  # ---- the rest of the test suite (its CLI tests run on the GPU too:
  # --device auto); not test_cuda (the other part ran it) nor its emulator
  # run (CPU only) ----
  (cd "$build" && step ctest 150 ctest -j8 --output-on-failure -E '^test_cuda')
  RES[ctest]="$(grep -E 'tests passed|tests failed' "$logs/ctest.log" | tail -1)"
fi

# ---- the table (last) ----
log "done in $(( $(date +%s) - t_start ))s"
{
echo
echo "==================== gpu_check: $gpu_name, $(date -u +%Y-%m-%d) ===================="
for k in build test_cuda curve200_bf16_vs_cpu ctest memcheck_train racecheck_train memcheck_generate \
         racecheck_generate synccheck_generate gpu_to_cpu_resume cpu_to_gpu_resume; do
  [ -n "${RES[$k]:-}" ] && printf '%-20s %s\n' "$k" "${RES[$k]}"
done
[ "$part" = bench ] && python3 - "$logs" <<'EOF'
import json, os, sys
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name + ".log")
    if not os.path.exists(p):
        return None
    # the last JSON object of the log: tinylm prints it over many lines
    # (cJSON_Print), PyTorch's script on one; progress lines may precede it
    text = open(p, errors="replace").read()
    starts = [i for i in range(len(text)) if text[i] == "{" and (i == 0 or text[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            return json.JSONDecoder().raw_decode(text[i:])[0]
        except ValueError:
            pass
    return None
tl = {k: load(k) for k in ["bench_train_fp32_b64", "bench_train_fp32_b256", "bench_train_tf32_b64",
                           "bench_train_tf32_b256", "bench_train_bf16_b64", "bench_train_bf16_b256", "bench_gen",
                           "bench_gen_nograph", "bench_sgemm", "bench_gemm_bf16"]}
pt = load("torch") or {}
# MFU against the bf16 product peak of this GPU: tinylm's own measurement
# (bench_gemm_bf16), else PyTorch's
own_bf16 = (tl.get("bench_gemm_bf16") or {}).get("sgemm_gflops")
if (tl.get("bench_gemm_bf16") or {}).get("sgemm_dtype") != "bf16":
    own_bf16 = None
peak_bf16 = own_bf16 / 1e3 if own_bf16 else (pt.get("peak") or {}).get("bf16_tflops")
fpt = next((v["flops_per_token"] for v in tl.values() if v and "flops_per_token" in v), pt.get("flops_per_token"))
def fmt(x, unit=""):
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x/1e6:.2f}M{unit}"
    if x >= 1e3:
        return f"{x/1e3:.1f}K{unit}"
    return f"{x:.0f}{unit}"
def torch_train(mode, b):
    for r in pt.get("train", []):
        if r.get("mode") == mode and r.get("batch") == b:
            return r.get("tokens_per_s")
def torch_train_mem(mode, b):
    for r in pt.get("train", []):
        if r.get("mode") == mode and r.get("batch") == b:
            return r.get("peak_mem_bytes")
def torch_gen(s):
    for r in pt.get("gen", []):
        if r.get("streams") == s:
            return r.get("tokens_per_s")
def tl_gen(k, s):
    j = tl.get(k) or {}
    for r in j.get("gen", []):
        if r.get("streams") == s:
            return r.get("tokens_per_s")
def mfu(tps):
    if tps is None or not fpt or not peak_bf16:
        return "-"
    return f"{100 * tps * fpt / (peak_bf16 * 1e12):.1f}%"
print(f"{'figure (seed preset, T=256)':34} {'tinylm':>10} {'MFU':>6} {'PyTorch':>10}  target")
rows = [("train tok/s b64 fp32", "bench_train_fp32_b64", "fp32", 64, "-"),
        ("train tok/s b64 tf32", "bench_train_tf32_b64", "tf32", 64, "-"),
        ("train tok/s b64 bf16", "bench_train_bf16_b64", "bf16", 64, ">= 1.2M"),
        ("train tok/s b256 fp32", "bench_train_fp32_b256", "fp32", 256, "-"),
        ("train tok/s b256 tf32", "bench_train_tf32_b256", "tf32", 256, "-"),
        ("train tok/s b256 bf16", "bench_train_bf16_b256", "bf16", 256, ">= 3.7M")]
for name, k, mode, b, target in rows:
    j = tl.get(k) or {}
    v = j.get("train_tokens_per_s")
    print(f"{name:34} {fmt(v):>10} {mfu(v):>6} {fmt(torch_train(mode, b)):>10}  {target}")
for b in (64, 256):
    tm = (tl.get(f"bench_train_bf16_b{b}") or {}).get("device_peak_bytes")
    pm = torch_train_mem("bf16", b)
    print(f"{'peak GPU MB, train b' + str(b) + ' bf16':34} {(f'{tm / 1e6:.0f}' if tm else '-'):>10} {'':>6} "
          f"{(f'{pm / 1e6:.0f}' if pm else '-'):>10}")
for s, target in ((1, ">= 5,000"), (1024, ">= 1.25M")):
    print(f"{'gen tok/s ' + str(s) + ' stream' + ('s' if s > 1 else '') + ' (bf16)':34} "
          f"{fmt(tl_gen('bench_gen', s)):>10} {'':>6} {fmt(torch_gen(s)):>10}  {target}")
for s in (1, 1024):
    print(f"{'  ' + str(s) + ' stream' + ('s' if s > 1 else '') + ', no CUDA graph':34} {fmt(tl_gen('bench_gen_nograph', s)):>10}")
for b in (64, 256):
    l = (load(f"bench_loader_b{b}") or {}).get("loader") or {}
    r = l.get("ratio")
    print(f"{'loader/on-device step b' + str(b) + ' bf16':34} {(f'{r:.3f}' if r else '-'):>10} {'':>6} {'':>10}  "
          f"<= 1.02{' (pinned)' if l.get('pinned') else (' (NOT pinned)' if l else '')}")
pr = (tl.get("bench_gen") or {}).get("prompt_tokens_per_s")
print(f"{'prompt tok/s (1 stream, 128)':34} {fmt(pr):>10}")
sg = (tl.get("bench_sgemm") or {}).get("sgemm_gflops")
print(f"{'fp32 sgemm 8192^3 TFLOP/s':34} {fmt(sg / 1e3 if sg else None):>10} {'':>6} "
      f"{fmt((pt.get('peak') or {}).get('fp32_tflops')):>10}")
print(f"{'bf16 matmul peak TFLOP/s 8192^3':34} {fmt(own_bf16 / 1e3 if own_bf16 else None):>10} {'':>6} "
      f"{fmt((pt.get('peak') or {}).get('bf16_tflops')):>10}")
print(f"(MFU against the {'tinylm' if own_bf16 else 'PyTorch'} bf16 peak)")
if "error" in pt:
    print("PyTorch:", pt["error"])
for k, v in tl.items():
    if v is None:
        print(f"(no result from {k}: see its log)")
EOF
echo "logs: $logs"
} 2>&1 | tee "$logs/table.txt"
