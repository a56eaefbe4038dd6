"""Deep supervision (TRM, Jolicoeur-Martineau 2025, arXiv 2510.04871; HRM, Wang et al. 2025): the step's r core
iterations run as S segments, the state detached between them, a loss on every segment's readout.

    segments (model/depth.py `segment_windows`): n = min(S, r) runs of r // n iterations (the first r % n one
    longer), each with its own truncated-backprop window (gradients through its last min(m, k) iterations)
    s^(0) = s_0;  s^(j) = core^{m_j}(s^(j-1).detach(), e)          the state detached between segments
    loss  = sum_j w_j L(head(coda(s^(j))))                         per token, where the loss mask is 1

`objective.supervision_weights` are w_1..w_S (default 1/S each); when r < S the last n weights are used. TRM runs
one optimizer step per segment (N_sup up to 16, the state carried between them); here the segments' losses are
summed into one step, which gives the same gradients as accumulating them (each segment's graph is its own) and
keeps the step the unit that the data, the depth sampler and checkpoints count. The readouts of the n segment
ends go through the coda and head in one batched pass. Metrics: `supervision/first_loss`, `supervision/last_loss`
(token means of the first and last segment's readout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from recurdepth.config import require
from recurdepth.model.depth import segment_windows
from recurdepth.objectives.base import Objective, ObjectiveSection, TokenMeans
from recurdepth.parallel.passes import pipelined_forward, run_micro_batches, unwrap


@dataclass
class DeepSupervisionSection(ObjectiveSection):
    kind: str = "deep_supervision"
    supervision_segments: int = 2  # S segments of the step's r iterations, each read out and supervised
    supervision_weights: list = field(default_factory=list)  # w_1..w_S (default 1/S each)

    def validate(self, cfg) -> None:
        require(self.supervision_segments >= 2, "objective.supervision_segments", self.supervision_segments,
                "use 2 or more segments (1 is the plain lm objective)")
        require(not self.supervision_weights or len(self.supervision_weights) == self.supervision_segments,
                "objective.supervision_weights", self.supervision_weights,
                f"give one weight per segment ({self.supervision_segments}), or none for 1/S each")
        require(all(isinstance(w, (int, float)) and w >= 0 for w in self.supervision_weights),
                "objective.supervision_weights", self.supervision_weights, "use weights >= 0")


class DeepSupervisionObjective(Objective):
    kind = "deep_supervision"
    Section = DeepSupervisionSection

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        o = cfg.objective
        self.segments = o.supervision_segments
        self.weights = [float(w) for w in o.supervision_weights] or [1.0 / self.segments] * self.segments
        self.means = TokenMeans("supervision/first_loss", "supervision/last_loss")

    def set_step(self, step: int) -> None:
        self.means.reset()

    def segment_losses(self, model, mb, window, collect_health: bool = False) -> torch.Tensor:
        """Per-token losses `[n, b, s]` of the n segment readouts."""
        m = unwrap(model)
        e = m.embed(mb.tokens)
        rope = m.rope(m.full_seq_len(e))
        state = previous = m.initial_state(e, mb.sample_ids)
        ends = []
        for segment in segment_windows(window.total, self.segments, self.cfg.recurrence.backprop_depth
                                       if window.with_grad else 0):
            state = state.detach()
            for it in segment.iterations():
                previous, state = state, m.iteration(it, state, e, rope)
            ends.append(state)
        if collect_health:
            from recurdepth.model.looped_gpt import recurrence_health

            m.last_health = recurrence_health(previous.detach(), state.detach())
        losses, _ = m.read_out(ends, mb.labels)
        return losses.to(torch.promote_types(e.dtype, torch.float32))  # megatron's cross-entropy is float32

    def loss_sum(self, model, mb, window, collect_health: bool = False) -> torch.Tensor:
        return self.weighted_sum(self.segment_losses(model, mb, window, collect_health), mb)

    def weighted_sum(self, losses: torch.Tensor, mb) -> torch.Tensor:
        """sum_j w_j L_j over the loss-masked tokens, from the n segment readouts' per-token losses `[n, b, s]`."""
        n = losses.shape[0]
        weights = torch.tensor(self.weights[-n:], dtype=losses.dtype, device=losses.device).reshape(n, 1, 1)
        mask = mb.loss_mask.to(losses.dtype)
        self.means.add(mask.sum(), (losses[0] * mask).sum(), (losses[-1] * mask).sum())
        return ((weights * losses).sum(0) * mask).sum()

    def pipeline_run(self, model, batches: list, window) -> torch.Tensor:
        """Under PP: each segment is one `pipelined_forward` over the stages (its own window), the micro-batches
        interleaved over the ring (parallel/passes.py)."""
        return run_micro_batches(model, batches, window, self.passes)

    def passes(self, model, mb, window, link) -> Optional[torch.Tensor]:
        """The n segments of one micro-batch across the stages: segment j starts on the first stage from the
        last stage's s^(j-1), detached (sent back without gradient), and re-embeds the tokens (the prelude runs
        once per segment here; e's gradients add up to the one-stage step's). Its summed loss on the last stage."""
        m = unwrap(model)
        k = self.cfg.recurrence.backprop_depth if window.with_grad else 0
        segments = segment_windows(window.total, self.segments, k)
        shape, dtype = (mb.tokens.shape[1], mb.tokens.shape[0], m.config.hidden_size), m.config.params_dtype
        s0, readouts = None, []
        for j, segment in enumerate(segments):
            out = pipelined_forward(model, segment, link, input_ids=mb.tokens, sample_ids=mb.sample_ids,
                                    labels=mb.labels, s0=s0, return_state=True)
            state = None
            if out is not None:
                losses, state = out
                readouts.append(losses.to(torch.promote_types(state.dtype, torch.float32)))
            if j < len(segments) - 1:  # s0 is read on the first stage only
                s0 = link.last_to_first(None if state is None else state.detach(), shape, dtype,
                                        next(m.parameters()).device, requires_grad=False)
        return self.weighted_sum(torch.stack(readouts), mb) if readouts else None

    def metrics(self) -> dict[str, float]:
        return self.means.pop()
