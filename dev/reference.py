"""
An independent PyTorch implementation of the tinylm model, for fixtures.

Run with the system Python that has PyTorch 1.13 (the `python3` on PATH may
be a pyenv without torch):

    /usr/bin/python3 dev/reference.py        # self-check: prints a loss

It is imported by dev/make_fixtures.py. It is written plainly, the way the
Hugging Face LlamaForCausalLM computes, and shares no code with the C model:
separate q/k/v/o projections (nn.Linear, no bias), rotate-half RoPE, RMSNorm
computed in (at least) fp32, SwiGLU, explicit causal softmax attention, and
an output head tied to the embedding. Parameter names are the HF names.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab: int = 300
    dim: int = 64
    layers: int = 2
    heads: int = 4
    hidden: int = 176
    context: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 at least (fp64 stays fp64), as HF Llama does.
        work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        var = work.pow(2).mean(-1, keepdim=True)
        y = work * torch.rsqrt(var + self.eps)
        return self.weight * y.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(T, hd, theta, dtype, pos0=0):
    # Angles in float64, then cast: positions are small, so this is the
    # exact rotation up to the final rounding.
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    t = torch.arange(pos0, pos0 + T, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)             # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)      # [T, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.heads = cfg.heads
        self.hd = D // cfg.heads
        self.theta = cfg.rope_theta
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        H, hd = self.heads, self.hd
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # [B,H,T,hd]
        k = self.k_proj(x).view(B, T, H, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, H, hd).transpose(1, 2)
        cos, sin = rope_cos_sin(T, hd, self.theta, x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)    # [B,H,T,T]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(B, T, D)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down_proj = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Body(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class LlamaRef(nn.Module):
    """Parameter names match HF: model.embed_tokens.weight, model.layers.0...."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.model = Body(cfg)

    def forward(self, tokens):
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x)
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight)  # tied head

    def loss(self, tokens, targets):
        """Mean cross-entropy over targets >= 0 (negative targets are ignored)."""
        logits = self.forward(tokens)
        V = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1), logits


def param_groups(model, weight_decay):
    """AdamW groups: decay on 2-D weights, none on norm vectors."""
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr=1e-3, weight_decay=0.1):
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train_steps(model, tokens, targets, steps, lr=1e-3, weight_decay=0.1, clip=1.0):
    """Run `steps` AdamW steps on one batch; returns the loss before each step
    and the gradient norm (before clipping) of each step."""
    opt = make_optimizer(model, lr, weight_decay)
    losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, _ = model.loss(tokens, targets)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        opt.step()
        losses.append(float(loss))
    return losses, norms


if __name__ == "__main__":
    torch.manual_seed(0)
    cfg = Config()
    m = LlamaRef(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    tok = torch.randint(0, cfg.vocab, (2, cfg.context))
    loss, _ = m.loss(tok[:, :-1], tok[:, 1:])
    print(f"reference self-check: loss {float(loss):.4f} (expect about ln {cfg.vocab} = "
          f"{math.log(cfg.vocab):.4f} for a random model)")
