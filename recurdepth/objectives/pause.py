"""Pause tokens (Goyal et al. 2023, arXiv 2310.02226) and supervised filler tokens (Pfau et al. 2024).

The pauses themselves are put into the data (recurdepth/data/pauses.py: random positions in pretraining
sequences, M pauses between prompt and answer of procedural samples). The objective is the next-token loss
with one more rule, applied here whatever the data: a label that is `<pause>` never reaches the loss, so the
model is never trained to predict a pause, only to use the extra positions. With the `filler` variant the
inserted token is an ordinary "." and is a target like any other.

It is one forward per micro-batch, so under pipeline parallelism the looped schedule runs it unchanged.
"""

from __future__ import annotations

import torch

from recurdepth.data.pauses import pause_token
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives import masked_loss_sum


class PauseObjective:
    """Next-token cross-entropy where the loss mask is 1 and the label is not a pause."""

    kind = "pause"

    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.token, self.supervised = pause_token(cfg, tokenizer)  # DataError naming a missing <pause>

    def target_mask(self, mb) -> torch.Tensor:
        """`[b, s]`: the data's loss mask, zero where the next token is a pause (unless supervised filler)."""
        if self.supervised:
            return mb.loss_mask
        return mb.loss_mask * (mb.labels != self.token).to(mb.loss_mask.dtype)

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False) -> torch.Tensor:
        per_token = model(mb.tokens, labels=mb.labels, window=window, sample_ids=mb.sample_ids,
                          collect_health=collect_health)
        return masked_loss_sum(per_token, self.target_mask(mb))

    def loss_tokens(self, mb) -> torch.Tensor:
        return self.target_mask(mb).sum()

    def pipeline_loss(self, per_token: torch.Tensor, mb) -> torch.Tensor:
        return masked_loss_sum(per_token, self.target_mask(mb))
