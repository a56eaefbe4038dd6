"""How many core iterations a step runs, and through how many of them gradients flow.

`DepthSampler.sample(step)` draws r for an optimizer step from a generator seeded by (seed, step) only,
so every rank draws the same r without communication and a resumed run draws the same sequence.
`BackpropWindow(r, k)` is the truncated-backprop split: the first max(r-k, 0) iterations run without
grad, the last min(r, k) with grad (Huginn, arXiv 2502.05171, sec. 3.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from recurdepth.config import Config, RecurrenceConfig

_STREAM = 0x5EED_DE9  # separates the depth stream from any other stream derived from the same seed


@dataclass(frozen=True)
class BackpropWindow:
    """r iterations in total, gradients through the last `with_grad` of them."""

    total: int
    with_grad: int

    @classmethod
    def of(cls, r: int, k: int) -> "BackpropWindow":
        return cls(total=r, with_grad=min(r, k))

    @property
    def no_grad(self) -> int:
        return self.total - self.with_grad

    def iterations(self) -> Iterator["Iteration"]:
        """The loop, in order: iteration j = 1..r, with gradients only through the last `with_grad`. Every loop
        over the core (the model's forward, the pipeline schedule's chunks, the pipelined objectives' passes,
        the decoder) walks this, so the truncation rule is stated once."""
        for j in range(1, self.total + 1):
            yield self.iteration(j)

    def iteration(self, j: int) -> "Iteration":
        """Iteration j (1-based) of this window."""
        return Iteration(j, j > self.no_grad, j == self.no_grad + 1, j == self.total)

    def grad_at(self, j: int) -> bool:
        """Whether iteration j (1-based) carries gradients."""
        return j > self.no_grad


class Iteration(NamedTuple):
    """One trip through the core: its 1-based `index`, whether it carries gradients, whether it is the
    truncation point (the first grad iteration: nothing flows into its input state) and whether it is the last."""

    index: int
    grad: bool
    first_grad: bool
    last: bool


class DepthSampler:
    """Samples the recurrence r per optimizer step; see `RecurrenceConfig.sampler`.

    lognormal_poisson(mean, sigma): tau ~ N(log(mean) - sigma^2/2, sigma), r = Poisson(e^tau) + 1
      (Huginn's sampler: E[e^tau] = mean). curriculum: the same with the mean ramped from
      `curriculum_start` to `mean` over `curriculum_steps` (linear or sqrt). fixed: `depth`.
      uniform: integers in [low, high].
    """

    def __init__(self, cfg: RecurrenceConfig, seed: int):
        self.cfg = cfg
        self.seed = seed

    def mean_at(self, step: int) -> float:
        c = self.cfg
        if c.sampler != "curriculum" or c.curriculum_steps <= 0 or step >= c.curriculum_steps:
            return c.mean
        frac = step / c.curriculum_steps
        if c.curriculum_shape == "sqrt":
            frac = math.sqrt(frac)
        return c.curriculum_start + (c.mean - c.curriculum_start) * frac

    def sample(self, step: int) -> int:
        c = self.cfg
        if c.sampler == "fixed":
            r = c.depth
        else:
            rng = np.random.default_rng([self.seed, step, _STREAM])
            if c.sampler == "uniform":
                r = int(rng.integers(c.low, c.high + 1))
            else:
                mean = self.mean_at(step)
                tau = rng.normal(math.log(mean) - 0.5 * c.sigma**2, c.sigma)
                r = int(rng.poisson(math.exp(tau))) + 1
        if c.max_depth is not None:
            r = min(r, c.max_depth)
        return r

    def window(self, step: int) -> BackpropWindow:
        return BackpropWindow.of(self.sample(step), self.cfg.backprop_depth)

    def eval_depth(self) -> int:
        return eval_depth(self.cfg)


def mean_depth(cfg: RecurrenceConfig) -> float:
    """The r a step runs on average, for FLOPs, memory and init: the configured mean (lognormal_poisson,
    curriculum: its final mean), `depth` (fixed) or (low + high) / 2 (uniform), capped by `max_depth` as the
    sampler caps every draw. The one definition: plan, init, FLOPs and reports import it."""
    value = cfg.depth if cfg.sampler == "fixed" else (cfg.low + cfg.high) / 2 if cfg.sampler == "uniform" else cfg.mean
    return min(value, cfg.max_depth) if cfg.max_depth is not None else value


def max_depth(cfg: RecurrenceConfig) -> float:
    """The largest r the sampler can draw (inf when unbounded)."""
    top = {"fixed": cfg.depth, "uniform": cfg.high}.get(cfg.sampler, math.inf)
    return min(top, cfg.max_depth) if cfg.max_depth is not None else top


def eval_depth(cfg: RecurrenceConfig) -> int:
    """r for validation and the exported model's default: `eval_depth`, else `depth` (fixed), else the rounded
    mean depth (at least 1)."""
    if cfg.eval_depth:
        return int(cfg.eval_depth)
    return int(cfg.depth) if cfg.sampler == "fixed" else max(1, round(mean_depth(cfg)))


def dense_layers(cfg: Config) -> int:
    """model.kind=dense: its layer count (model.num_layers, or the looped model's token depth P + r R + C at the
    mean r, rounded)."""
    m = cfg.model
    return m.num_layers or m.prelude_layers + round(mean_depth(cfg.recurrence)) * m.core_layers + m.coda_layers



def segment_windows(r: int, segments: int, k: int) -> list[BackpropWindow]:
    """Deep supervision's segments of a step's r iterations: min(segments, r) runs of r // n iterations, the
    first r % n one longer, each with gradients through its last min(length, k) (its own truncated window)."""
    n = max(1, min(segments, r))
    base, extra = divmod(r, n)
    return [BackpropWindow.of(base + (1 if i < extra else 0), k) for i in range(n)]
