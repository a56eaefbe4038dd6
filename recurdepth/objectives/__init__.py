"""Objectives: what one micro-batch's loss is. The trainer knows nothing else about them.

An objective turns a micro-batch (tokens, labels, loss mask, sample ids) into the *sum* of its token losses
and says how many tokens that sum counts; the trainer divides by the global count after the data-parallel
reduction, so every layout gives the same update. `lm` is the plain next-token loss; the thought-token
objectives (`pause`, `quiet_star`, `coconut`) are registered in `OBJECTIVES` (docs/objectives.md).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from recurdepth.model.depth import BackpropWindow


class Objective(Protocol):
    kind: str

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False) -> torch.Tensor:
        """Summed loss of one micro-batch (a scalar with its graph) through `model` (whole, one stage)."""

    def loss_tokens(self, mb) -> torch.Tensor:
        """How many tokens `loss_sum` of this micro-batch counts (the normaliser's share)."""

    def pipeline_loss(self, per_token: torch.Tensor, mb) -> torch.Tensor:
        """Under the looped pipeline schedule: the summed loss from the head's per-token loss `[b, s]`."""


class LMObjective:
    """Next-token cross-entropy where the loss mask is 1 (answer-only masks, eod rules)."""

    kind = "lm"

    def __init__(self, cfg=None, tokenizer=None):
        self.cfg, self.tokenizer = cfg, tokenizer

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False) -> torch.Tensor:
        per_token = model(mb.tokens, labels=mb.labels, window=window, sample_ids=mb.sample_ids,
                          collect_health=collect_health)
        return masked_loss_sum(per_token, mb.loss_mask)

    def loss_tokens(self, mb) -> torch.Tensor:
        return mb.loss_mask.sum()

    def pipeline_loss(self, per_token: torch.Tensor, mb) -> torch.Tensor:
        return masked_loss_sum(per_token, mb.loss_mask)


def masked_loss_sum(per_token: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the per-token losses `[b, s]` where `loss_mask` is 1."""
    return (per_token.float() * loss_mask).sum()


OBJECTIVES: dict[str, Callable] = {"lm": LMObjective}


def _quiet_star(cfg, tokenizer):  # imported on use: quiet_star imports this module
    from recurdepth.objectives.quiet_star import QuietStarObjective

    return QuietStarObjective(cfg, tokenizer)


OBJECTIVES["quiet_star"] = _quiet_star


def _pause(cfg, tokenizer):  # imported on use: pause and coconut import this module
    from recurdepth.objectives.pause import PauseObjective

    return PauseObjective(cfg, tokenizer)


def _coconut(cfg, tokenizer):
    from recurdepth.objectives.coconut import CoconutObjective

    return CoconutObjective(cfg, tokenizer)


OBJECTIVES["pause"] = _pause
OBJECTIVES["coconut"] = _coconut


def build_objective(cfg, tokenizer) -> Objective:
    """The objective named by `objective.kind`, built for this config and tokenizer."""
    from recurdepth.errors import ConfigError

    kind = cfg.objective.kind
    if kind not in OBJECTIVES:
        raise ConfigError(f"objective.kind={kind!r} is not implemented yet; available: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[kind](cfg, tokenizer)
