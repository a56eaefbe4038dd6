"""Coconut: chain of continuous thought (Hao et al. 2024, arXiv 2412.06769), on the looped model.

Between `<bot>` and `<eot>` the input embedding of latent i is the model's last hidden state (the final-norm
output) at the position before it, so thought i+1 is computed from thought i:

    pass i = 1..n:  h = model(embeds[:, :p_i]).hidden        p_i = position of latent i (per sample)
                    embeds[b, p_i[b]] = h[b, p_i[b] - 1]       (out of place: gradients flow through it)
    pass n + 1:     loss = model(embeds, labels) on the steps left in language and the answer

With the multi-stage curriculum (data/stepwise.py), stage k = step // coconut_stage_steps replaces the first
k reasoning steps by n = min(k, max_stage) c latents. Every sample is padded to the stage's n latents, so a
stage-k micro-batch runs exactly n + 1 passes on every rank, derived from the global step alone: no rank
waits for another, under data or pipeline parallelism. Latents are aligned across the batch by index (pass i
fills latent i of every sample at its own position, one gather and one out-of-place scatter).

KV cache (`objective.coconut_kv_cache`, default on; objectives/prefix_cache.py), as the reference's
past_key_values: pass i's input differs from pass i-1's only at the latent pass i-1 filled, so with
f = the batch's first-latent positions, pass i computes only positions [start_i, end_i)

    start_1 = 0,  start_i = min_b p_{i-1}[b] = min f + i - 2      end_i = max_b p_i[b] = max f + i - 1
    start_{n+1} = min_b p_n[b]                                    end_{n+1} = s

attending to the keys and values of [0, start_i) that earlier passes computed, kept per layer and core
iteration with their autograd graph: the same function of the parameters and thoughts as recomputing the
prefix, so the same loss and gradients (rows whose latent lies after start_i recompute identical values).
RoPE positions are absolute and each position keeps its s_0 of the whole-sequence draw. The last pass's loss
covers [start_{n+1}, s) only, which loses nothing: the loss mask is 0 up to every sample's <eot> (checked).
Without the cache (and always under sequence parallelism) each thought pass recomputes the prefix [0, end_i)
and the last pass the whole sequence. Either way a pass draws the per-sample s_0 as for the whole sequence, so
a thought does not depend on its batch (without sample ids s_0 is a fresh draw per pass, once per micro-batch
with the cache).

Each pass is a whole forward of the looped model, so every latent goes through the recurrent core r times
(with the step's truncated-backprop window): the thought is the state the loop converged to, read out by the
coda. Gradients flow from the loss back through every fed-back hidden state, as in the reference. (With MoE
layers the router's load-balancing loss covers the positions each pass computes: with the cache each position
about once, without it the prefix again in every pass; that term alone differs between the two.)
Under pipeline parallelism the passes run through `pipelined_forward` (parallel/passes.py), the fed-back
thoughts `[b, h]` travel from the last stage to stage 0 with their gradients; each stage caches the keys and
values of its own layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from recurdepth.config import require
from recurdepth.data.stepwise import THOUGHT_SPECIALS, StageLayout, encode_problem
from recurdepth.data.tokenizer import require_special_tokens
from recurdepth.errors import DataError
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives.base import Objective, ObjectiveSection
from recurdepth.objectives.lm import masked_loss_sum
from recurdepth.objectives.prefix_cache import PrefixKVCache
from recurdepth.parallel.passes import StageLink, pipelined_forward, run_micro_batches, unwrap


@dataclass
class CoconutSection(ObjectiveSection):
    """`objective.*` of Coconut: stage k replaces the first k reasoning steps by k*c continuous thoughts."""

    kind: str = "coconut"
    coconut_thoughts_per_step: int = 1  # c latents per replaced step
    coconut_max_stage: int = 3  # most steps replaced; the stage after it drops every language step
    coconut_stage_steps: int = 100  # optimizer steps per curriculum stage (stage = step // this)
    # a pass computes only the positions from the earliest changed latent on, attending through the keys and values
    # (with their gradients) of the earlier passes (recurrence.checkpoint_iterations does not apply to them); false:
    # every pass recomputes its whole prefix (the same loss and gradients; always so under sequence parallelism)
    coconut_kv_cache: bool = True

    def validate(self, cfg) -> None:
        require(self.coconut_thoughts_per_step >= 1, "objective.coconut_thoughts_per_step",
                 self.coconut_thoughts_per_step, "use at least 1 latent per step")
        require(self.coconut_max_stage >= 0, "objective.coconut_max_stage", self.coconut_max_stage, "use 0 or more")
        require(self.coconut_stage_steps >= 1, "objective.coconut_stage_steps", self.coconut_stage_steps,
                 "use at least 1 optimizer step per stage")


class CoconutObjective(Objective):
    """Continuous thoughts with a stage curriculum; see the module docstring. `forward_passes` counts every
    model pass run (the same on every stage); `on_thought(i, thought [b, h])`, if set, sees each fed-back
    thought on the last stage (tests hook its gradient)."""

    kind = "coconut"
    Section = CoconutSection

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        o = cfg.objective
        self.ids = require_special_tokens(tokenizer, THOUGHT_SPECIALS, "objective.kind=coconut")
        self.c, self.max_stage, self.stage_steps = o.coconut_thoughts_per_step, o.coconut_max_stage, o.coconut_stage_steps
        self.kv_cache = o.coconut_kv_cache
        self.seq_length, self.pad = cfg.model.seq_length, tokenizer.pad
        self.step = 0
        self.forward_passes = 0
        self.on_thought: Optional[Callable] = None

    # ------------------------------------------------------------------ data

    @classmethod
    def datasets(cls, cfg, tokenizer, train_samples: int, valid_samples: int) -> tuple:
        """Step-by-step problems from the procedural sources (one per sample, never packed), checked to fit
        every stage of the curriculum."""
        from recurdepth.data.stepwise import StepwiseProblems, check_fits, stage_layouts

        o, s = cfg.objective, cfg.model.seq_length
        train, valid = (StepwiseProblems(cfg.data.sources, tokenizer, max(n, 1), s, cfg.train.seed, split,
                                         purpose="objective.kind=coconut")
                        for n, split in ((train_samples, "train"), (valid_samples, "test")))
        layouts = stage_layouts(o.coconut_thoughts_per_step, o.coconut_max_stage)
        for ds in (train, valid):
            check_fits(ds, layouts, s)
        return train, valid

    # ------------------------------------------------------------------ the curriculum

    def set_step(self, step: int) -> None:
        """The optimizer step about to run (the trainer calls it): it decides the stage."""
        self.step = step

    @property
    def stage(self) -> int:
        return self.step // self.stage_steps

    @property
    def layout(self) -> StageLayout:
        return StageLayout.of(self.stage, self.c, self.max_stage)

    def encode(self, mb, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens, labels, loss mask `[b, s]` of the micro-batch at the current stage, and the position of each
        sample's first latent `[b]`."""
        if mb.problems is None:
            raise DataError("objective.kind=coconut needs step-by-step problems, but this micro-batch is packed text; "
                            "its data is built from procedural data.sources by the data pipeline")
        rows = [encode_problem(p, self.layout, self.ids, self.seq_length, self.pad) for p in mb.problems]
        tokens, labels, mask = (torch.stack([r[i] for r in rows]).to(device) for i in range(3))
        return tokens, labels, mask, torch.tensor([r[3] for r in rows], device=device)

    # ------------------------------------------------------------------ the trainer's interface

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False) -> torch.Tensor:
        return self.passes(model, mb, window, StageLink())

    def loss_tokens(self, mb) -> torch.Tensor:
        return self.encode(mb, mb.loss_mask.device)[2].sum()

    def pipeline_run(self, model, batches: list, window: BackpropWindow) -> torch.Tensor:
        """Forward and backward of this rank's micro-batches on its pipeline stage; the summed loss on the last."""
        return run_micro_batches(model, batches, window, self.passes)

    # ------------------------------------------------------------------ the passes

    def passes(self, model, mb, window: BackpropWindow, link: StageLink) -> Optional[torch.Tensor]:
        """The n + 1 passes of one micro-batch (n = the stage's latents); its summed loss on the last stage."""
        m = unwrap(model)
        device = next(m.parameters()).device
        tokens, labels, mask, first = self.encode(mb, device)
        b, s = tokens.shape
        rows = torch.arange(b, device=device)
        embeds = m.token_embeddings(tokens) if m.is_first else None
        cache = PrefixKVCache(m, s) if self.kv_cache and not m.config.sequence_parallel else None
        s0 = None
        if cache is not None and m.is_first:  # every pass slices the whole sequence's s_0
            s0 = m.initial_state(embeds.new_empty((s, b, embeds.shape[-1])), mb.sample_ids)
        spans = self.spans(first, s, m, cache is not None)
        for i, (start, end) in enumerate(spans[:-1]):
            pos = first + i  # latent i of every sample; its thought is the hidden state one position earlier
            out = self.run_pass(model, window, link, mb, tokens, embeds, s0, cache, start, end, return_hidden=True)
            thought = None
            if out is not None:
                thought = out[1][rows, pos - 1 - start]
                if self.on_thought is not None:
                    self.on_thought(i, thought)
            thought = link.last_to_first(thought, (b, m.config.hidden_size), m.config.params_dtype, device)
            if embeds is not None:
                embeds = embeds.index_put((rows, pos), thought)
        start, end = spans[-1]
        if start and bool(mask[:, :start].any()):
            raise RuntimeError(f"Coconut's loss mask covers a position before {start} (the earliest last latent); "
                               f"the cached last pass starts there: run with objective.coconut_kv_cache=false")
        out = self.run_pass(model, window, link, mb, tokens, embeds, s0, cache, start, end, labels=labels[:, start:])
        return None if out is None else masked_loss_sum(out, mask[:, start:])

    def spans(self, first: torch.Tensor, s: int, m, cached: bool) -> list[tuple[int, int]]:
        """The positions [start, end) each of the n + 1 passes computes (module docstring), from the first-latent
        positions `first [b]`: with the cache from the earliest position whose input changed since the previous
        pass, else from 0; thought passes up to the furthest latent they fill, the last pass to s."""
        n = self.layout.latents
        lo, hi = (int(v) for v in first.aminmax()) if n else (0, 0)
        ends = [self.prefix_length(hi + i, s, m) for i in range(n)] + [s]
        starts = [0, *(lo + i for i in range(n))] if cached else [0] * (n + 1)
        return list(zip(starts, ends))

    def run_pass(self, model, window: BackpropWindow, link: StageLink, mb, tokens, embeds, s0, cache, start: int,
                 end: int, labels=None, return_hidden: bool = False):
        """One pass over positions [start, end): through the cache, with its slice of the whole sequence's s_0, or
        (no cache: start = 0) over the prefix."""
        inputs = dict(input_ids=tokens[:, start:end], sample_ids=mb.sample_ids, labels=labels,
                      inputs_embeds=None if embeds is None else embeds[:, start:end], return_hidden=return_hidden)
        self.forward_passes += 1
        if cache is None:  # s_0 drawn for all s positions (a pass over all of them takes the plain draw, as SP needs)
            s = tokens.shape[1]
            return pipelined_forward(model, window, link, state_length=s if end < s else None, **inputs)
        cache.advance(start, end)
        return pipelined_forward(model, window, link, s0=None if s0 is None else s0[start:end],
                                 attend_at=cache.attend_at, **inputs)

    @staticmethod
    def prefix_length(need: int, s: int, m) -> int:
        """The tokens a thought pass runs: up to the furthest latent it fills (causal attention: the rest cannot
        change the thought; s_0 is drawn for the whole sequence), or all s under sequence parallelism."""
        return s if m.config.sequence_parallel else min(need, s)

