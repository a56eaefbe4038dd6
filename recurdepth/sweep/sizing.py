"""A run sized to a compute budget: how many optimizer steps spend it, and what the model is (parameters).

Model FLOPs of step t are the trainer's own count (`train/flops.py`): tokens per step (global batch x sequence
length) x `looped_flops(cfg, V).per_token(r_t, k)`, with r_t drawn by the run's `DepthSampler` (seeded by
(train.seed, t), so the sweep knows every step's r before the run starts). The run gets the fewest steps whose
FLOPs reach the budget: FLOPs(steps - 1) < budget <= FLOPs(steps), so it lands within one step of it. Hardware
FLOPs add the recomputed core forwards of `recurrence.checkpoint_iterations`. A budget below one step's FLOPs
is refused.

Parameters (from `plan/shape.py`, no model built): `params_rec` are the core's blocks and the adapter, run r
times; `params_once` everything else (embeddings, prelude, coda, final norm, an untied head); effective
parameters count the core mean-r times: params_once + mean_r params_rec. model.kind=dense has no core: all of
its blocks are run once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recurdepth.config import Config
from recurdepth.errors import ConfigError

MAX_STEPS = 10_000_000  # a budget this many steps away is a typo (FLOPs for tokens, a missing exponent)


@dataclass(frozen=True)
class Sizing:
    """What a run costs and is: `steps` optimizer steps of `tokens` tokens in all, their model and hardware
    FLOPs, and the model's parameters (see the module docstring)."""

    steps: int
    tokens: int
    model_flops: float
    hardware_flops: float
    first_step_flops: float
    unique_params: int
    params_once: int
    params_rec: int
    depth: float  # mean r (1 for dense)
    backprop_depth: int

    @property
    def effective_params(self) -> float:
        return self.params_once + self.depth * self.params_rec


def is_dense(cfg: Config) -> bool:
    return getattr(cfg.model, "kind", "looped") == "dense"


def size_run(cfg: Config, vocab_size: int, budget: float, what: str) -> Sizing:
    """The steps that spend `budget` model FLOPs with this config (see the module docstring); `what` names the
    run in the refusal of a budget below one optimizer step."""
    from recurdepth.model.depth import DepthSampler, mean_depth
    from recurdepth.train.flops import looped_flops

    flops, r_cfg, t = looped_flops(cfg, vocab_size), cfg.recurrence, cfg.train
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    k, recompute = r_cfg.backprop_depth, r_cfg.checkpoint_iterations
    sampler = DepthSampler(r_cfg, t.seed)
    model = lambda r: tokens_per_step * flops.per_token(r, k)  # noqa: E731
    hardware = lambda r: tokens_per_step * flops.per_token(r, k, recompute)  # noqa: E731
    first = model(sampler.sample(0))
    if budget < first:
        raise ConfigError(f"{what}: budget {budget:.3g} FLOPs is below one optimizer step ({first:.3g} FLOPs = "
                          f"{t.global_batch_size} x {cfg.model.seq_length} tokens x {first / tokens_per_step:.3g} "
                          f"FLOPs/token); raise the budget to >= {first:.3g} or shrink the model or train.global_batch_size")
    if is_dense(cfg) or r_cfg.sampler == "fixed":  # every step costs the same
        steps = math.ceil(budget / first)
        _check_steps(steps, what, budget)
        spent, hw = steps * first, steps * hardware(sampler.sample(0))
    else:
        steps, spent, hw = 0, 0.0, 0.0
        while spent < budget:
            r = sampler.sample(steps)
            spent, hw, steps = spent + model(r), hw + hardware(r), steps + 1
            _check_steps(steps, what, budget)
    once, rec = model_params(cfg, vocab_size)
    depth = 1.0 if is_dense(cfg) else float(mean_depth(r_cfg))
    return Sizing(steps=steps, tokens=steps * tokens_per_step, model_flops=spent, hardware_flops=hw,
                  first_step_flops=first, unique_params=once + rec, params_once=once, params_rec=rec, depth=depth,
                  backprop_depth=1 if is_dense(cfg) else k)


def _check_steps(steps: int, what: str, budget: float) -> None:
    if steps > MAX_STEPS:
        raise ConfigError(f"{what}: budget {budget:.3g} FLOPs takes more than {MAX_STEPS:,} optimizer steps; check "
                          f"its exponent, or grow train.global_batch_size")


def model_params(cfg: Config, vocab_size: int) -> tuple[int, int]:
    """(params_once, params_rec) of the model, unsharded, tied embeddings counted once."""
    from recurdepth.model.depth import dense_layers
    from recurdepth.plan.shape import dims, is_moe, layer_params, total_params

    m, h = cfg.model, cfg.model.hidden_size
    if is_dense(cfg):
        block = sum(layer_params(cfg, 1, 1, False))
        head = 0 if m.tie_embeddings else vocab_size * h
        return vocab_size * h + dense_layers(cfg) * block + dims(cfg)["norm"] * h + head, 0
    rec = m.core_layers * sum(layer_params(cfg, 1, 1, is_moe(cfg, "core")))
    rec += 2 * h * h if m.adapter in ("concat", "gate") else 0
    return total_params(cfg, vocab_size) - rec, rec
