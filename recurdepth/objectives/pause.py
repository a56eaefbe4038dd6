"""Pause tokens (Goyal et al. 2023, arXiv 2310.02226) and supervised filler tokens (Pfau et al. 2024).

The pauses themselves are put into the data by this objective's data hooks (with recurdepth/data/pauses.py:
random positions in pretraining sequences, M pauses between prompt and answer of procedural samples). The
objective is the next-token loss with one more rule, applied here whatever the data: a label that is `<pause>`
never reaches the loss, so the model is never trained to predict a pause, only to use the extra positions.
With the `filler` variant the inserted token is an ordinary "." and is a target like any other.

It is one forward per micro-batch, so under pipeline parallelism the looped schedule runs it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from recurdepth.config import require
from recurdepth.errors import DataError
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives.base import Objective, ObjectiveSection
from recurdepth.objectives.lm import masked_loss_sum


@dataclass
class PauseSection(ObjectiveSection):
    kind: str = "pause"
    pause_fraction: float = 0.1  # share of every pretraining sequence that is pauses, at random positions
    pause_count: int = 0  # M pauses between prompt and answer of procedural samples (finetuning)
    pause_variant: Literal["pause", "filler"] = "pause"  # filler: "." instead of <pause>, and a target (Pfau et al.)

    def validate(self, cfg) -> None:
        s = cfg.model.seq_length
        require(0 <= self.pause_fraction < 1, "objective.pause_fraction", self.pause_fraction,
                 "use a share 0 <= f < 1 of each sequence")
        require(round(self.pause_fraction * s) < s - 1, "objective.pause_fraction", self.pause_fraction,
                 f"leave at least 2 real tokens per sequence of model.seq_length={s}")
        require(self.pause_count >= 0, "objective.pause_count", self.pause_count, "use 0 or more pauses")
        require(self.pause_fraction > 0 or self.pause_count > 0, "objective.pause_fraction", self.pause_fraction,
                 "objective.kind=pause inserts no pause; set pause_fraction > 0 (pretraining) or pause_count > 0")


def pause_token(cfg, tokenizer) -> tuple[int, bool]:
    """(token id, supervised) of the inserted token: `<pause>` (never a target) or the filler "." (a target)."""
    from recurdepth.data.tokenizer import require_special_tokens

    if cfg.objective.pause_variant == "filler":
        ids = tokenizer.tokenize(".")
        if len(ids) != 1:
            raise DataError(f"objective.pause_variant=filler needs \".\" to be one token, but the tokenizer encodes it "
                            f"as {ids}; use objective.pause_variant=pause")
        return ids[0], True
    return require_special_tokens(tokenizer, ("<pause>",), "objective.kind=pause")["<pause>"], False


def pauses_per_sequence(cfg) -> int:
    """n = round(pause_fraction * seq_length) pauses in each pretraining sequence."""
    return int(round(cfg.objective.pause_fraction * cfg.model.seq_length))


class PauseObjective(Objective):
    """Next-token cross-entropy where the loss mask is 1 and the label is not a pause."""

    kind = "pause"
    Section = PauseSection

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.token, self.supervised = pause_token(cfg, tokenizer)  # DataError naming a missing <pause>

    # ------------------------------------------------------------------ data

    @classmethod
    def reserved_positions(cls, cfg) -> int:
        return pauses_per_sequence(cfg)

    @classmethod
    def procedural_options(cls, cfg, tokenizer) -> dict:
        """M pauses (or supervised fillers) between the prompt and the answer of every procedural sample."""
        o = cfg.objective
        if not o.pause_count:
            return {}
        token, supervised = pause_token(cfg, tokenizer)
        return {"filler": (token,) * o.pause_count, "filler_target": supervised}

    @classmethod
    def transform_dataset(cls, cfg, tokenizer, dataset, split: str):
        n = pauses_per_sequence(cfg)
        if not n or dataset is None:
            return dataset
        from recurdepth.data.pauses import PauseInserted

        token, supervised = pause_token(cfg, tokenizer)
        return PauseInserted(dataset, token, n, cfg.train.seed, supervised)

    # ------------------------------------------------------------------ loss

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
