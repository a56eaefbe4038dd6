"""Step-by-step problems for continuous-thought curricula (Coconut, arXiv 2412.06769): one problem per sample,
never packed, each encoded for a curriculum stage.

A problem is (question, steps, answer) token lists from a verified procedural sample (`Sample.steps`: column
sums with carries for addition, partial products for multiplication, the state after each line for
program_trace, ...). At stage k (c thoughts per step, at most `max_stage` latent stages):

    question <bot> <latent> x min(k, max_stage)*c <eot> steps[k:] answer <eod> <pad>...
                                                       `--- loss ---------------'
k > max_stage drops every language step (the reference's last stage). Every sample of a stage has the same
number of latents, padded to k*c whatever its own number of steps (the reference's `pad_latent_to_max`), so
a stage-k batch always needs k*c + 1 passes, on every rank. Stage 0 is plain chain-of-thought.

`StepwiseProblems` is the dataset: sample i of the run is drawn, deterministically from (seed, i), from the
procedural sources of `data.sources` with their weights, so data-parallel halves and resumed runs see the
same problems as one uninterrupted process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from recurdepth.data.procedural.splits import generate_split
from recurdepth.errors import DataError

THOUGHT_SPECIALS = ("<bot>", "<eot>", "<latent>")


@dataclass(frozen=True)
class Problem:
    """One problem as token ids: question (ends with the prompt's "Answer:"), steps, answer (ends with eod)."""

    question: tuple
    steps: tuple  # of tuples
    answer: tuple


@dataclass(frozen=True)
class StageLayout:
    """The stage-k sequence layout: `latents` = k' c latent tokens (k' = min(k, max_stage)) and how many
    language steps are replaced (all of them beyond max_stage)."""

    stage: int
    latents: int
    skipped_steps: int  # a large number = all

    @classmethod
    def of(cls, stage: int, thoughts_per_step: int, max_stage: int) -> "StageLayout":
        k = min(stage, max_stage)
        return cls(stage, k * thoughts_per_step, stage if stage <= max_stage else 1 << 30)


def encode_problem(problem: Problem, layout: StageLayout, ids: dict, seq_length: int, pad: int):
    """Token ids `[s]`, labels `[s]`, loss mask `[s]` (1 on the targets after <eot>) and the position of the
    first latent (the <bot> index + 1) of `problem` at `layout`, padded to `seq_length`."""
    head = [*problem.question, ids["<bot>"], *[ids["<latent>"]] * layout.latents, ids["<eot>"]]
    tail = [t for step in problem.steps[layout.skipped_steps:] for t in step] + list(problem.answer)
    seq = head + tail
    if len(seq) > seq_length + 1:
        raise DataError(f"a stage-{layout.stage} problem takes {len(seq)} tokens but model.seq_length="
                        f"{seq_length}; raise model.seq_length or lower the task difficulty")
    seq = seq + [pad] * (seq_length + 1 - len(seq))
    target = [0] * len(head) + [1] * len(tail) + [0] * (seq_length + 1 - len(head) - len(tail))
    return (torch.tensor(seq[:-1]), torch.tensor(seq[1:]), torch.tensor(target[1:], dtype=torch.float32),
            len(problem.question) + 1)


def tokenize_problem(sample, tokenizer) -> Problem:
    """A procedural `Sample` as token ids: question `prompt + " "`, each step `step + "; "`, answer + eod."""
    return Problem(tuple(tokenizer.tokenize(sample.prompt + " ")),
                   tuple(tuple(tokenizer.tokenize(step + "; ")) for step in sample.steps),
                   tuple(tokenizer.tokenize(sample.answer)) + (tokenizer.eod,))


class StepwiseProblems(torch.utils.data.Dataset):
    """`size` samples drawn from the procedural sources (task, n, difficulty, seed, weight) of `data.sources`;
    `split` "train" or "test" (hash-disjoint from train). Item i: the stage-0 encoding (`tokens`, `labels`,
    `loss_mask`, so the plain LM objective trains chain-of-thought on it) and the `problem` itself."""

    def __init__(self, sources: list, tokenizer, size: int, seq_length: int, seed: int, split: str = "train",
                 purpose: str = "step-by-step data"):
        """`purpose` names who needs these problems in error lines (e.g. "objective.kind=coconut")."""
        from recurdepth.data.tokenizer import require_special_tokens

        self.ids = require_special_tokens(tokenizer, THOUGHT_SPECIALS, purpose)
        self.tokenizer, self.seq_length, self.pad = tokenizer, seq_length, tokenizer.pad
        pools, self.source, self.index = procedural_pools(sources, size, seed, split, purpose,
                                                          "tasks with steps: addition, multiplication, "
                                                          "program_trace, modular, ...")
        self.pools = [[tokenize_problem(s, tokenizer) for s in pool] for pool in pools]

    def __len__(self) -> int:
        return len(self.source)

    def problem(self, i: int) -> Problem:
        return self.pools[int(self.source[i])][int(self.index[i])]

    def __getitem__(self, i: int) -> dict:
        problem = self.problem(i)
        tokens, labels, mask, _ = encode_problem(problem, StageLayout.of(0, 1, 0), self.ids, self.seq_length, self.pad)
        return {"tokens": tokens, "labels": labels, "loss_mask": mask, "problem": problem}

    def longest(self, layouts) -> int:
        """The most tokens any problem takes over the given layouts (checked against seq_length up front)."""
        most = 0
        for pool in self.pools:
            for p in pool:
                for lay in layouts:
                    n = len(p.question) + 2 + lay.latents + sum(len(s) for s in p.steps[lay.skipped_steps:])
                    most = max(most, n + len(p.answer))
        return most


def procedural_pools(sources: list, size: int, seed: int, split: str, purpose: str, which: str) -> tuple:
    """The procedural `Sample`s of `data.sources` (one pool per source: its n training samples, or for
    split="test" min(n, size) held-out ones) and, for each of the run's `size` samples, its source and its index in
    that source's pool: drawn from (seed, split) with the sources' weights, each pool in shuffled epochs (data
    parallel halves and resumed runs see the same samples). Sources other than procedural ones -> DataError
    naming `purpose` and `which` tasks suit it."""
    procedural = [s for s in sources if "procedural" in s and float(s.get("weight", 1.0)) > 0]
    if not procedural or len(procedural) != len([s for s in sources if float(s.get("weight", 1.0)) > 0]):
        raise DataError(f"{purpose} trains on one procedural problem per sample: give data.sources as procedural "
                        f"tasks only, e.g. [{{procedural: addition, n: 5000}}] ({which})")
    pools = []
    for src in procedural:
        n = int(src.get("n", 10000))
        count = n if split == "train" else max(1, min(n, size))
        pools.append(generate_split(src["procedural"], count, split, src.get("difficulty"),
                                    int(src.get("seed", 0)), train_n=n if split == "test" else None))
    weights = np.array([float(s.get("weight", 1.0)) for s in procedural])
    rng = np.random.default_rng([seed, 0xC0C0, split == "test"])
    source = rng.choice(len(pools), size=size, p=weights / weights.sum())
    index = np.empty(size, dtype=np.int64)
    for k, pool in enumerate(pools):
        where = np.flatnonzero(source == k)
        epochs = -(-len(where) // len(pool)) if len(where) else 0
        order = np.concatenate([rng.permutation(len(pool)) for _ in range(epochs)]) if epochs else []
        index[where] = order[:len(where)]
    return pools, source, index


def check_fits(dataset: StepwiseProblems, layouts, seq_length: int) -> None:
    """DataError (one line) when some problem does not fit `seq_length` at some stage."""
    most = dataset.longest(layouts)
    if most > seq_length + 1:
        raise DataError(f"the longest step-by-step problem takes {most} tokens at some curriculum stage but "
                        f"model.seq_length={seq_length}; raise model.seq_length to {most - 1} or lower the difficulty")


def stage_layouts(thoughts_per_step: int, max_stage: int) -> list:
    """Every distinct layout of the curriculum: stages 0..max_stage and the all-latent stage max_stage + 1."""
    return [StageLayout.of(k, thoughts_per_step, max_stage) for k in range(max_stage + 2)]


def optional_problems(samples: list) -> Optional[list]:
    """The `problem` of each sample dict, or None when the dataset has none (packed text)."""
    if samples and "problem" in samples[0]:
        return [s["problem"] for s in samples]
    return None
