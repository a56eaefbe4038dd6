"""Tokens inserted into the data at random positions: the data side of the pause objective (Goyal et al. 2023,
arXiv 2310.02226; filler tokens: Pfau et al. 2024), which decides the token and how many (objectives/pause.py).

Pretraining (pause fraction f): every training sequence of s tokens holds n = round(f s) pause
tokens at random positions and s - n real tokens. megatron's GPTDataset packs windows of s - n + 1 real
tokens (so no text is lost or repeated) and `PauseInserted` spreads n pauses over the s + 1 positions, drawn
from (seed, global sample index): the same sequence under every data-parallel layout and after a resume.
A label that is a pause carries no loss (the model is never asked to predict a pause); with the `filler`
variant the inserted token is an ordinary "." and is a target (supervised filler: the model learns to emit it).

Finetuning (M pauses per sample): procedural samples are written as prompt, M pauses, answer, with the
loss on the answer only (`encode_with_mask(..., filler=...)`, procedural_corpus.py).
"""

from __future__ import annotations

import torch

from recurdepth.seeding import derive_seed

_PAUSE_STREAM = 0xA05E


def insert_pauses(tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, positions: torch.Tensor,
                  token: int, supervised: bool) -> dict:
    """A sample of L tokens (`tokens`, `labels` = tokens shifted by one, `loss_mask` per label) with pauses at
    `positions` of the L + n + 1 long sequence; returns the new `tokens`, `labels`, `loss_mask` of L + n.
    The first real token was no target before and stays none; a pause target has loss only if `supervised`."""
    full = torch.cat([tokens, labels[-1:]])
    target = torch.cat([torch.zeros(1, dtype=loss_mask.dtype), loss_mask])
    total = full.numel() + positions.numel()
    is_pause = torch.zeros(total, dtype=torch.bool)
    is_pause[positions] = True
    seq = torch.full((total,), token, dtype=full.dtype)
    seq[~is_pause] = full
    mask = torch.full((total,), float(supervised), dtype=loss_mask.dtype)
    mask[~is_pause] = target
    return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": mask[1:]}


class PauseInserted(torch.utils.data.Dataset):
    """`dataset` (samples of s - n tokens) with n pauses inserted into sample i at positions drawn from
    (seed, i); samples are then s tokens long."""

    def __init__(self, dataset, token: int, count: int, seed: int, supervised: bool = False):
        self.dataset, self.token, self.count, self.seed, self.supervised = dataset, token, count, seed, supervised

    def __len__(self) -> int:
        return len(self.dataset)

    def positions(self, i: int, length: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, _PAUSE_STREAM, i))
        return torch.randperm(length + self.count, generator=g)[:self.count].sort().values

    def __getitem__(self, i: int) -> dict:
        sample = self.dataset[i]
        length = sample["tokens"].numel() + 1
        return insert_pauses(sample["tokens"], sample["labels"], sample["loss_mask"], self.positions(i, length),
                             self.token, self.supervised)
