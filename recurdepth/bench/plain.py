"""A plain-PyTorch implementation of the same looped model and training step, for `recurdepth bench step`.

No megatron, no DDP, no distributed optimizer, no guard, no data pipeline: torch modules in `[b, s, h]` layout,
`F.scaled_dot_product_attention`, `F.rms_norm`, SwiGLU, the concat adapter, truncated backprop (the first r - k
iterations under no_grad), a tied head with the summed cross-entropy, `clip_grad_norm_` and torch AdamW with the
config's hyper-parameters. The same shapes (padded vocabulary, ffn size) and the same micro-batches as the
recurdepth step it is timed against, in the same process, interleaved step by step: the ratio of the two is the
framework's overhead (or gain) on one process, measured, not estimated against a peak.

It is a baseline of the *work*, not a second implementation to keep in sync with every option: it supports the
bench's architecture (sandwich or pre norm, swiglu, concat adapter, RMSNorm, tied embeddings, dense MLP) and says
so otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recurdepth.model.rope import rope_inv_freq


class _Block(nn.Module):
    def __init__(self, h: int, heads: int, ffn: int, sandwich: bool, eps: float):
        super().__init__()
        self.heads, self.sandwich, self.eps = heads, sandwich, eps
        self.qkv = nn.Linear(h, 3 * h, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.fc1 = nn.Linear(h, 2 * ffn, bias=False)
        self.fc2 = nn.Linear(ffn, h, bias=False)
        self.norms = nn.Parameter(torch.ones(4 if sandwich else 2, h))

    def _norm(self, x, i):
        return F.rms_norm(x, (x.shape[-1],), self.norms[i], self.eps)

    def forward(self, x, cos, sin):
        b, s, h = x.shape
        q, k, v = self.qkv(self._norm(x, 0)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h)
        x = x + self.proj(attn)
        if self.sandwich:
            x = self._norm(x, 1)
        gate, up = self.fc1(self._norm(x, 2 if self.sandwich else 1)).chunk(2, dim=-1)
        x = x + self.fc2(F.silu(gate) * up)
        return self._norm(x, 3) if self.sandwich else x


def _rope(t, cos, sin):
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)


class PlainLoopedModel(nn.Module):
    """embed -> prelude -> (concat adapter -> core) x r (truncated backprop) -> coda -> norm -> tied head."""

    def __init__(self, cfg, vocab: int):
        super().__init__()
        from recurdepth.model.layers import default_ffn_hidden_size

        m = cfg.model
        unsupported = [f"model.{k}={getattr(m, k)}" for k, ok in (
            ("activation", m.activation == "swiglu"), ("adapter", m.adapter == "concat"),
            ("normalization", m.normalization == "RMSNorm"), ("num_experts", not m.num_experts),
            ("num_query_groups", m.num_query_groups in (None, m.num_heads)), ("qkv_bias", m.qkv_bias == "none"),
            ("qk_norm", not m.qk_norm), ("head_dim", m.head_width * m.num_heads == m.hidden_size)) if not ok]
        if unsupported:
            raise ValueError(f"the plain-PyTorch baseline does not implement {', '.join(unsupported)}")
        h, ffn = m.hidden_size, m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation)
        block = lambda: _Block(h, m.num_heads, ffn, m.block_norm == "sandwich", m.norm_eps)  # noqa: E731
        self.embedding = nn.Embedding(vocab, h)
        self.prelude = nn.ModuleList(block() for _ in range(m.prelude_layers))
        self.adapter = nn.Linear(2 * h, h, bias=False)
        self.core = nn.ModuleList(block() for _ in range(m.core_layers))
        self.coda = nn.ModuleList(block() for _ in range(m.coda_layers))
        self.final_norm = nn.Parameter(torch.ones(h))
        self.scale, self.eps, self.norm_before_coda = m.embedding_scale, m.norm_eps, m.norm_before_coda
        self.zero_state = m.initial_state == "zeros"
        self.state_std = m.initial_state_std or m.init_std or (2.0 / (5.0 * h)) ** 0.5
        d = h // m.num_heads
        inv_freq = rope_inv_freq(m, d)
        angles = torch.outer(torch.arange(m.seq_length, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)  # [s, d/2] float64: half-split RoPE; .to(dtype)
        self.register_buffer("sin", angles.sin(), persistent=False)
        std = m.init_std or (2.0 / (5.0 * h)) ** 0.5
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, 0.0, std, -3 * std, 3 * std)

    def _norm(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.final_norm, self.eps)

    def forward(self, tokens, labels, r: int, k: int):
        """Per-token cross-entropy `[b, s]` (float32 or wider, as megatron's loss)."""
        logits = self.logits(tokens, r, k)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)

    def logits(self, tokens, r: int, k: int):
        """`[b, s, V]` logits after r iterations, gradients through the last k."""
        s = tokens.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        e = self.embedding(tokens) * self.scale
        for layer in self.prelude:
            e = layer(e, cos, sin)
        std = self.state_std
        if self.zero_state:
            x = torch.zeros_like(e)
        else:
            x = torch.nn.init.trunc_normal_(torch.empty_like(e), 0.0, std, -3 * std, 3 * std) * self.scale
        with torch.no_grad():
            for _ in range(max(r - k, 0)):
                x = self._core(x, e, cos, sin)
        for _ in range(min(r, k)):
            x = self._core(x, e, cos, sin)
        if self.norm_before_coda:
            x = self._norm(x)
        for layer in self.coda:
            x = layer(x, cos, sin)
        return F.linear(self._norm(x), self.embedding.weight)

    def _core(self, x, e, cos, sin):
        x = self.adapter(torch.cat([x, e], dim=-1))
        for layer in self.core:
            x = layer(x, cos, sin)
        return x


class PlainStep:
    """One optimizer step of the plain model over the given micro-batches (summed masked loss / token count)."""

    def __init__(self, cfg, vocab: int, dtype: torch.dtype = torch.float32):
        o = cfg.optimizer
        self.model = PlainLoopedModel(cfg, vocab).to(dtype)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.clip = o.clip_grad

    def __call__(self, batches: list, r: int, k: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        tokens = sum(mb.loss_mask.sum() for mb in batches)
        total = 0.0
        for mb in batches:
            loss = (self.model(mb.tokens, mb.labels, r, k) * mb.loss_mask).sum() / tokens
            loss.backward()
            total += loss.detach()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        return float(total)


__all__ = ["PlainLoopedModel", "PlainStep"]


def copy_weights(model, plain: "PlainLoopedModel") -> None:
    """A `LoopedGPTModel`'s weights (TP = 1, either spec) into `plain`: megatron's fused qkv rows are [q, k, v] per
    head, the plain one's [all q, all k, all v]; sandwich blocks have four norms, pre-norm blocks two (read under
    their local-spec names: TE fuses n1 and n3 into the following linear)."""
    from recurdepth.model.names import to_local

    heads = model.config.num_attention_heads
    state = to_local(model.state_dict())
    with torch.no_grad():
        plain.embedding.weight.copy_(model.embedding.word_embeddings.weight)
        plain.adapter.weight.copy_(model.adapter.proj.weight)
        plain.final_norm.copy_(model.final_layernorm.weight)
        for stack in ("prelude", "core", "coda"):
            for i, layer in getattr(model, stack).items():
                target = getattr(plain, stack)[int(i) - (model.core_range[0] if stack == "core" else 0)]
                qkv = layer.self_attention.linear_qkv.weight
                h = qkv.shape[1]
                target.qkv.weight.copy_(qkv.view(heads, 3, h // heads, h).transpose(0, 1).reshape(3 * h, h))
                target.proj.weight.copy_(layer.self_attention.linear_proj.weight)
                target.fc1.weight.copy_(layer.mlp.linear_fc1.weight)
                target.fc2.weight.copy_(layer.mlp.linear_fc2.weight)
                names = (("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm")
                         if target.sandwich else ("input_layernorm", "pre_mlp_layernorm"))
                target.norms.copy_(torch.stack([state[f"{stack}.{i}.{n}.weight"] for n in names]))
