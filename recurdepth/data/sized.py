"""Procedural problems one per sample, each with its size: the data of per-sample depth (objective.kind=
depth_by_size), where a sample's r follows from how big its problem is.

Sample i of the run is drawn, deterministically from (seed, i), from the procedural sources of `data.sources`
with their weights (`stepwise.procedural_pools`, as the continuous-thought data is), and encoded as the
evaluation decodes it:

    <eod> prompt " " answer <eod> <pad> ...        loss on answer and the final eod (answer-only)

never packed, so the whole sequence is one problem of one size (`Task.size(prompt)`: bits, digits, hops, ...).
"""

from __future__ import annotations

import torch

from recurdepth.data.procedural import get_task
from recurdepth.data.procedural.base import encode_with_mask
from recurdepth.data.stepwise import procedural_pools
from recurdepth.errors import DataError

SIZED_TASKS = "tasks with a size: parity, hops, root, addition, multiplication, copy, reverse"


def sample_size(sample, purpose: str) -> int:
    """`Task.size` of a procedural sample; a task without one -> DataError naming `purpose` and the tasks that
    have one."""
    n = get_task(sample.task).size(sample.prompt)
    if n is None:
        raise DataError(f"{purpose} needs each problem's size, and task {sample.task!r} has none; use {SIZED_TASKS}")
    return n


class SizedProblems(torch.utils.data.Dataset):
    """`size` samples of the procedural `sources`, split "train" or "test" (disjoint from train). Item i:
    `tokens`, `labels`, `loss_mask` `[seq_length]` and `size` (the problem's, an int)."""

    def __init__(self, sources: list, tokenizer, size: int, seq_length: int, seed: int, split: str = "train",
                 purpose: str = "per-sample depth"):
        pools, self.source, self.index = procedural_pools(sources, size, seed, split, purpose, SIZED_TASKS)
        self.seq_length, self.pad, self.eod = seq_length, tokenizer.pad, tokenizer.eod
        self.pools = []
        for pool in pools:
            encoded = []
            for sample in pool:
                n = sample_size(sample, purpose)
                ids, mask = encode_with_mask(sample, tokenizer)
                if len(ids) > seq_length:  # with the leading eod, len(ids) + 1 tokens give len(ids) targets
                    raise DataError(f"a {sample.task} problem of size {n} takes {len(ids) + 1} tokens but "
                                    f"model.seq_length={seq_length}; raise model.seq_length to {len(ids)} or lower "
                                    "the task difficulty")
                encoded.append(([tokenizer.eod, *ids], [0, *mask], n))
            self.pools.append(encoded)

    def __len__(self) -> int:
        return len(self.source)

    def sizes(self, ids) -> list[int]:
        """The problem sizes of samples `ids` (indices wrap around the dataset, as the micro-batches' do)."""
        return [self.pools[int(self.source[i % len(self)])][int(self.index[i % len(self)])][2] for i in ids]

    def __getitem__(self, i: int) -> dict:
        seq, target, n = self.pools[int(self.source[i])][int(self.index[i])]
        pad = self.seq_length + 1 - len(seq)
        seq, target = seq + [self.pad] * pad, target + [0] * pad
        return {"tokens": torch.tensor(seq[:-1]), "labels": torch.tensor(seq[1:]),
                "loss_mask": torch.tensor(target[1:], dtype=torch.float32), "size": n}
