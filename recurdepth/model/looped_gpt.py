"""The recurrent-depth language model (Huginn-style, arXiv 2502.05171), as its equations read:

    e   = prelude(embed(x) * embedding_scale)                 # P layers, run once
    s_0 ~ TruncNormal(0, std^2) * embedding_scale  (or zeros)  # one draw per sample, seeded by its index
    s_i = core(adapter(s_{i-1}, e))          for i = 1..r      # R layers, looped r times
    p   = head(norm(coda(s_r)))                                # C layers, run once
                                 (norm(coda(norm(s_r))) with model.norm_before_coda, as Huginn)

Truncated backprop (`BackpropWindow`): iterations 1..r-k run under `torch.no_grad()`, so memory does not
grow with r; the last min(r, k) iterations carry gradients. Every core weight is used in each of those,
so every parameter receives a gradient whenever k >= 1: no `find_unused_parameters` workaround.

Tensors are `[seq, batch, hidden]` inside the model (megatron's layout); inputs and losses are `[batch, seq]`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from recurdepth.config import ModelConfig, RecurrenceConfig
from recurdepth.errors import RecurdepthError
from recurdepth.model.depth import BackpropWindow, Iteration
from recurdepth.seeding import derive_seed, device_generator
from recurdepth.model.layers import InjectionAdapter, LoopedTransformerLayer, layer_spec_submodules, rope_cos_sin
from recurdepth.model.rope import rope_inv_freq

_STATE_STREAM = 0x57A7E  # separates the initial-state stream from other per-sample streams


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x [s, b, ...]` at the positions `index [b, K]` -> `[K, b, ...]` (the tokens routed through the core)."""
    rows = index.t()
    return x.gather(0, rows.reshape(*rows.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))


class LoopedGPTModel(LanguageModule):
    """Embedding -> prelude -> (adapter -> core) x r -> coda -> norm -> head, on megatron-core layers.

    `forward(input_ids [b, s], labels [b, s] | None, window, sample_ids)` returns the per-token loss
    `[b, s]` when labels are given, else logits `[b, s, vocab / tp]`.
    """

    def __init__(self, config: TransformerConfig, model_cfg: ModelConfig, recurrence_cfg: RecurrenceConfig,
                 vocab_size: int, seed: int = 0, use_te: bool = False,
                 pre_process: bool = True, post_process: bool = True, core_range: Optional[tuple] = None):
        super().__init__(config=config)
        self.model_cfg = model_cfg
        self.vocab_size = vocab_size
        self.seed = seed
        self.pre_process, self.post_process = pre_process, post_process
        self.share_embeddings_and_output_weights = model_cfg.tie_embeddings
        self.checkpoint_iterations = recurrence_cfg.checkpoint_iterations
        self.rope_tables = not use_te  # RotarySelfAttention (local spec) takes RoPE as (cos, sin)
        h = config.hidden_size
        dense, norm = layer_spec_submodules(use_te, model_cfg.attention, qk_norm=model_cfg.qk_norm)
        moe = layer_spec_submodules(use_te, model_cfg.attention, model_cfg.num_experts,
                                    qk_norm=model_cfg.qk_norm)[0] if model_cfg.num_experts else dense

        def stack(indices, first: int, submodules) -> torch.nn.ModuleDict:
            # keyed by the layer's index within its block, so names are the same under every layout
            return torch.nn.ModuleDict({
                str(i): LoopedTransformerLayer(config, submodules, layer_number=first + i + 1,
                                               block_norm=model_cfg.block_norm, post_norm=norm)
                for i in indices})

        P, R, C = model_cfg.prelude_layers, model_cfg.core_layers, model_cfg.coda_layers
        # pipeline stage s of p holds core layers [s R/p, (s+1) R/p); the first stage also embedding, prelude and
        # adapter, the last coda, final norm and head
        self.core_range = core_range or (0, R)
        if pre_process:
            self.embedding = LanguageModelEmbedding(config, vocab_size, model_cfg.seq_length,
                                                    position_embedding_type="rope")
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels, rotary_percent=1.0,
                                              rotary_base=model_cfg.rotary_base, use_cpu_initialization=True)
        # frequencies in float64: exact angles at any sequence length; cos/sin are cast to the activations' dtype
        d = config.kv_channels
        self.rotary_pos_emb.inv_freq = rope_inv_freq(model_cfg, d)
        outer = moe if model_cfg.moe_layers == "all" else dense
        self.prelude = stack(range(P) if pre_process else (), 0, outer)
        if pre_process:
            self.adapter = InjectionAdapter(model_cfg.adapter, h, dtype=config.params_dtype,
                                            sequence_parallel=config.sequence_parallel)
        self.core = stack(range(*self.core_range), P, moe)  # experts, like every core weight, are shared by all iterations
        self.coda = stack(range(C) if post_process else (), P + R, outer)
        if post_process:
            self.final_layernorm = build_module(norm, config=config, hidden_size=h, eps=config.layernorm_epsilon)
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                h, vocab_size, config=config, init_method=config.init_method, bias=False,
                gather_output=False, skip_bias_add=False,
                skip_weight_param_allocation=pre_process and self.share_embeddings_and_output_weights)
        self.setup_embeddings_and_output_layer()
        self.state_std = model_cfg.initial_state_std or model_cfg.init_std or (2.0 / (5.0 * h)) ** 0.5
        self.last_health: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ the equations
    #
    # Each block call takes an optional `attend_for(name, layer)`: given a layer's global name ("prelude.0",
    # "core.3", "coda.1") it returns the `attend(normed_x)` hook that replaces that layer's self-attention
    # (the KV-cached decoder), or None for the layer's own attention. A hook that keeps no state between calls
    # says so with `attend_for.recomputable = True`: checkpointed iterations may then run it again in backward.

    def _blocks(self, stack: str, x: torch.Tensor, rope, attention_mask, attend_for=None) -> torch.Tensor:
        if self.rope_tables and torch.is_tensor(rope):
            # our attention (local spec) takes ready (cos, sin) in the activations' dtype: computed once per table
            # here, not inside every (compiled) block, where inductor would evaluate them per element of q and k
            rope = rope_cos_sin(rope, x.dtype)
        for i, layer in getattr(self, stack).items():
            attend = None if attend_for is None else attend_for(f"{stack}.{i}", layer)
            x = layer(x, rope, attention_mask, attend=attend)
        return x

    def embed(self, input_ids: Optional[torch.Tensor], inputs_embeds: Optional[torch.Tensor] = None,
              position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
              attend_for=None) -> torch.Tensor:
        """`[b, s]` token ids (or ready token embeddings `inputs_embeds [b, s, h]`) -> `e = prelude(embed(x) *
        scale)` as `[s, b, h]` (this rank's sequence slice under sequence parallelism)."""
        if inputs_embeds is None:
            e = self.embedding(input_ids=input_ids, position_ids=None)
        else:
            e = inputs_embeds.transpose(0, 1).contiguous()
            if self.config.sequence_parallel:
                e = tensor_parallel.scatter_to_sequence_parallel_region(e)
        if self.model_cfg.embedding_scale != 1.0:
            e = e * self.model_cfg.embedding_scale
        rope = None if attend_for is not None else self.rope(self.full_seq_len(e), position_ids)
        return self._blocks("prelude", e, rope, attention_mask, attend_for)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The word embeddings `[b, s, h]` of `input_ids` (reduced over TP, whole sequence, unscaled): what
        `inputs_embeds` expects, for objectives that splice other vectors in (continuous thoughts)."""
        return self.embedding.word_embeddings(input_ids)

    def draw_state(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                   generator: Optional[torch.Generator]) -> torch.Tensor:
        """A truncated normal (+-3 std) of `shape` from `generator` (on `device`; None on meta), on `device`,
        scaled by embedding_scale: the initial-state distribution (`initial_state` seeds one generator per sample;
        the decoder keeps its own). Drawn in float32 or better, then cast to `dtype` (a bf16 step draws in
        float32: bf16's 8 mantissa bits would round the truncation's inverse-CDF draw)."""
        std = self.state_std
        draw = torch.nn.init.trunc_normal_(torch.empty(tuple(shape), dtype=torch.promote_types(dtype, torch.float32),
                                                       device=device),
                                           0.0, std, -3 * std, 3 * std, generator=generator)
        return (draw * self.model_cfg.embedding_scale).to(dtype)

    def initial_state(self, e: torch.Tensor, sample_ids: Optional[Sequence[int]] = None) -> torch.Tensor:
        """s_0 `[s, b, h]`: zeros, or a truncated normal (+-3 std) drawn per sample on e's device from a generator
        seeded by (seed, sample index), so the draw does not depend on the batch layout, rank or resume point
        (a GPU's generator draws other numbers than the CPU's: a sample's s_0 depends on the device type)."""
        if self.model_cfg.initial_state == "zeros":
            return torch.zeros_like(e)
        std, (s, b, h) = self.state_std, e.shape
        if self.config.sequence_parallel:
            s *= parallel_state.get_tensor_model_parallel_world_size()
        if sample_ids is None:
            state = torch.empty_like(e)
            torch.nn.init.trunc_normal_(state, 0.0, std, -3 * std, 3 * std)
            return state * self.model_cfg.embedding_scale
        assert len(sample_ids) == b, f"need one sample id per batch row, got {len(sample_ids)} for {b}"
        draws = [self.draw_state((s, h), e.dtype, e.device,
                                 device_generator(e.device, derive_seed(self.seed, _STATE_STREAM, sid)))
                 for sid in sample_ids]
        state = torch.stack(draws, dim=1)
        if self.config.sequence_parallel:  # this TP rank's slice of the sequence, as e is
            state = state.chunk(parallel_state.get_tensor_model_parallel_world_size())[
                parallel_state.get_tensor_model_parallel_rank()]
        return state

    def core_step(self, state: torch.Tensor, e: torch.Tensor, rope: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor] = None, attend_for=None) -> torch.Tensor:
        """One iteration `s_i = core(adapter(s_{i-1}, e))` (on one pipeline stage: its share of it)."""
        x = self.adapter(state, e) if self.pre_process else state
        return self._blocks("core", x, rope, attention_mask, attend_for)

    def iteration(self, it: Iteration, state: torch.Tensor, e: Optional[torch.Tensor], rope: Optional[torch.Tensor],
                  attention_mask: Optional[torch.Tensor] = None, attend_for=None) -> torch.Tensor:
        """One trip through the core as the window's `it` says: without autograd (truncated backprop), with it,
        or checkpointed (`recurrence.checkpoint_iterations`: recomputed in backward). Every loop over the core
        (`recur`, the pipeline schedule's chunks, `pipelined_forward`, the decoder) runs its iterations here."""
        if not it.grad:
            with torch.no_grad():
                return self.core_step(state, e, rope, attention_mask, attend_for)
        if self.checkpoint_iterations and torch.is_grad_enabled() and (
                attend_for is None or getattr(attend_for, "recomputable", False)):
            return checkpoint(self.core_step, state, e, rope, attention_mask, attend_for, use_reentrant=False)
        return self.core_step(state, e, rope, attention_mask, attend_for)

    def routed_iteration(self, it: Iteration, state: torch.Tensor, e: torch.Tensor, rope: torch.Tensor,
                         index: torch.Tensor, gate: Optional[torch.Tensor] = None,
                         valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One iteration on some of each row's tokens (Mixture-of-Recursions): the tokens at `index [b, K]`
        (ascending positions per row) go through the core gathered into a `[K, b, h]` batch, attending causally to
        each other only, at their own RoPE positions (recursion-wise KV: only they write keys and values here);
        every other token keeps its state and costs nothing. At the routed tokens
        s_i = s_{i-1} + g (core(adapter(s_{i-1}, e)) - s_{i-1}) with `gate` g `[b, K]` (None: g = 1, the plain
        update). `valid [b, K]` (None: all) marks the real entries of rows padded to K; the padding comes after
        a row's real entries, so causality keeps it out of their attention; it is computed and dropped. Run as `iteration` runs it (no grad, grad, or
        checkpointed); the whole update is outside autograd in a no-grad iteration."""
        if self.rope_tables is False or self.config.sequence_parallel:
            raise RecurdepthError("routing tokens past the core needs model.spec=local and "
                                  "parallel.sequence_parallel=false (per-row RoPE positions, whole sequences)")
        with contextlib.nullcontext() if it.grad else torch.no_grad():
            h = state.shape[-1]
            rows = index.t()  # [K, b]
            spread = rows.unsqueeze(-1).expand(-1, -1, h)
            x, ex = gather_rows(state, index), gather_rows(e, index)
            cos, sin = rope_cos_sin(rope, state.dtype)  # [s, 1, 1, d]
            cos, sin = cos[:, 0, 0][rows].unsqueeze(2), sin[:, 0, 0][rows].unsqueeze(2)  # [K, b, 1, d]
            update = self.iteration(it, x, ex, (cos, sin)) - x  # causal over the gathered order
            if gate is not None:
                update = gate.t().unsqueeze(-1).to(update.dtype) * update
            if valid is not None:
                update = update * valid.t().unsqueeze(-1).to(update.dtype)
            return state.scatter_add(0, spread, update)

    def core_chunk(self, x: torch.Tensor, e: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None, it: Optional[Iteration] = None) -> torch.Tensor:
        """This pipeline stage's part of one iteration (the pipeline schedule's `LoopedStage` interface); with
        `it`, run as that iteration of the window (`iteration`), else as a plain step."""
        rope = self.rope(self.full_seq_len(x), position_ids)
        if it is None:
            return self.core_step(x, e, rope, attention_mask)
        return self.iteration(it, x, e, rope, attention_mask)

    def recur(self, state: torch.Tensor, e: torch.Tensor, window: BackpropWindow,
              collect_health: bool = False, position_ids: Optional[torch.Tensor] = None,
              attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the core `window.total` times: the first `window.no_grad` without autograd."""
        rope = self.rope(self.full_seq_len(e), position_ids)
        previous = state
        for it in window.iterations():
            previous, state = state, self.iteration(it, state, e, rope, attention_mask)
        if collect_health:
            self.last_health = recurrence_health(previous.detach(), state.detach())
        return state

    def recur_rows(self, state: torch.Tensor, e: torch.Tensor, depths: Sequence[int], backprop_depth: int,
                   collect_health: bool = False, position_ids: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the core a different number of times per batch row (per-sample depth): row b runs `depths[b]`
        iterations with its own truncated window (`BackpropWindow.of(depths[b], backprop_depth)`), then keeps
        its state while longer rows go on. Iteration i runs the core once on the rows still going without grad
        and once on those in their window, each gathered along the batch (whole sequences, so attention and
        RoPE are a plain step's); finished rows cost nothing. With every row at one depth this is `recur`."""
        depths = [int(d) for d in depths]
        if len(depths) != state.shape[1]:
            raise RecurdepthError(f"per-sample depth: {len(depths)} depths for a batch of {state.shape[1]} rows")
        if min(depths) < 1:
            raise RecurdepthError(f"per-sample depth: every row needs r >= 1, got {min(depths)}")
        if len(set(depths)) == 1:  # one depth: the plain loop
            return self.recur(state, e, BackpropWindow.of(depths[0], backprop_depth), collect_health,
                              position_ids, attention_mask)
        if attention_mask is not None and attention_mask.shape[0] != 1:
            raise RecurdepthError("per-sample depth takes an attention mask shared by the batch (or none)")
        rope = self.rope(self.full_seq_len(e), position_ids)
        windows = [BackpropWindow.of(d, backprop_depth) for d in depths]
        previous = state
        for i in range(1, max(depths) + 1):
            groups = {}  # the rows that run iteration i, by whether it carries gradients for them
            for b, w in enumerate(windows):
                if i <= w.total:
                    groups.setdefault(w.grad_at(i), []).append(b)
            before = state
            for grad, rows in sorted(groups.items()):
                index = torch.tensor(rows, device=state.device)
                it = Iteration(i, grad, False, i == max(depths))  # `iteration` reads only whether it has grad
                out = self.iteration(it, state.index_select(1, index), e.index_select(1, index), rope,
                                     attention_mask)
                state = state.index_copy(1, index, out)
            if collect_health:  # each row's state before its last iteration
                ran = torch.tensor([b for rows in groups.values() for b in rows], device=state.device)
                previous = previous.index_copy(1, ran, before.index_select(1, ran))
        if collect_health:
            self.last_health = recurrence_health(previous.detach(), state.detach())
        return state

    def readout_forward(self, input_ids: torch.Tensor, labels: torch.Tensor, window: BackpropWindow,
                        sample_ids: Optional[Sequence[int]] = None, read_at: Optional[Sequence[int]] = None,
                        collect_health: bool = False, position_ids: Optional[torch.Tensor] = None) -> tuple:
        """The model read out after several iterations (adaptive-depth objectives): the loop runs as `forward`'s,
        and after each iteration i in `read_at` (1-based; default every one) the coda, final norm and head are
        applied to s_i. The readouts go through the head in one batched pass (the n states stacked along the
        batch). Returns (read_at, per-token losses `[n, b, s]`, final-norm hidden `[n, b, s, h]`)."""
        e = self.embed(input_ids, None, position_ids)
        state = self.initial_state(e, sample_ids)
        rope = self.rope(self.full_seq_len(e), position_ids)
        wanted = set(range(1, window.total + 1) if read_at is None else read_at)
        states, picked, previous = [], [], state
        for it in window.iterations():
            previous, state = state, self.iteration(it, state, e, rope)
            if it.index in wanted:
                states.append(state)
                picked.append(it.index)
        if collect_health:
            self.last_health = recurrence_health(previous.detach(), state.detach())
        return (picked, *self.read_out(states, labels, position_ids))

    def read_out(self, states: Sequence[torch.Tensor], labels: torch.Tensor,
                 position_ids: Optional[torch.Tensor] = None) -> tuple:
        """coda + final norm + head on n states `[s, b, h]` in one pass (stacked along the batch): per-token
        losses `[n, b, s]` and final-norm hidden `[n, b, s, h]`."""
        n, b = len(states), labels.shape[0]
        losses, hidden = self.head(torch.cat(list(states), dim=1), labels.repeat(n, 1), position_ids,
                                   return_hidden=True)
        return losses.reshape(n, b, -1), hidden.reshape(n, b, *hidden.shape[1:])

    def output(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output layer on final-norm hidden states `x [s, b, h]`: the per-token loss `[b, s]` if labels, else
        logits `[s, b, v/tp]` (megatron's layout; `head` transposes them)."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(x, weight=weight)
        return logits if labels is None else self.compute_language_model_loss(labels, logits)

    def head(self, state: torch.Tensor, labels: Optional[torch.Tensor] = None,
             position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
             return_hidden: bool = False, attend_for=None):
        """coda -> final norm -> output layer; the per-token loss `[b, s]` if labels, else logits `[b, s, v/tp]`.
        With `return_hidden`, also the final-norm output `[b, s, h]` (whole sequence): (output, hidden)."""
        rope = None if attend_for is not None else self.rope(self.full_seq_len(state), position_ids)
        x = self.final_layernorm(state) if self.model_cfg.norm_before_coda else state  # Huginn's ln_f, used twice
        x = self.final_layernorm(self._blocks("coda", x, rope, attention_mask, attend_for))
        out = self.output(x, labels)
        if labels is None:
            out = out.transpose(0, 1).contiguous()
        if not return_hidden:
            return out
        if self.config.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return out, x.transpose(0, 1)

    def forward(self, input_ids: Optional[torch.Tensor], labels: Optional[torch.Tensor] = None,
                window: BackpropWindow = BackpropWindow(4, 4), sample_ids: Optional[Sequence[int]] = None,
                collect_health: bool = False, *, inputs_embeds: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                return_hidden: bool = False, s0: Optional[torch.Tensor] = None,
                row_depths: Optional[Sequence[int]] = None):
        """The whole model (one pipeline stage holds it all). Optional, for objectives and inference:
        `inputs_embeds [b, s, h]` instead of `input_ids` (see `token_embeddings`); `position_ids [s]` (shared by
        the batch; RoPE positions, default 0..s-1, each < max(s, model.seq_length)); `attention_mask` boolean,
        broadcastable to `[b, 1, s, s]`, True = masked out (default causal); `return_hidden` -> (output, hidden);
        `s0 [s, b, h]`: the initial state to start from instead of `initial_state`'s draw; `row_depths [b]`:
        each row's own r (`recur_rows`; the window's `with_grad` is then each row's k: 0 for none)."""
        e = self.embed(input_ids, inputs_embeds, position_ids, attention_mask)
        s0 = self.initial_state(e, sample_ids) if s0 is None else s0
        if row_depths is not None:
            state = self.recur_rows(s0, e, row_depths, window.with_grad, collect_health, position_ids, attention_mask)
        else:
            state = self.recur(s0, e, window, collect_health, position_ids, attention_mask)
        return self.head(state, labels, position_ids, attention_mask, return_hidden)

    # ------------------------------------------------------------------ helpers

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's sharded state dict, with the layer stacks entered layer by layer: megatron's default
        recursion treats a plain ModuleList as replicated local tensors, which would save TP shards under one
        key (and lose all but one). Layer keys are global (`core.<i>`), so a checkpoint reshards across layouts."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for stack in ("prelude", "core", "coda"):
            head = f"{prefix}{stack}."
            for key in [k for k in sd if k.startswith(head)]:
                del sd[key]
            for index, layer in getattr(self, stack).items():
                sd.update(sharded_state_dict_default(layer, f"{head}{index}.", sharded_offsets, metadata))
        return sd

    def rope(self, seq_len: int, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """RoPE frequencies `[s, 1, 1, d]` for positions 0..seq_len-1, or for `position_ids [s]`."""
        if position_ids is None:
            return self.rotary_pos_emb(seq_len)
        table = self.rotary_pos_emb(max(seq_len, self.model_cfg.seq_length))
        return table[position_ids.to(table.device)]

    @property
    def is_first(self) -> bool:
        """First pipeline stage (embedding, prelude, adapter, s_0)."""
        return self.pre_process

    @property
    def is_last(self) -> bool:
        """Last pipeline stage (coda, final norm, head)."""
        return self.post_process

    def full_seq_len(self, x: torch.Tensor) -> int:
        """Sequence length of `[s, b, h]` activations, which hold s / tp tokens under sequence parallelism."""
        tp = parallel_state.get_tensor_model_parallel_world_size() if self.config.sequence_parallel else 1
        return x.shape[0] * tp


@torch.no_grad()
def recurrence_health(previous: torch.Tensor, final: torch.Tensor) -> dict[str, torch.Tensor]:
    """Convergence of the loop, from the last two states `[s, b, h]`:
    rel_residual = ||s_r - s_{r-1}|| / ||s_r||; state_norm = mean per-token ||s_r||;
    token_cosine = mean pairwise cosine similarity between the final-state tokens of a sequence."""
    final32, previous32 = final.float(), previous.float()
    rel = (final32 - previous32).norm() / final32.norm().clamp_min(1e-12)
    norm = final32.norm(dim=-1).mean()
    unit = torch.nn.functional.normalize(final32.transpose(0, 1), dim=-1)  # [b, s, h]
    gram = unit @ unit.transpose(1, 2)  # [b, s, s]
    s = gram.shape[-1]
    off_diag = (gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(-1)) / max(s * (s - 1), 1)
    return {"rel_residual": rel, "state_norm": norm, "token_cosine": off_diag.mean()}
