"""What a training step asks of an engine: the few verbs `recurdepth.train.step.optimizer_step` calls.

One optimizer step, as the step function drives it (engine verbs in brackets):

    tokens = this rank's loss-token count (a tensor)
    [prepare(tokens)]                       zero the gradients; an engine that needs the global count before
                                            its backward passes reduces `tokens` here, in place
    for each micro-batch: loss = objective.loss_sum(engine.model, ...)
                          [backward(loss, last)]   with whatever scale the engine needs
    [reduce_gradients(tokens)]              data-parallel reduction, gradients scaled by 1 / global tokens;
                                            afterwards `tokens` holds the global count (in place)
    loss reduced over DP and PP; verdict = guard.verdict(loss, [grads_finite()])
    [step(verdict)] -> (grad norm, verdict) the update, or none when the verdict is bad; the engine may find
                                            the step bad itself (DeepSpeed's overflow check)

Under pipeline parallelism the pipeline schedule (or a multi-pass objective) runs the backward passes
through autograd itself: an engine that allows PP must take plain `loss.backward()` as its backward
(megatron's DDP does). Checkpoints ask the engine for its `name` (recorded in the manifest), `save_state`
and `load_state` (`recurdepth.train.checkpoint`); the run directory gets its `run_files()`.

Adding an engine: subclass `Engine` in `recurdepth/train/engine/<name>.py`, implement the verbs, add it to
`ENGINES` in `recurdepth/train/engine/__init__.py` (and the name to `train.engine`'s choices in config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch


class Engine:
    """The wrapped model, its optimizer and LR schedule, and the verbs above. Subclasses set `name` and build
    `model`, `optimizer` and `scheduler` in `__init__(cfg, model, dtype, dp_size, local_rank)`."""

    name: str = ""

    model: torch.nn.Module  # the wrapped model: objectives call it, `.train()` / `.eval()` switch it
    device: torch.device
    optimizer: object
    scheduler: object  # megatron's OptimizerParamScheduler over `optimizer` (recurdepth.train.optimizer)

    @classmethod
    def model_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        """The dtype to build the model's parameters in, for a run computing in `dtype`."""
        return dtype

    @property
    def module(self) -> torch.nn.Module:
        """The bare model (our LoopedGPTModel, or this stage of it) under the engine's wrapper."""
        return self.model.module

    def label(self) -> str:
        """A few words for the run summary, e.g. "megatron distributed optimizer"."""
        return self.name

    def run_files(self) -> dict[str, str]:
        """{file name: text} the engine writes into the run directory at start (its resolved config)."""
        return {}

    def weights_loaded(self) -> None:
        """The model's weights were replaced in place (`checkpoint.init_from`): bring the optimizer's own copies
        of them (main parameters) up to date."""
        from recurdepth.errors import ConfigError

        raise ConfigError(f"checkpoint.init_from is not supported with train.engine={self.name} yet; "
                          f"use train.engine=megatron")

    # ------------------------------------------------------------------ the step

    def prepare(self, tokens: torch.Tensor) -> None:
        """A step begins: zero the gradients. `tokens`: this rank's loss-token count."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's summed loss (`last`: the step's last micro-batch)."""
        raise NotImplementedError

    def reduce_gradients(self, tokens: torch.Tensor) -> None:
        """After every backward: reduce gradients over data-parallel ranks, scaled by 1 / the global token count;
        `tokens` is left holding the global count."""
        raise NotImplementedError

    def grads_finite(self) -> bool:
        """Whether every gradient is finite on every rank (agreed), as far as the engine can tell before `step`."""
        return True

    def step(self, bad: Optional[str]) -> tuple[float, Optional[str]]:
        """The optimizer step, skipped when `bad` (the guard's agreed verdict) is set. Returns (gradient norm,
        NaN when skipped; the verdict, possibly one the engine found itself)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ checkpoints

    def save_state(self, tmp: Path, common: dict) -> None:
        """Write model, optimizer and `common` (scheduler, train state, config: plain objects) into the
        checkpoint directory `tmp` (collective)."""
        raise NotImplementedError

    def load_state(self, path: Path, meta: dict) -> dict:
        """Read model and optimizer from checkpoint `path` (its manifest `meta`); returns the common state."""
        raise NotImplementedError
