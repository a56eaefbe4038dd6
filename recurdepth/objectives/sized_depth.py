"""Per-sample depth: each problem runs as many core iterations as its size asks for (Fan et al. 2024, "Looped
Transformers for Length Generalization", arXiv 2409.15647: train with r tied to the problem size, test larger
problems with r scaled the same way).

    r_b = clamp(round(depth_scale * size_b + depth_offset), 1, recurrence.max_depth)
    s_i[b] = core(adapter(s_{i-1}[b], e[b]))   for i <= r_b,   s_i[b] = s_{i-1}[b] after   (finished rows keep
                                                                                            their state)
    loss = the answer-only next-token loss of head(coda(s_{r_b}[b])), summed over the batch

size_b is the problem's own (`Task.size`: bits of a parity string, hops, digits, list length). Each row has its
own truncated window: gradients through its last min(r_b, recurrence.backprop_depth) iterations. A batch runs
max_b r_b iterations; at each, the rows still going run the core gathered along the batch (whole sequences), so
a finished row costs nothing (`LoopedGPTModel.recur_rows`). The data is one problem per sequence, never packed
(data/sized.py). The step's progress line shows the largest r of the global batch, `depth/mean` its mean, and
the FLOPs are counted per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from recurdepth.config import require
from recurdepth.model.depth import BackpropWindow
from recurdepth.objectives.base import Objective, ObjectiveSection
from recurdepth.objectives.lm import masked_loss_sum


@dataclass
class DepthBySizeSection(ObjectiveSection):
    kind: str = "depth_by_size"
    depth_scale: float = 1.0  # r = round(depth_scale * size + depth_offset), at least 1
    depth_offset: int = 0

    def validate(self, cfg) -> None:
        require(isinstance(self.depth_scale, (int, float)) and self.depth_scale >= 0, "objective.depth_scale",
                self.depth_scale, "use a number >= 0 (iterations per unit of problem size; 0: every sample at "
                "depth_offset, the fixed-r control on the same data)")
        require(isinstance(self.depth_offset, int), "objective.depth_offset", self.depth_offset, "use an integer")
        require(cfg.recurrence.sampler == "fixed", "recurrence.sampler", cfg.recurrence.sampler,
                "objective.kind=depth_by_size takes each sample's r from its size, so no sampler draws it: use "
                "recurrence.sampler=fixed (its depth is the decoder's default r)")
        require(cfg.parallel.pipeline == 1, "parallel.pipeline", cfg.parallel.pipeline,
                "objective.kind=depth_by_size does not run under pipeline parallelism yet (the looped schedule "
                "runs one r per micro-batch); use data or tensor parallelism")


class DepthBySizeObjective(Objective):
    kind = "depth_by_size"
    Section = DepthBySizeSection

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        o = cfg.objective
        self.scale, self.offset, self.cap = float(o.depth_scale), int(o.depth_offset), cfg.recurrence.max_depth

    @classmethod
    def datasets(cls, cfg, tokenizer, train_samples: int, valid_samples: int) -> tuple:
        """One procedural problem per sample with its size (data/sized.py)."""
        from recurdepth.data.sized import SizedProblems

        return tuple(SizedProblems(cfg.data.sources, tokenizer, max(n, 1), cfg.model.seq_length, cfg.train.seed,
                                   split, purpose="objective.kind=depth_by_size")
                     for n, split in ((train_samples, "train"), (valid_samples, "test")))

    def depth(self, size: int) -> int:
        """r of a problem of `size`."""
        r = max(1, round(self.scale * size + self.offset))
        return min(r, self.cap) if self.cap is not None else r

    def loss_sum(self, model, mb, window: BackpropWindow, collect_health: bool = False):
        if mb.sizes is None:
            from recurdepth.errors import DataError

            raise DataError("objective.kind=depth_by_size needs each sample's problem size, but this micro-batch has "
                            "none; its data is built from procedural data.sources by the objective")
        depths = [self.depth(n) for n in mb.sizes]
        k = self.cfg.recurrence.backprop_depth if window.with_grad else 0
        per_token = model(mb.tokens, labels=mb.labels, window=BackpropWindow(max(depths), k),
                          sample_ids=mb.sample_ids, collect_health=collect_health, row_depths=depths)
        return masked_loss_sum(per_token, mb.loss_mask)

    def sample_depths(self, dataset, sample_ids) -> Optional[list]:
        return [self.depth(n) for n in dataset.sizes(sample_ids)]
