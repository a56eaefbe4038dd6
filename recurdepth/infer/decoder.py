"""Incremental (KV-cached) forward of a `LoopedGPTModel`, with adaptive depth per token.

The model's own forward (`embed`, `iteration`, `head`), a few positions at a time, with every layer's
self-attention replaced through the model's `attend_for` hook by one over a KV cache:

    e_t  = prelude(embed(x_t) * scale)                       # keys/values cached per prelude layer
    s_0  = 0 | TruncNormal * scale | s_r of token t-1 (warm start)
    s_i  = core(adapter(s_{i-1}, e_t))   i = 1..r             # keys/values cached per core layer and iteration slot
    p_t  = head(norm(coda(s_r)))                              # keys/values cached per coda layer

Adaptive depth (one position at a time): after every iteration i >= 2 the head is applied to s_i, and a row
stops when KL(p_{i-1} || p_i) < eps (Huginn's KL exit, arXiv 2502.05171 sec. 6); rows that stopped keep their
state while the others go on. eps = 0 never stops (KL is clamped at 0), so it is full-depth decoding.
With the learned gate (`exit_gate` q, a model trained with objective.kind=exit_gate or ponder): after every
iteration i the gate reads the head's final-norm hidden state, lambda_i = sigmoid(w . h_i + b), and a row stops
at the first i whose exit CDF sum_{j<=i} lambda_j prod_{l<j} (1 - lambda_l) reaches q (Ouro's deterministic
exit, arXiv 2510.25741). The keys and values of the iterations a row skipped are its last computed ones
(`LoopedKVCache.fill`; Huginn and Ouro decode so): later tokens attend to them.
With the router (`exit_router`, a model trained with objective.kind=recursion_router), each position routes as
the model was trained: token-choice runs the depth its router picks; expert-choice continues past iteration i
while sigmoid(z_i) >= 1/2 (MoR's auxiliary-loss inference: top-k over a sequence is not causal); the update is
s + g (f - s). Its keys and values are recursion-wise, as in training: at iteration i a token attends only to the
earlier positions that ran iteration i (a mask over the cache from the iterations each position ran), not to a
fill. Prompts are routed position by position too (the prelude and coda still run the chunk at once).

One process only (TP = PP = 1): the caller builds the model that way (`recurdepth.infer.loading`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from recurdepth.infer.kv_cache import LoopedKVCache
from recurdepth.infer.options import INITS, DecodeOptions
from recurdepth.model.depth import BackpropWindow
from recurdepth.model.layers import hook_output, hook_qkv
from recurdepth.seeding import device_generator

class LoopedDecoder:
    """Runs a looped model over a growing batch of sequences `[b, t]` with a `LoopedKVCache`.

    `step(tokens [b, s])` appends s positions and returns their logits `[b, s, V]` (all padded-vocabulary
    columns); `depths` holds the iterations each position used, `[b]` per call.
    """

    def __init__(self, model, batch: int, max_len: int, options: DecodeOptions):
        if options.depth < 1:
            raise ValueError(f"depth={options.depth}: use at least 1 iteration")
        if options.exit_kl is not None and options.exit_gate is not None:
            raise ValueError("choose one exit rule: exit_kl or exit_gate")
        if options.exit_gate is not None and not hasattr(model, "exit_gate"):
            raise ValueError("the gate exit needs a model trained with objective.kind=exit_gate or ponder "
                             "(this one has no model.exit_gate)")
        router = getattr(model, "recursion_router", None)
        if options.exit_router:
            if router is None:
                raise ValueError("the router exit needs a model trained with objective.kind=recursion_router "
                                 "(this one has no model.recursion_router)")
            if options.exit_kl is not None or options.exit_gate is not None:
                raise ValueError("choose one exit rule: exit_router, exit_kl or exit_gate")
            if options.kv_share is not None:
                raise ValueError("exit_router keeps keys and values per iteration (recursion-wise): kv_share "
                                 "(Huginn's compressed cache) does not apply")
            outputs = router.weight.shape[0]
            if router.mode == "token" and options.depth != outputs or options.depth > outputs:
                raise ValueError(f"depth={options.depth}: this router was trained for "
                                 f"{'exactly' if router.mode == 'token' else 'at most'} {outputs} iterations")
        if options.init not in INITS:
            raise ValueError(f"init={options.init!r}: use one of {', '.join(INITS)}")
        self.model, self.options = model, options
        cfg = model.config
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.heads = cfg.num_attention_heads
        self.groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.kv_channels
        self.cache = LoopedKVCache(batch, max_len, self.groups, self.head_dim, options.depth, options.kv_share,
                                   self.dtype, self.device)
        self.rope_table = model.rotary_pos_emb(max_len)  # [L, 1, 1, d], float64 angles
        self.prev_state: Optional[torch.Tensor] = None  # [1, b, h]: s_r of the newest position (warm start)
        self.generator = device_generator(self.device, options.seed)  # s_0 drawn where the model is
        self.depths: list[torch.Tensor] = []
        # exit_router: iterations each position ran [b, L] (its core keys at iteration i exist where this >= i)
        self.reached = torch.zeros(batch, max_len, dtype=torch.long, device=self.device) if options.exit_router \
            else None

    # ------------------------------------------------------------------ the model's blocks, with a cache

    def _attention(self, layer, x: torch.Tensor, name: str, start: int, iteration: Optional[int],
                   rows: Optional[torch.Tensor]) -> torch.Tensor:
        """Self-attention of positions [start, start + s) over the cache; x `[s, b, h]` (already normed): the
        layer's own q/k/v projection and RoPE, keys/values kept in the cache, the layer's output projection."""
        attn = layer.self_attention
        s, b = x.shape[:2]
        q, k, v = hook_qkv(attn, x, self.rope_table[start:start + s])  # [s, b, n, hn], k/v: the query groups' heads
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, n, s, hn]
        keys, values = self.cache.update(name, k, v, start, iteration, rows)
        mask = None
        if self.reached is not None and iteration is not None:  # recursion-wise: earlier positions that ran it
            seen = self.reached[rows if rows is not None else slice(None), :start] > iteration
            mask = torch.cat([seen, seen.new_ones(seen.shape[0], s)], 1).view(-1, 1, 1, start + s)
        elif s > 1:  # causal within the new positions; every cached position is visible
            total = start + s
            mask = torch.arange(total, device=x.device).view(1, -1) <= (start + torch.arange(s, device=x.device)).view(-1, 1)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.groups != self.heads)
        return hook_output(attn, out.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim))

    def _cached(self, start: int, iteration: Optional[int] = None, rows: Optional[torch.Tensor] = None):
        """The model's `attend_for` hook: each layer attends through the cache (slot `iteration` for core layers)."""
        def attend_for(name: str, layer):
            slot = iteration if name.startswith("core.") else None
            return lambda normed: self._attention(layer, normed, name, start, slot, rows)
        return attend_for

    def _initial_state(self, e: torch.Tensor) -> torch.Tensor:
        if self.options.warm_start and self.prev_state is not None and e.shape[0] == 1:
            return self.prev_state
        if self.options.init == "zeros":
            return torch.zeros_like(e)
        return self.model.draw_state(e.shape, e.dtype, e.device, self.generator)

    def _head(self, state: torch.Tensor, start: int) -> torch.Tensor:
        return self.model.head(state, attend_for=self._cached(start)).transpose(0, 1)  # logits [s, b, V]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, s0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Append `tokens [b, s]` at the next positions; their logits `[b, s, V]`. `s0 [s, b, h]` overrides the
        initial state. Adaptive exit applies to single positions (s = 1); longer chunks run the full depth."""
        start, s = self.cache.length, tokens.shape[1]
        e = self.model.embed(tokens.to(self.device), attend_for=self._cached(start))
        state = self._initial_state(e) if s0 is None else s0.to(e)
        depth, eps = self.options.depth, self.options.exit_kl
        b = tokens.shape[0]
        if self.options.exit_router:
            return self._routed_chunk(state, e, start)
        if (eps is None and self.options.exit_gate is None) or s > 1:
            for it in BackpropWindow(depth, 0).iterations():
                state = self.model.iteration(it, state, e, None, attend_for=self._cached(start, it.index - 1))
            used = torch.full((b,), depth, dtype=torch.long)
            logits = self._head(state, start)
        else:
            state, logits, used = self._adaptive(state, e, start)
        self.cache.fill(start, used.to(self.device))
        self.cache.length = start + s
        self.prev_state = state[-1:]
        self.depths.append(used)
        return logits.transpose(0, 1)

    def _adaptive(self, state, e, start: int):
        """Iterate one position until its row's exit rule says stop (or the maximum depth): KL(p_{i-1} || p_i) <
        eps, or the gate's exit CDF >= q. The batch is compacted: each iteration (core, coda and head) runs on the
        rows still iterating only, so a row that exited costs nothing more."""
        b = state.shape[1]
        eps, q = self.options.exit_kl, self.options.exit_gate
        active = torch.arange(b, device=state.device)  # the rows still iterating
        used = torch.zeros(b, dtype=torch.long)
        logits, prev_logp = None, None
        cdf = torch.zeros(b, dtype=torch.float64, device=state.device)
        survive = torch.ones(b, dtype=torch.float64, device=state.device)
        for it in BackpropWindow(self.options.depth, 0).iterations():
            new = self.model.iteration(it, state[:, active], e[:, active], None,
                                       attend_for=self._cached(start, it.index - 1, active))
            state = state.index_copy(1, active, new)
            used[active.cpu()] += 1
            out, hidden = self.model.head(new, attend_for=self._cached(start, None, active), return_hidden=True)
            new_logits = out.transpose(0, 1)  # [1, n, V]
            logits = (new_logits if logits is None else logits.index_copy(1, active, new_logits))
            if q is not None:
                lam = torch.sigmoid(self.model.exit_gate(hidden[:, -1]).double())  # [n]
                cdf[active], survive[active] = cdf[active] + lam * survive[active], survive[active] * (1 - lam)
                stop = cdf[active] >= q
            else:
                logp = F.log_softmax(new_logits[-1].float(), dim=-1)  # [n, V]
                stop = torch.zeros(len(active), dtype=torch.bool, device=state.device)
                if prev_logp is not None:
                    kl = (prev_logp[active].exp() * (prev_logp[active] - logp)).sum(-1).clamp_min(0.0)
                    stop = kl < eps
                    prev_logp = prev_logp.index_copy(0, active, logp)
                else:
                    prev_logp = logp
            active = active[~stop]
            if len(active) == 0:
                break
        return state, logits, used

    def _routed_chunk(self, state, e, start: int) -> torch.Tensor:
        """exit_router: the chunk's positions through the core one at a time (each routed, the rows that go on
        compacted), then the coda and head over the chunk; logits `[b, s, V]`."""
        s = e.shape[0]
        finals = []
        for t in range(s):
            final, used = self._route_one(state[t:t + 1], e[t:t + 1], start + t)
            self.reached[:, start + t] = used.to(self.device)
            self.cache.fill(start + t, used.to(self.device))
            self.depths.append(used)
            finals.append(final)
        state = torch.cat(finals)
        logits = self._head(state, start)
        self.cache.length = start + s
        self.prev_state = state[-1:]
        return logits.transpose(0, 1)

    def _route_one(self, state, e, position: int):
        """One position `[1, b, h]` through the routed core: (final state, iterations each row ran `[b]`)."""
        router, b = self.model.recursion_router, state.shape[1]
        active = torch.arange(b, device=state.device)
        used = torch.zeros(b, dtype=torch.long)
        plan = router.token_choice(state, e, self.options.depth) if router.mode == "token" else None  # [1, b]
        for it in BackpropWindow(self.options.depth, 0).iterations():
            x, ex = state[:, active], e[:, active]
            rows_plan = None if plan is None else tuple(t[:, active] for t in plan)
            go, gate = (t[0] for t in router.causal_choice(it.index, x, ex, rows_plan))
            active, x, ex, gate = active[go], x[:, go], ex[:, go], gate[go]
            if len(active) == 0:
                break
            new = self.model.iteration(it, x, ex, None, attend_for=self._cached(position, it.index - 1, active))
            if router.gating == "weighted":
                new = x + gate.view(1, -1, 1).to(new.dtype) * (new - x)
            state = state.index_copy(1, active, new)
            used[active.cpu()] += 1
        return state, used

    def mean_depth(self) -> float:
        """Mean iterations per position over every `step` so far."""
        if not self.depths:
            return 0.0
        return float(torch.cat(self.depths).float().mean())


class DenseDecoder:
    """`LoopedDecoder`'s interface for a model.kind=dense GPTModel (recurdepth/model/dense.py), so that `eval`
    scores the sweep's dense baseline with the same prompts, stopping rule and verifiers: each `step` re-runs the
    model over the whole context (no KV cache; eval's contexts are short) and returns the new positions' logits.
    One pass per token: `depths` is 1 for every position, whatever `options.depth`."""

    def __init__(self, model, batch: int, max_len: int, options: DecodeOptions):
        self.model, self.options = model, options
        self.context: Optional[torch.Tensor] = None
        self.depths: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.context = tokens if self.context is None else torch.cat([self.context, tokens], 1)
        logits = self.model(self.context)  # [b, t, V]
        self.depths.append(torch.ones(tokens.shape[0], dtype=torch.long))
        return logits[:, -tokens.shape[1]:]


def decoder_for(model, batch: int, max_len: int, options: DecodeOptions):
    """The decoder of `model`'s kind: `LoopedDecoder` (KV-cached, per-iteration exits) or `DenseDecoder`."""
    cls = DenseDecoder if getattr(model, "kind", "looped") == "dense" else LoopedDecoder
    return cls(model, batch, max_len, options)
