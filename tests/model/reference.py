"""An independent float64 re-statement of the looped model, from its state dict alone (no megatron code):
RMSNorm, RoPE (rotate-half), causal attention with megatron's grouped QKV layout, SwiGLU, sandwich
blocks, the concat adapter and an explicitly unrolled loop. Used to check the model's forward exactly."""

from __future__ import annotations

import math

import torch


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, base):
    """x [b, n, s, d]; megatron's non-interleaved RoPE: rotate halves."""
    d, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], -1)
    x1, x2 = x.chunk(2, -1)
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def attention(x, sd, p, heads, groups, base):
    """x [b, s, h] -> [b, s, h]."""
    b, s, h = x.shape
    hn = h // heads
    qkv = x @ sd[p + "linear_qkv.weight"].T  # [b, s, groups * (heads/groups + 2) * hn]
    qkv = qkv.view(b, s, groups, (heads // groups + 2) * hn)
    q, k, v = qkv.split([heads // groups * hn, hn, hn], dim=-1)
    q = q.reshape(b, s, heads, hn).transpose(1, 2)
    k = k.reshape(b, s, groups, hn).transpose(1, 2).repeat_interleave(heads // groups, 1)
    v = v.reshape(b, s, groups, hn).transpose(1, 2).repeat_interleave(heads // groups, 1)
    q, k = rope(q, base), rope(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hn)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v  # [b, n, s, hn]
    return out.transpose(1, 2).reshape(b, s, h) @ sd[p + "linear_proj.weight"].T


def swiglu(x, sd, p):
    a, g = (x @ sd[p + "linear_fc1.weight"].T).chunk(2, -1)
    return (torch.nn.functional.silu(a) * g) @ sd[p + "linear_fc2.weight"].T


def block(x, sd, p, cfg):
    m = cfg.model
    n = lambda name, t: rms_norm(t, sd[p + name + ".weight"], m.norm_eps)  # noqa: E731
    x = n("post_attention_layernorm", x + attention(n("input_layernorm", x), sd, p + "self_attention.",
                                                     m.num_heads, m.num_query_groups or m.num_heads, m.rotary_base))
    return n("post_mlp_layernorm", x + swiglu(n("pre_mlp_layernorm", x), sd, p + "mlp."))


def reference_logits(sd, cfg, input_ids, s0, r):
    """input_ids [b, s], s0 [b, s, h] -> logits [b, s, V]: the explicitly unrolled looped model."""
    m = cfg.model
    e = sd["embedding.word_embeddings.weight"][input_ids] * m.embedding_scale
    for i in range(m.prelude_layers):
        e = block(e, sd, f"prelude.{i}.", cfg)
    state = s0
    for _ in range(r):
        state = torch.cat([state, e], -1) @ sd["adapter.proj.weight"].T
        for i in range(m.core_layers):
            state = block(state, sd, f"core.{i}.", cfg)
    x = state
    for i in range(m.coda_layers):
        x = block(x, sd, f"coda.{i}.", cfg)
    x = rms_norm(x, sd["final_layernorm.weight"], m.norm_eps)
    return x @ sd["embedding.word_embeddings.weight"].T
