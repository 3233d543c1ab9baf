"""
The PyTorch peer of `tinylm bench --device cuda`, for bench/gpu_check.sh: the
same model (dev/reference.py's Llama-style decoder, tied embedding), random
weights and random tokens, measured the way a typical PyTorch user would run
it on a GPU.

    python3 dev/bench_torch_gpu.py [--preset seed] [--batches 64,256]
        [--steps 10] [--warmup-steps 3] [--streams 1,1024] [--gen-tokens 64]
        [--prompt-tokens 128] [--compile] [--json]

What is measured (each printed as one JSON object with --json):
  - train: tokens/s of zero_grad, forward, loss, backward,
    clip_grad_norm_(1.0), fused AdamW, for each --batches entry, in fp32
    (TF32 off: the same arithmetic as tinylm --dtype fp32) and in bf16 autocast
    (fp32 master weights, as tinylm's bf16 mode); with --compile also
    torch.compile'd bf16 (slow to build: off by default).
  - gen: KV-cached sampling (temperature 0.8, top-p 0.95, on the GPU), eager
    bf16 weights, for each --streams entry: new tokens / time after the prompt.
  - peak: the best bf16 and fp32 matrix products (8192^3), the yardstick for
    model FLOPs utilisation.
FLOPs per training token as tinylm bench counts them:
6 P_matmul + 6 L D (T + 1), P_matmul = L (4 D^2 + 3 D F) + V D.
"""
import argparse
import json
import math
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # the caller prints the reason in its table
    print(json.dumps({"error": f"cannot import torch: {e}"}))
    sys.exit(0)

PRESETS = {
    "seed": dict(vocab=2560, dim=256, layers=10, heads=8, hidden=704, context=256),
    "tiny": dict(vocab=512, dim=64, layers=2, heads=4, hidden=176, context=64),
}


class Model(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        D, Fh, V, L = c["dim"], c["hidden"], c["vocab"], c["layers"]
        self.wte = torch.nn.Parameter(torch.randn(V, D) * 0.02)
        self.layers = torch.nn.ModuleList()
        for _ in range(L):
            m = torch.nn.Module()
            m.n1 = torch.nn.Parameter(torch.ones(D))
            m.wqkv = torch.nn.Parameter(torch.randn(3 * D, D) * 0.02)
            m.wo = torch.nn.Parameter(torch.randn(D, D) * 0.02 / math.sqrt(2 * L))
            m.n2 = torch.nn.Parameter(torch.ones(D))
            m.wgu = torch.nn.Parameter(torch.randn(2 * Fh, D) * 0.02)
            m.wdown = torch.nn.Parameter(torch.randn(D, Fh) * 0.02 / math.sqrt(2 * L))
            self.layers.append(m)
        self.nf = torch.nn.Parameter(torch.ones(D))
        self.rope_cache = {}

    def rope(self, T, pos0, device, dtype):
        key = (T, pos0, device, dtype)
        if key not in self.rope_cache:
            hd = self.c["dim"] // self.c["heads"]
            inv = 10000.0 ** (-torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd)
            ang = torch.arange(pos0, pos0 + T, device=device, dtype=torch.float64)[:, None] * inv[None]
            self.rope_cache[key] = (ang.cos().to(dtype), ang.sin().to(dtype))
        return self.rope_cache[key]

    @staticmethod
    def rot(x, cos, sin):  # rotate-half, x [B,H,T,hd]
        h = x.shape[-1] // 2
        x0, x1 = x[..., :h], x[..., h:]
        return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)

    def forward(self, tok, caches=None, pos0=0):
        c = self.c
        B, T = tok.shape
        H, D = c["heads"], c["dim"]
        hd = D // H
        x = F.embedding(tok, self.wte)
        cos, sin = self.rope(T, pos0, x.device, x.dtype if not torch.is_autocast_enabled() else torch.float32)
        for li, m in enumerate(self.layers):
            h = F.rms_norm(x, (D,), m.n1, 1e-5)
            q, k, v = (h @ m.wqkv.t()).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
            q, k = self.rot(q, cos, sin).to(v.dtype), self.rot(k, cos, sin).to(v.dtype)
            if caches is not None:
                kc, vc = caches[li]
                kc[:, :, pos0:pos0 + T] = k
                vc[:, :, pos0:pos0 + T] = v
                k, v = kc[:, :, :pos0 + T], vc[:, :, :pos0 + T]
                causal = T > 1
            else:
                causal = True
            if caches is not None and T > 1 and pos0 > 0:
                raise ValueError("chunked prompts are not benchmarked")
            a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            x = x + a.transpose(1, 2).reshape(B, T, D) @ m.wo.t()
            h = F.rms_norm(x, (D,), m.n2, 1e-5)
            g, u = (h @ m.wgu.t()).chunk(2, -1)
            x = x + (F.silu(g) * u) @ m.wdown.t()
        return F.rms_norm(x, (D,), self.nf, 1e-5) @ self.wte.t()


def flops_per_token(c):
    D, Fh, V, L, T = c["dim"], c["hidden"], c["vocab"], c["layers"], c["context"]
    pm = L * (4 * D * D + 3 * D * Fh) + V * D
    return 6 * pm + 6 * L * D * (T + 1)


def bench_train(c, batch, steps, warmup, mode, dev):
    torch.manual_seed(0)
    model = Model(c).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    T, V = c["context"], c["vocab"]
    x = torch.randint(0, V - 1, (batch, T), device=dev)
    y = torch.randint(0, V - 1, (batch, T), device=dev)
    fwd = model
    if mode == "bf16-compile":
        fwd = torch.compile(model)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32"):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = batch * T * steps / dt
    # the allocator's peak (tensors, optimizer state, autograd buffers), as
    # tinylm's device_peak_bytes counts the buffers its backend holds
    return {"mode": mode, "batch": batch, "tokens_per_s": tps, "step_ms": 1e3 * dt / steps,
            "loss_last": float(loss), "tflops": tps * flops_per_token(c) / 1e12,
            "peak_mem_bytes": torch.cuda.max_memory_allocated(dev)}


@torch.no_grad()
def sample(logits, gen):
    probs = torch.softmax(logits.float() / 0.8, -1)
    sp, si = probs.sort(-1, descending=True)
    cum = sp.cumsum(-1)
    sp[(cum - sp) > 0.95] = 0
    pick = torch.multinomial(sp, 1, generator=gen)
    return si.gather(-1, pick)


@torch.no_grad()
def bench_gen(c, streams, prompt_tokens, gen_tokens, dev):
    torch.manual_seed(0)
    c = dict(c)
    c["context"] = max(c["context"], prompt_tokens + gen_tokens)
    model = Model(c).to(dev).to(torch.bfloat16)
    H, D = c["heads"], c["dim"]
    hd = D // H
    Tm = prompt_tokens + gen_tokens
    gen = torch.Generator(device=dev).manual_seed(1)
    prompt = torch.randint(0, c["vocab"] - 1, (1, prompt_tokens), device=dev)

    def run():
        caches = [(torch.zeros(streams, H, Tm, hd, device=dev, dtype=torch.bfloat16),
                   torch.zeros(streams, H, Tm, hd, device=dev, dtype=torch.bfloat16)) for _ in range(c["layers"])]
        one = [(torch.zeros(1, H, Tm, hd, device=dev, dtype=torch.bfloat16),
                torch.zeros(1, H, Tm, hd, device=dev, dtype=torch.bfloat16)) for _ in range(c["layers"])]
        logits = model(prompt, one, 0)[:, -1]
        for (kc, vc), (k1, v1) in zip(caches, one):  # the prompt is shared
            kc[:, :, :prompt_tokens] = k1[:, :, :prompt_tokens]
            vc[:, :, :prompt_tokens] = v1[:, :, :prompt_tokens]
        tok = sample(logits.expand(streams, -1), gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(gen_tokens - 1):
            logits = model(tok, caches, prompt_tokens + k)[:, -1]
            tok = sample(logits, gen)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    run()  # warm-up
    dt = run()
    return {"streams": streams, "tokens_per_s": streams * (gen_tokens - 1) / dt, "seconds": dt}


def bench_peak(dev):
    out = {}
    n = 8192
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        best = 0
        for k in range(4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            torch.cuda.synchronize()
            d = time.perf_counter() - t0
            if k:
                best = max(best, 2 * n ** 3 / d / 1e12)
        out[name + "_tflops"] = best
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="seed", choices=sorted(PRESETS))
    p.add_argument("--batches", default="64,256")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--streams", default="1,1024")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--compile", action="store_true", help="also torch.compile'd bf16 training (slow to build)")
    p.add_argument("--only", default="train,gen,peak")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch.cuda.is_available() is False"}))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    c = PRESETS[a.preset]
    only = set(a.only.split(","))
    res = {"tool": "pytorch", "version": torch.__version__, "device": torch.cuda.get_device_name(0),
           "config": c, "flops_per_token": flops_per_token(c), "train": [], "gen": []}
    if "peak" in only:
        res["peak"] = bench_peak(dev)
    if "train" in only:
        modes = ["fp32", "bf16"] + (["bf16-compile"] if a.compile else [])
        for b in [int(s) for s in a.batches.split(",")]:
            for m in modes:
                try:
                    res["train"].append(bench_train(c, b, a.steps, a.warmup_steps, m, dev))
                except Exception as e:  # e.g. out of memory: report, go on
                    res["train"].append({"mode": m, "batch": b, "error": str(e)[:200]})
                torch.cuda.empty_cache()
    if "gen" in only:
        for s in [int(x) for x in a.streams.split(",")]:
            try:
                res["gen"].append(bench_gen(c, s, a.prompt_tokens, a.gen_tokens, dev))
            except Exception as e:
                res["gen"].append({"streams": s, "error": str(e)[:200]})
    if a.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
