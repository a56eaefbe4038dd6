"""Faults injected on purpose, so the numerical guard is tested on what it guards against (docs/operations.md).

Each hook fires once per process at a 1-based optimizer step (a rolled-back run reaching that step again must
see a good step):
    RECURDEPTH_INJECT_NAN_AT_STEP=N         the step's loss becomes NaN (after backward: gradients stay finite)
    RECURDEPTH_INJECT_NAN_GRAD_AT_STEP=N    one element of the embedding's gradient becomes NaN on global rank 0
                                            during backward (the loss stays finite): the gradient check must see it
    RECURDEPTH_INJECT_SPIKE_AT_STEP=N[:F]   the step's loss, and so its gradients, are scaled by F (default 100)
    RECURDEPTH_KILL_AT_STEP=N:RANK          SIGKILL global rank RANK after step N (first attempt only)
    RECURDEPTH_FAIL_SAVE_AT_STEP=N:RANK     the save of step N fails on global rank RANK alone (an I/O error)
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch

NAN_LOSS_ENV = "RECURDEPTH_INJECT_NAN_AT_STEP"
NAN_GRAD_ENV = "RECURDEPTH_INJECT_NAN_GRAD_AT_STEP"
SPIKE_ENV = "RECURDEPTH_INJECT_SPIKE_AT_STEP"
KILL_AT_STEP_ENV = "RECURDEPTH_KILL_AT_STEP"
FAIL_SAVE_ENV = "RECURDEPTH_FAIL_SAVE_AT_STEP"


def _at(env: str) -> tuple[Optional[int], float]:
    spec = os.environ.get(env, "")
    if not spec:
        return None, 1.0
    at, _, factor = spec.partition(":")
    return int(at), float(factor or 100.0)


class FaultInjector:
    """The test hooks above, armed from the environment when the trainer is built (no cost when unset)."""

    def __init__(self, model, device):
        self.nan_loss, _ = _at(NAN_LOSS_ENV)
        self.nan_grad, _ = _at(NAN_GRAD_ENV)
        self.spike, self.spike_factor = _at(SPIKE_ENV)
        self.step = 0  # the 1-based step now running
        self.fired: set = set()
        if self.nan_grad is not None and torch.distributed.get_rank() == 0:
            module = getattr(model, "module", model)
            param = next((p for n, p in module.named_parameters() if "embedding" in n and p.requires_grad), None)
            if param is None:
                param = next(p for p in module.parameters() if p.requires_grad)
            param.register_hook(self._poison_grad)

    def begin(self, step: int) -> None:
        self.step = step

    def _once(self, kind: str, at: Optional[int]) -> bool:
        if at is None or self.step != at or (kind, at) in self.fired:
            return False
        self.fired.add((kind, at))
        return True

    def _poison_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if not self._once("nan_grad", self.nan_grad):
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    def loss_is_nan(self) -> bool:
        """Whether this step's (already backpropagated) loss is to be reported as NaN."""
        return self._once("nan_loss", self.nan_loss)

    def loss_scale(self) -> float:
        """The factor on this step's loss before backward (1.0 except at an injected spike)."""
        return self.spike_factor if self.spike is not None and self.step == self.spike and (
            ("spike", self.spike) not in self.fired) else 1.0

    def end(self) -> None:
        if self.spike is not None and self.step == self.spike:
            self.fired.add(("spike", self.spike))


def _step_and_rank(env: str) -> Optional[tuple[int, int]]:
    spec = os.environ.get(env)
    if not spec:
        return None
    at, rank = (int(x) for x in spec.split(":"))
    return at, rank


def maybe_kill(step: int) -> None:
    """RECURDEPTH_KILL_AT_STEP=N:RANK: SIGKILL global rank RANK after step N, on the first attempt only
    (torchrun sets TORCHELASTIC_RESTART_COUNT on restarts)."""
    spec = _step_and_rank(KILL_AT_STEP_ENV)
    if spec is None or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    if spec == (step, torch.distributed.get_rank()):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail_save(step: int) -> None:
    """RECURDEPTH_FAIL_SAVE_AT_STEP=N:RANK: the save of step N raises an I/O error on rank RANK only."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if _step_and_rank(FAIL_SAVE_ENV) == (step, rank):
        raise OSError(5, "Input/output error (injected by RECURDEPTH_FAIL_SAVE_AT_STEP)")
