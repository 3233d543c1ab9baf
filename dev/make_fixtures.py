"""
Make tests/fixtures/tiny_ref.safetensors, the reference values that
tests/test_model.c checks the C model against.

Run from the repository root with the system Python that has PyTorch 1.13:

    /usr/bin/python3 dev/make_fixtures.py

The output is deterministic (fixed seed); commit the regenerated file
together with any change to this script or dev/reference.py.

Contents (all F32; token ids are stored as F32, exact below 2^24):
  <HF name>              initial weights (N(0, 0.02); norms 1 + 0.2 N(0,1)
                         so that a wrong norm shows in the results)
  inputs, targets        [2, 32]; two targets are -1 (ignored by the loss)
  logits                 [2, 32, 300] of the initial model
  loss                   [1] mean cross-entropy over the non-ignored targets
  grad.<HF name>         gradient of that mean loss
  adamw.losses           [5] loss before each of 5 AdamW steps on the batch
                         (lr 1e-3, betas 0.9/0.95, eps 1e-8, wd 0.1 on 2-D
                         weights only, global-norm clip 1.0)
  adamw.gnorms           [5] gradient norm before clipping, each step
  adamw.<HF name>        parameters after the 5 steps
Everything runs in float64, the truth up to the final rounding to float32,
so a test measures the C code's own float32 error only. (The AdamW steps
were first run in float32, like the C code; but torch's own float32 noise
then doubles the error budget: Adam divides by sqrt(v), so on elements whose
gradient is near zero, float32 torch differs from float64 torch by up to
0.008 lr after 5 steps.)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import Config, LlamaRef, train_steps  # noqa: E402
from safetensors_io import save_f32  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tiny_ref.safetensors")


def main():
    cfg = Config(vocab=300, dim=64, layers=2, heads=4, hidden=176, context=32)
    B, T = 2, 32
    g = torch.Generator().manual_seed(1234)

    # Weights drawn in float32 so that what we store is exactly what ran.
    model = LlamaRef(cfg)
    init = {}
    for name, p in model.named_parameters():
        if p.dim() == 2:
            w = torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.02
        else:
            w = 1.0 + 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32)
        init[name] = w
    names = [n for n, _ in model.named_parameters()]

    inputs = torch.randint(0, cfg.vocab, (B, T), generator=g)
    targets = torch.randint(0, cfg.vocab, (B, T), generator=g)
    targets[0, 5] = -1
    targets[1, 17] = -1

    # ---- float64 forward / backward ----
    m64 = LlamaRef(cfg).double()
    with torch.no_grad():
        for name, p in m64.named_parameters():
            p.copy_(init[name].double())
    loss, logits = m64.loss(inputs, targets)
    loss.backward()
    grads = {n: p.grad for n, p in m64.named_parameters()}

    # ---- AdamW steps (float64 too) ----
    mopt = LlamaRef(cfg).double()
    with torch.no_grad():
        for name, p in mopt.named_parameters():
            p.copy_(init[name].double())
    losses, gnorms = train_steps(mopt, inputs, targets, steps=5, lr=1e-3, weight_decay=0.1, clip=1.0)
    after = {n: p.detach().clone() for n, p in mopt.named_parameters()}

    tensors = [(n, init[n]) for n in names]
    tensors += [("inputs", inputs.float()), ("targets", targets.float()), ("logits", logits),
                ("loss", loss.reshape(1))]
    tensors += [("grad." + n, grads[n]) for n in names]
    tensors += [("adamw.losses", torch.tensor(losses)), ("adamw.gnorms", torch.tensor(gnorms))]
    tensors += [("adamw." + n, after[n]) for n in names]
    meta = {"vocab": str(cfg.vocab), "dim": str(cfg.dim), "layers": str(cfg.layers), "heads": str(cfg.heads),
            "hidden": str(cfg.hidden), "context": str(cfg.context), "norm_eps": str(cfg.norm_eps),
            "rope_theta": str(cfg.rope_theta), "lr": "1e-3", "weight_decay": "0.1", "clip": "1.0",
            "beta1": "0.9", "beta2": "0.95", "adam_eps": "1e-8", "made_by": "dev/make_fixtures.py"}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_f32(OUT, dict(tensors), meta)
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes): loss {float(loss):.6f}, "
          f"adamw losses {', '.join(f'{x:.5f}' for x in losses)}, grad norms {', '.join(f'{x:.4f}' for x in gnorms)}")


if __name__ == "__main__":
    main()
