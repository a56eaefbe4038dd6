"""Keys and values of the positions an earlier pass over the same sequence computed, kept WITH their autograd
graph, so that a multi-pass objective (Coconut's latent passes) computes in each pass only the positions whose
input changed since the previous pass and those after them.

A pass over positions [start, end) replaces every layer's self-attention (through `pipelined_forward(...,
attend_at=cache.attend_at)`; each pipeline stage keeps the keys and values of its own layers) by

    q, k, v = the layer's own projections of x[start:end]   (q/k-norm included; TP: this rank's heads and query
                                                              groups; GQA: g <= n key/value heads)
    q, k    = RoPE at the absolute positions start..end-1
    K, V    = [K'[:start]; k], [V'[:start]; v]              K', V': this layer's (and this core iteration's) keys
                                                              and values of the previous pass, kept for the next
    out     = linear_proj(softmax(q K^T * scale + causal) V)  row t of q sees the keys of positions 0..start+t

Causal attention makes the keys and values at a position functions of the inputs at and before it only, so if
the inputs of positions [0, start) are those of the pass that computed K', V' (the caller's contract), the pass
computes the same function of the parameters and of its inputs as a recomputation of all of [0, end): K', V'
keep their graph, so gradients reach the parameters and the earlier inputs through the pass that computed them,
exactly as through the recomputed prefix. Under truncated backprop the no-grad iterations' keys and values
carry no gradient, the grad iterations' do: as recomputed ones. The cache is keyed by (layer name, iteration):
a core layer's keys at iteration i are those of the state after i iterations; the prelude and coda (iteration
None) run once per pass.

Not with sequence parallelism (a pass's positions are split over the TP ranks; the caller keeps recomputing),
and refused for attention options the hook would not reproduce (`model.layers.hook_unsupported`). With the
hook the model skips its own RoPE and `recurrence.checkpoint_iterations` (a checkpointed iteration would write
the cache twice).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from recurdepth.model.layers import hook_output, hook_qkv, hook_unsupported


class PrefixKVCache:
    """The keys and values `[b, g, L, hn]` of positions [0, L) per (layer name, iteration) of one sequence batch
    of length `s`, for passes over growing or shifting spans (`advance(start, end)` before each pass)."""

    def __init__(self, model, s: int):
        why = hook_unsupported(model.config)
        if why is not None:
            raise ValueError(f"the KV-cached passes do not reproduce the model's attention with {why}; "
                             f"recompute the prefix instead (e.g. objective.coconut_kv_cache=false)")
        self.table = model.rope(s)  # [s, 1, 1, d] float64 angles of positions 0..s-1
        self.scale, self.dropout = model.config.softmax_scale, model.config.attention_dropout
        self.kv: dict[tuple[str, Optional[int]], tuple[torch.Tensor, torch.Tensor]] = {}
        self.length = 0  # positions [0, length) are cached (by the last pass)
        self.start = self.end = 0
        self.freqs = self.mask = None

    def advance(self, start: int, end: int) -> None:
        """The next pass computes positions [start, end), reusing the cached keys and values of [0, start)."""
        if not 0 <= start <= self.length or not start < end <= self.table.shape[0]:
            raise ValueError(f"a pass over positions [{start}, {end}) needs [0, {start}) cached, and "
                             f"[0, {self.length}) is; the sequence has {self.table.shape[0]}")
        self.start, self.end, self.length = start, end, end
        self.freqs = self.table[start:end]
        self.mask = None  # start = 0: plain causal attention
        if start:
            pos = torch.arange(end, device=self.table.device)
            self.mask = pos.view(1, -1) <= pos[start:].view(-1, 1)  # [end - start, end], True = attends

    def attend_at(self, iteration: Optional[int]):
        """`pipelined_forward`'s `attend_at`: the model's `attend_for(name, layer)` hook of `iteration`."""
        def attend_for(name: str, layer):
            return lambda x: self.attend(layer.self_attention, x, (name, iteration))
        return attend_for

    def attend(self, attn, x: torch.Tensor, key: tuple) -> torch.Tensor:
        """The self-attention output `[n, b, h]` of `x [n, b, h]` (the normed input of positions [start, end))
        through `attn`'s projections, over the cached keys and values of [0, start) (module docstring)."""
        n, b = x.shape[:2]
        q, k, v = hook_qkv(attn, x, self.freqs)  # [n, b, heads, hn]; k, v: the query groups' heads
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, n, hn]
        if self.start:
            past_k, past_v = self.kv[key]
            k = torch.cat([past_k[:, :, :self.start], k], dim=2)
            v = torch.cat([past_v[:, :, :self.start], v], dim=2)
        self.kv[key] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None and n > 1,
                                             dropout_p=self.dropout if attn.training else 0.0, scale=self.scale,
                                             enable_gqa=k.shape[1] != q.shape[1])
        return hook_output(attn, out.permute(2, 0, 1, 3).reshape(n, b, -1))
