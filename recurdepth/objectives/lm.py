"""The plain next-token objective: cross-entropy where the loss mask is 1 (answer-only masks, eod rules)."""

from __future__ import annotations

from recurdepth.objectives.base import Objective


def masked_loss_sum(per_token, loss_mask):
    """Sum of the per-token losses `[b, s]` where `loss_mask` is 1, in float32 or better (bf16 losses are summed
    in float32; float64 ones stay float64)."""
    import torch

    return (per_token.to(torch.promote_types(per_token.dtype, torch.float32)) * loss_mask).sum()


class LMObjective(Objective):
    """Next-token cross-entropy where the loss mask is 1."""

    kind = "lm"

    def __init__(self, cfg=None, tokenizer=None):
        super().__init__(cfg, tokenizer)

    def loss_sum(self, model, mb, window, collect_health: bool = False):
        per_token = model(mb.tokens, labels=mb.labels, window=window, sample_ids=mb.sample_ids,
                          collect_health=collect_health)
        return masked_loss_sum(per_token, mb.loss_mask)

    def pipeline_loss(self, per_token, mb):
        return masked_loss_sum(per_token, mb.loss_mask)
