"""An independent float64 re-statement of Huginn's forward (`raven_modeling_minimal.py`, arXiv 2502.05171) from an
exported huginn_raven state dict: fused Wqkv = [Q; K; V], qk_bias (when present) added to q and k before RoPE,
RoPE on interleaved pairs (complex form), sandwich blocks norm_1..norm_4, GatedMLP fc = [gate; up], adapter
W [state; embeds], ln_f on s_r and after the coda, embeddings scaled by sqrt(n_embd), lm_head tied to wte. Used
to check exports without Huginn's own code."""

from __future__ import annotations

import math

import torch


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_interleaved(x, base):
    """x [b, s, n, d]: pairs (2i, 2i+1) rotated by position * base^(-2i/d)."""
    b, s, n, d = x.shape
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)[None, :, None, :]
    pairs = x.unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack([re * ang.cos() - im * ang.sin(), im * ang.cos() + re * ang.sin()], -1).flatten(3)


def block(x, sd, p, c):
    b, s, h = x.shape
    n = c["n_heads"]
    d = h // n
    eps = c["norm_eps"]
    q, k, v = (rms(x, sd[p + "norm_1.weight"], eps) @ sd[p + "attn.Wqkv.weight"].T).split([h, h, h], -1)
    q, k = q.view(b, s, n, d), k.view(b, s, n, d)
    if p + "attn.qk_bias" in sd:  # Huginn's qk_bias [2, 1, n, d]: added to q and k before RoPE
        q, k = q + sd[p + "attn.qk_bias"][0], k + sd[p + "attn.qk_bias"][1]
    q, k = (rope_interleaved(t, c["rope_base"]).transpose(1, 2) for t in (q, k))
    v = v.view(b, s, n, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h) @ sd[p + "attn.proj.weight"].T
    x = rms(att + x, sd[p + "norm_2.weight"], eps)
    gate, up = (rms(x, sd[p + "norm_3.weight"], eps) @ sd[p + "mlp.fc.weight"].T).chunk(2, -1)
    mlp = (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.proj.weight"].T
    return rms(mlp + x, sd[p + "norm_4.weight"], eps)


def huginn_logits(sd, c, input_ids, r):
    """Logits [b, s, V] with a zero initial state and r iterations."""
    eps = c["norm_eps"]
    e = sd["transformer.wte.weight"][input_ids] * math.sqrt(c["n_embd"])
    for i in range(c["n_layers_in_prelude"]):
        e = block(e, sd, f"transformer.prelude.{i}.", c)
    x = torch.zeros_like(e)
    for _ in range(r):
        x = torch.cat([x, e], -1) @ sd["transformer.adapter.weight"].T
        for i in range(c["n_layers_in_recurrent_block"]):
            x = block(x, sd, f"transformer.core_block.{i}.", c)
    x = rms(x, sd["transformer.ln_f.weight"], eps)
    for i in range(c["n_layers_in_coda"]):
        x = block(x, sd, f"transformer.coda.{i}.", c)
    x = rms(x, sd["transformer.ln_f.weight"], eps)
    return x @ sd.get("lm_head.weight", sd["transformer.wte.weight"]).T
