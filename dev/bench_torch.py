"""
The PyTorch peer of `tinylm bench`: the same measurements on the model of
dev/reference.py, written the way a typical PyTorch user's script is (eager,
fp32, torch.optim.AdamW, a plain KV cache for generation).

Run with the system Python that has PyTorch 1.13 (Debian python3-torch,
which uses OpenBLAS):

    /usr/bin/python3 dev/bench_torch.py [--threads N] [--json] ...

The flags and the JSON keys are those of `tinylm bench`, so bench/compare.sh
can put the two side by side. What is measured, and how FLOPs are counted,
is the same as there (see `tinylm bench --help`):
  - training: random-init model, random tokens, --warmup-steps untimed and
    --steps timed steps of zero_grad, forward, loss, backward,
    clip_grad_norm_(1.0), AdamW step; tokens/s = batch*context*steps/time.
  - the peak: best of --gemm-reps n x n x n torch.mm, one untimed first.
  - prompt: the prompt forward of the KV-cached model (1 stream), best of 3.
  - generation: --gen-tokens new tokens per stream after the prompt (computed
    once, its cache copied to every stream), temperature 0.8, top-p 0.95;
    tokens/s = sampled tokens / time after the prompt.
  - peak memory: VmHWM of a process that runs only the training benchmark
    (this script re-run with --only train).
The tokenizer has no PyTorch counterpart: --corpus and --vocab-train are
accepted so the same flags work for both tools, and ignored.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT_REPS = 3
TEMPERATURE = 0.8
TOP_P = 0.95
PRESETS = {
    "seed": dict(vocab=2560, dim=256, layers=10, heads=8, hidden=704, context=256),
    "tiny": dict(vocab=512, dim=64, layers=2, heads=4, hidden=176, context=64),
}
SECTIONS = {"train", "sgemm", "prompt", "gen", "memory"}


def fail(msg, code=2):
    print(f"bench_torch: error: {msg}", file=sys.stderr)
    sys.exit(code)


def parse_args(argv):
    def positive(lo):
        def f(s):
            try:
                v = int(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expects an integer, got '{s}'")
            if v < lo:
                raise argparse.ArgumentTypeError(f"{v} is out of range: use {lo} or more")
            return v
        return f

    p = argparse.ArgumentParser(description="PyTorch peer of `tinylm bench` (same flags, same JSON keys).")
    p.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    for name in ("vocab", "dim", "layers", "heads", "hidden", "context"):
        p.add_argument("--" + name, type=positive(1), default=None)
    p.add_argument("--batch", type=positive(1), default=16)
    p.add_argument("--steps", type=positive(1), default=10)
    p.add_argument("--warmup-steps", type=positive(0), default=2)
    p.add_argument("--gemm-size", type=positive(1), default=2048)
    p.add_argument("--gemm-reps", type=positive(1), default=5)
    p.add_argument("--prompt-tokens", type=positive(1), default=128)
    p.add_argument("--gen-tokens", type=positive(1), default=256)
    p.add_argument("--streams", default="1,64")
    p.add_argument("--threads", type=positive(0), default=0, help="0 = all cores")
    p.add_argument("--seed", type=positive(0), default=1337)
    p.add_argument("--only", default=None, help="comma-separated subset of train, sgemm, prompt, gen, memory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu only (accepted for flag compatibility)")
    p.add_argument("--corpus", default=None, help="ignored: the tokenizer has no PyTorch counterpart")
    p.add_argument("--vocab-train", type=positive(257), default=2560, help="ignored, as --corpus")
    p.add_argument("--check", action="store_true",
                   help="verify the KV-cached forward against the full forward and exit")
    a = p.parse_args(argv)
    if a.device != "cpu":
        fail(f"--device {a.device}: the PyTorch peer runs on the CPU only")
    try:
        a.streams = [int(s) for s in a.streams.split(",")]
        if not a.streams or min(a.streams) < 1:
            raise ValueError
    except ValueError:
        fail(f"--streams expects comma-separated positive counts like 1,64, got '{a.streams}'")
    if a.only is None:
        a.sections = set(SECTIONS)
    else:
        a.sections = set()
        for s in a.only.split(","):
            s = "memory" if s == "peak" else s
            if s == "tokenizer":
                continue  # nothing to measure here; the table shows tinylm's alone
            if s not in SECTIONS:
                fail(f"--only '{a.only}' names an unknown part '{s}': use train, sgemm, prompt, gen or memory")
            a.sections.add(s)
    cfg = dict(PRESETS[a.preset])
    for name in cfg:
        if getattr(a, name) is not None:
            cfg[name] = getattr(a, name)
    if cfg["dim"] % cfg["heads"] or (cfg["dim"] // cfg["heads"]) % 2:
        fail(f"--dim {cfg['dim']} / --heads {cfg['heads']} must give an even head size")
    a.cfg = cfg
    if a.threads == 0:
        a.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return a


ARGS = parse_args(sys.argv[1:])
# Thread pools are sized when the libraries load: set them before importing
# torch. torch.set_num_threads covers OpenMP; OpenBLAS (pthreads build) keeps
# its own pool, sized by OPENBLAS_NUM_THREADS.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    fail(f"PyTorch is not importable from {sys.executable} ({e}): install python3-torch", code=3)

sys.path.insert(0, HERE)
from reference import Config, LlamaRef, make_optimizer, rotate_half, rope_cos_sin  # noqa: E402


# ---- model --------------------------------------------------------------------------

def make_model(cfg, context, seed):
    torch.manual_seed(seed)
    c = Config(vocab=cfg["vocab"], dim=cfg["dim"], layers=cfg["layers"], heads=cfg["heads"],
               hidden=cfg["hidden"], context=context)
    m = LlamaRef(c)
    # tinylm's initialisation: N(0, 0.02), residual outputs scaled by 1/sqrt(2L), norms 1.
    with torch.no_grad():
        out_scale = 1.0 / math.sqrt(2.0 * c.layers)
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
                if "o_proj" in name or "down_proj" in name:
                    p.mul_(out_scale)
    return m


def matmul_params(cfg):
    D, Fh, L, V = cfg["dim"], cfg["hidden"], cfg["layers"], cfg["vocab"]
    return L * (4 * D * D + 3 * D * Fh) + V * D


def param_count(cfg):
    D, L = cfg["dim"], cfg["layers"]
    return matmul_params(cfg) + L * 2 * D + D  # + the norm weights


def flops_per_token(cfg, T):
    return 6.0 * matmul_params(cfg) + 6.0 * cfg["layers"] * cfg["dim"] * (T + 1.0)


def random_tokens(n, V, gen):
    # ids 0..V-2: V-1 is the end-of-text id, as in tinylm bench
    return torch.randint(0, max(V - 1, 1), (n,), generator=gen)


# ---- training -----------------------------------------------------------------------

def bench_train(a):
    cfg, B, T = a.cfg, a.batch, a.cfg["context"]
    m = make_model(cfg, T, a.seed)
    opt = make_optimizer(m, lr=1e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(a.seed)
    x = random_tokens(B * T, cfg["vocab"], g).view(B, T)
    y = random_tokens(B * T, cfg["vocab"], g).view(B, T)
    loss_first = loss_last = float("nan")
    t0 = time.perf_counter()
    for s in range(a.warmup_steps + a.steps):
        if s == a.warmup_steps:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = m.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        lv = float(loss)
        if not math.isfinite(lv):
            fail(f"training step {s + 1} gave a non-finite loss", code=1)
        if s == 0:
            loss_first = lv
        loss_last = lv
    dt = time.perf_counter() - t0
    tokens = B * T * a.steps
    tps = tokens / dt if dt > 0 else 0.0
    fpt = flops_per_token(cfg, T)
    return dict(train_tokens=tokens, train_seconds=dt, train_tokens_per_s=tps, train_loss_first=loss_first,
                train_loss_last=loss_last, train_gflops=fpt * tps / 1e9)


# ---- sgemm peak -----------------------------------------------------------------------

def bench_sgemm(n, reps):
    g = torch.Generator().manual_seed(42)
    A = torch.rand(n, n, generator=g) - 0.5
    Bm = torch.rand(n, n, generator=g) - 0.5
    C = torch.empty(n, n)
    best = 0.0
    for k in range(reps + 1):  # the first is untimed: thread start-up, first touch
        t0 = time.perf_counter()
        torch.mm(A, Bm.t(), out=C)
        dt = time.perf_counter() - t0
        if k > 0 and dt > 0:
            best = max(best, 2.0 * n ** 3 / dt / 1e9)
    return best


# ---- generation ----------------------------------------------------------------------

class Cache:
    """Per layer k, v: [B, H, Tmax, hd]; rotary tables for every position."""

    def __init__(self, m, B, Tmax):
        c = m.cfg
        hd = c.dim // c.heads
        self.k = [torch.zeros(B, c.heads, Tmax, hd) for _ in range(c.layers)]
        self.v = [torch.zeros(B, c.heads, Tmax, hd) for _ in range(c.layers)]
        self.cos, self.sin = rope_cos_sin(Tmax, hd, c.rope_theta, torch.float32)


def forward_cached(m, cache, tokens, pos0):
    """tokens [B, T] at positions pos0..pos0+T-1 -> logits of the last position [B, V]."""
    B, T = tokens.shape
    c = m.cfg
    H, hd = c.heads, c.dim // c.heads
    cos, sin = cache.cos[pos0:pos0 + T], cache.sin[pos0:pos0 + T]
    end = pos0 + T
    mask = None
    if T > 1:  # query i (position pos0+i) sees keys 0..pos0+i
        mask = torch.ones(T, end, dtype=torch.bool).triu(pos0 + 1)
    x = m.model.embed_tokens(tokens)
    for l, layer in enumerate(m.model.layers):
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q = att.q_proj(h).view(B, T, H, hd).transpose(1, 2)
        k = att.k_proj(h).view(B, T, H, hd).transpose(1, 2)
        v = att.v_proj(h).view(B, T, H, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        cache.k[l][:B, :, pos0:end] = k
        cache.v[l][:B, :, pos0:end] = v
        keys, vals = cache.k[l][:B, :, :end], cache.v[l][:B, :, :end]
        scores = (q @ keys.transpose(-2, -1)) / math.sqrt(hd)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ vals).transpose(1, 2).reshape(B, T, c.dim)
        x = x + att.o_proj(out)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = m.model.norm(x[:, -1])
    return F.linear(x, m.model.embed_tokens.weight)


def sample(logits, gen):
    """Temperature, then top-p (smallest most-likely set with mass >= TOP_P)."""
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    sp, si = torch.sort(probs, dim=-1, descending=True)
    before = torch.cumsum(sp, dim=-1) - sp
    sp = sp.masked_fill(before >= TOP_P, 0.0)
    pick = torch.multinomial(sp, 1, generator=gen)
    return torch.gather(si, -1, pick)  # [B, 1]


def bench_prompt(m, prompt):
    best = None
    for _ in range(PROMPT_REPS):
        cache = Cache(m, 1, prompt.shape[1])
        t0 = time.perf_counter()
        forward_cached(m, cache, prompt, 0)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return prompt.shape[1] / best if best else 0.0


def bench_generate(m, prompt, streams, max_tokens, seed):
    P = prompt.shape[1]
    cache = Cache(m, streams, P + max_tokens)
    gen = torch.Generator().manual_seed(seed)
    logits = forward_cached(m, cache, prompt, 0)  # the prompt once, as stream 0
    for l in range(len(cache.k)):
        cache.k[l][1:, :, :P] = cache.k[l][:1, :, :P]
        cache.v[l][1:, :, :P] = cache.v[l][:1, :, :P]
    logits = logits.expand(streams, -1)
    t0 = time.perf_counter()
    new = 0
    for k in range(max_tokens):
        tok = sample(logits, gen)
        new += streams
        if k == max_tokens - 1:
            break
        logits = forward_cached(m, cache, tok, P + k)
    dt = time.perf_counter() - t0
    return dict(streams=streams, new_tokens=new, seconds=dt, tokens_per_s=new / dt if dt > 0 else 0.0)


def check(a):
    """The cached forward (prompt, then one token at a time) against the full forward."""
    m = make_model(a.cfg, a.cfg["context"], a.seed)
    g = torch.Generator().manual_seed(a.seed)
    T = min(a.cfg["context"], 24)
    toks = random_tokens(2 * T, a.cfg["vocab"], g).view(2, T)
    with torch.inference_mode():
        full = m(toks)  # [2, T, V]
        cache = Cache(m, 2, T)
        P = T // 2
        worst = (forward_cached(m, cache, toks[:, :P], 0) - full[:, P - 1]).abs().max().item()
        for t in range(P, T):
            out = forward_cached(m, cache, toks[:, t:t + 1], t)
            worst = max(worst, (out - full[:, t]).abs().max().item())
    ok = worst < 1e-4
    print(f"bench_torch check: cached vs full forward, max |difference| {worst:.2e}: {'ok' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


# ---- machine ----------------------------------------------------------------------------

def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def blas_in_use():
    """The BLAS library this process actually mapped (torch's build info says 'generic')."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return "unknown BLAS"
    for lib in sorted(libs):
        base = os.path.basename(lib)
        if "openblas" in base:
            return "OpenBLAS (" + base + ")"
    for lib in sorted(libs):
        base = os.path.basename(lib)
        if "mkl" in base or "blis" in base or base.startswith("libblas"):
            return base
    return "unknown BLAS"


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def train_child(a):
    """This script again with --only train: its peak memory is training's alone."""
    cmd = [sys.executable, os.path.abspath(__file__), "--only", "train", "--json", "--threads", str(a.threads),
           "--batch", str(a.batch), "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
           "--seed", str(a.seed)]
    for name in ("vocab", "dim", "layers", "heads", "hidden", "context"):
        cmd += ["--" + name, str(a.cfg[name])]
    r = subprocess.run(cmd, stdout=subprocess.PIPE)
    if r.returncode != 0:
        sys.exit(r.returncode)  # the child printed its error
    return json.loads(r.stdout)


# ---- main ---------------------------------------------------------------------------------

def main():
    a = ARGS
    if a.check:
        check(a)
    torch.set_num_threads(a.threads)
    cfg, S = a.cfg, a.sections
    res = dict(tool="pytorch", version=torch.__version__, threads=a.threads, config=dict(cfg),
               params=param_count(cfg),
               params_matmul=matmul_params(cfg), flops_per_token=flops_per_token(cfg, cfg["context"]),
               flops_formula="6*P_matmul + 6*L*D*(T+1); P_matmul = L*(4*D^2 + 3*D*F) + V*D",
               batch=a.batch, steps=a.steps, warmup_steps=a.warmup_steps)
    progress = (lambda what: None) if not sys.stderr.isatty() else \
        (lambda what: print(f"bench_torch: {what}...", file=sys.stderr))
    in_process = bool(S & {"train", "memory"}) and not (S - {"train", "memory"})
    if S & {"train", "memory"}:
        if in_process:
            progress("training")
            res.update(bench_train(a))
            res["peak_rss_bytes"] = peak_rss()
            res["peak_rss_of"] = "training alone"
        else:
            progress("training (separate process)")
            child = train_child(a)
            if "train" in S:
                for k, v in child.items():
                    if k.startswith("train_"):
                        res[k] = v
            if "memory" in S:
                res["peak_rss_bytes"] = child["peak_rss_bytes"]
                res["peak_rss_of"] = "training alone"
    if "sgemm" in S:
        progress("sgemm peak")
        res.update(sgemm_size=a.gemm_size, sgemm_reps=a.gemm_reps, sgemm_gflops=bench_sgemm(a.gemm_size, a.gemm_reps))
    if "train_gflops" in res and res.get("sgemm_gflops"):
        res["peak_share"] = res["train_gflops"] / res["sgemm_gflops"]
    if S & {"prompt", "gen"}:
        need = a.prompt_tokens + (a.gen_tokens if "gen" in S else 1)
        gctx = max(cfg["context"], need)
        m = make_model(cfg, gctx, a.seed)
        g = torch.Generator().manual_seed(a.seed + 1)
        prompt = random_tokens(a.prompt_tokens, cfg["vocab"], g).view(1, -1)
        with torch.inference_mode():
            if "prompt" in S:
                progress("prompt processing")
                res.update(prompt_tokens=a.prompt_tokens, prompt_tokens_per_s=bench_prompt(m, prompt))
            if "gen" in S:
                res.update(gen_new_tokens=a.gen_tokens, gen_prompt_tokens=a.prompt_tokens, gen_context=gctx, gen=[])
                for s in a.streams:
                    progress(f"generation, {s} stream{'s' if s != 1 else ''}")
                    res["gen"].append(bench_generate(m, prompt, s, a.gen_tokens, a.seed))
    res["cpu"] = cpu_model()
    res["blas"] = blas_in_use()
    res["device"] = f"CPU: {res['cpu']}, {a.threads} thread{'s' if a.threads != 1 else ''}, {res['blas']}"
    if a.json:
        print(json.dumps(res, indent=1))
        return
    print(f"bench_torch: PyTorch {res['version']}, {res['device']}")
    for k, v in res.items():
        if k not in ("config", "gen", "device", "cpu", "blas", "tool", "version"):
            print(f"  {k:24s} {v}")
    for e in res.get("gen", []):
        print(f"  gen {e['streams']:4d} streams      {e['tokens_per_s']:.1f} tokens/s ({e['new_tokens']} tokens)")


if __name__ == "__main__":
    main()
