"""Trainer callbacks: progress line, metrics file and TensorBoard. Each sees a `StepMetrics` per step."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class StepMetrics:
    step: int
    loss: float
    lr: float
    grad_norm: float
    depth: int
    backprop_depth: int
    tokens: int
    seconds: float
    flops: float  # model FLOPs of this step, all ranks
    peak_flops: float  # all ranks
    health: dict = field(default_factory=dict)
    guard: str = ""  # why the numerical guard rejected this step ("" = accepted)

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    @property
    def tflops(self) -> float:
        return self.flops / max(self.seconds, 1e-9) / 1e12

    @property
    def mfu(self) -> float:
        return self.flops / max(self.seconds, 1e-9) / self.peak_flops if self.peak_flops else math.nan


class Callback:
    def on_step(self, m: StepMetrics) -> None: ...
    def on_eval(self, step: int, values: dict) -> None: ...
    def close(self) -> None: ...


class ProgressLine(Callback):
    """One line every `interval` steps: step, loss, lr, grad norm, r, tokens/s, TFLOP/s, MFU."""

    def __init__(self, total_steps: int, interval: int, stream=sys.stdout):
        self.total, self.interval, self.stream = total_steps, interval, stream

    def on_step(self, m: StepMetrics) -> None:
        if m.step % self.interval and m.step != self.total:
            return
        health = "".join(f" | {k} {v:.3g}" for k, v in m.health.items())
        if m.guard:
            health += f" | BAD STEP: {m.guard}"
        print(f"step {m.step:>6}/{self.total} | loss {m.loss:.4f} | lr {m.lr:.3e} | grad_norm {m.grad_norm:.3f} | "
              f"r {m.depth} (k {m.backprop_depth}) | {m.tokens_per_sec:,.0f} tok/s | {m.tflops:.3f} TFLOP/s | "
              f"MFU {100 * m.mfu:.1f}%{health}", file=self.stream, flush=True)

    def on_eval(self, step: int, values: dict) -> None:
        print(f"eval  {step:>6}/{self.total} | " + " | ".join(f"{k} {v:.4f}" for k, v in values.items()),
              file=self.stream, flush=True)


class MetricsFile(Callback):
    """Every step as one JSON line in `<run_dir>/metrics.jsonl` (full-precision loss, for comparisons)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def on_step(self, m: StepMetrics) -> None:
        row = {k: v for k, v in asdict(m).items() if k not in ("health", "guard")}
        if m.guard:
            row["guard"] = m.guard
        row.update({f"health/{k}": v for k, v in m.health.items()})
        row["time"] = time.time()
        self.file.write(json.dumps(row) + "\n")

    def on_eval(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in values.items()}}) + "\n")

    def close(self) -> None:
        self.file.close()


class TensorBoard(Callback):
    """The progress-line metrics and recurrence health as TensorBoard scalars under `<run_dir>/tensorboard`."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.bad_steps = 0

    def on_step(self, m: StepMetrics) -> None:
        w, s = self.writer, m.step
        for name, value in (("train/loss", m.loss), ("train/lr", m.lr), ("train/grad_norm", m.grad_norm),
                            ("train/depth", m.depth), ("train/tokens_per_sec", m.tokens_per_sec),
                            ("train/tflops", m.tflops), ("train/mfu", m.mfu)):
            w.add_scalar(name, value, s)
        for name, value in m.health.items():
            w.add_scalar(f"health/{name}", value, s)
        self.bad_steps += bool(m.guard)
        w.add_scalar("guard/bad_steps", self.bad_steps, s)

    def on_eval(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"valid/{name}", value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def default_callbacks(run_dir: Path, total_steps: int, log_interval: int, tensorboard: bool,
                      is_logger: bool, extra: Optional[list] = None) -> list:
    if not is_logger:
        return list(extra or [])
    cbs: list = [ProgressLine(total_steps, log_interval), MetricsFile(run_dir / "metrics.jsonl")]
    if tensorboard:
        cbs.append(TensorBoard(run_dir / "tensorboard"))
    return cbs + list(extra or [])
