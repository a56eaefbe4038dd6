"""What keeps a long run safe: an agreed graceful stop, and a guard against non-finite or spiking losses.

`StopRequest`: a stop signal (`train.stop_signals`, default SIGTERM, SIGUSR1, SIGINT) on *any* rank (or the
time budget `train.exit_after_minutes`) sets a local flag; `agree()` at every step boundary takes the maximum
over all ranks, so every rank stops after the same step, checkpoints and exits 0. Launchers deliver a signal
to the whole process group and often twice (torchrun forwards the one the group already got): repeats only
set the flag again, and once a stop signal has arrived, later ones are ignored until the process exits, so
nothing interrupts the stop checkpoint or the shutdown after it. `STOPPED` records the agreed stop (for the
exit record `recurdepth.cli` writes under `RECURDEPTH_EXIT_DIR`).

`NumericalGuard`: after the backward pass and before the optimizer step, a non-finite loss or gradient, or a
loss above `mean + spike_sigma * std` of the last `spike_window` steps, is a *bad step*; the configured
action is `halt` (checkpoint the state before the update, stop with an error), `skip` (drop the update,
record the batch) or `rollback` (reload the last checkpoint and skip the offending batch when it comes
round again). The verdict is reduced over all ranks, so every rank takes the same action.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections import deque
from typing import Optional

import torch

from recurdepth.config import stop_signal

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")  # a StopRequest built without `signals`
# the agreed stop of this process, once there is one: {"reason": ..., "signal": name or None}
STOPPED: Optional[dict] = None


class StopRequest:
    """A graceful-stop flag set by a stop signal or a time budget, agreed across ranks."""

    def __init__(self, exit_after_minutes: Optional[float] = None, signals=None):
        self.reason: Optional[str] = None
        self.received: Optional[str] = None  # the first stop signal's name
        self.deadline = time.monotonic() + 60 * exit_after_minutes if exit_after_minutes else None
        names = DEFAULT_STOP_SIGNALS if signals is None else signals
        self.signals = tuple(dict.fromkeys(stop_signal(s) for s in names))
        self._previous = {}
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # a repeat (torchrun forwarding what the group already got) changes nothing
            self.received = signal.Signals(signum).name
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        """Give the signals their previous handlers back, except after a stop signal: then the process is
        checkpointed and on its way out, and a repeated signal must not kill it before it exits 0."""
        for sig, handler in self._previous.items():
            signal.signal(sig, _ignore_late_signal if self.received else handler)
        self._previous = {}

    def agree(self, device) -> Optional[str]:
        """The stop reason if any rank wants to stop now (collective over the world), else None."""
        global STOPPED
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "time budget (train.exit_after_minutes)"
        flag = torch.tensor([1.0 if self.reason else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() > 0:
            reason = self.reason or "a stop request on another rank"
            STOPPED = {"reason": reason, "signal": self.received}
            return reason
        return None


def _ignore_late_signal(signum, frame) -> None:
    """A stop signal after the agreed stop: the checkpoint is written or being written; nothing to do."""


class NumericalGuard:
    """Detects bad steps from the global loss and the local gradients; see the module docstring."""

    def __init__(self, window: int, sigma: float):
        self.sigma = sigma
        self.history: deque = deque(maxlen=window)

    def verdict(self, loss: float, grads_finite: bool) -> Optional[str]:
        """Why this step is bad (agreed: `loss` is global, `grads_finite` already reduced), or None."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if not grads_finite:
            return "non-finite gradient"
        if self.sigma > 0 and len(self.history) == self.history.maxlen:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if loss > mean + self.sigma * max(std, 1e-8):
                return f"loss spike ({loss:.4f} > mean {mean:.4f} + {self.sigma:g} x std {std:.4f})"
        return None

    def accept(self, loss: float) -> None:
        self.history.append(loss)


def grads_finite(model, device) -> bool:
    """Whether every gradient in megatron's DDP buffers is finite on every rank (collective). One read of each
    buffer (its min and max are finite iff all of it is; `isfinite().all()` took four passes) and one host sync."""
    flag = torch.zeros(1, device=device)
    for buffer in _grad_buffers(model):
        if buffer.grad_data.numel():
            low, high = torch.aminmax(buffer.grad_data)
            flag = torch.maximum(flag, (~(torch.isfinite(low) & torch.isfinite(high))).float())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0


def _grad_buffers(model):
    return list(getattr(model, "buffers", [])) + list(getattr(model, "expert_parallel_buffers", []))
