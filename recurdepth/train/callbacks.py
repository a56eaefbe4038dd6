"""Trainer callbacks: everything that happens around the steps, on a small set of hooks.

Hooks, in the order a run calls them (each optional; `Trainer.emit` calls them in list order):
    on_train_start(trainer)          fit() begins, after the run directory is set up
    on_step_end(trainer, m)          after every step (`m`: its StepMetrics); a returned string stops the run
                                     after this step (the reason). The default hands `m` to `on_step`
    on_step(m)                       a step's metrics: the logging callbacks' hook
    on_bad_step(trainer, reason)     the numerical guard rejected the step now running (its update is not
                                     applied), before the step's bookkeeping
    on_eval(step, values)            validation values (sent by `Evaluation`)
    on_train_end(trainer)            the loop finished without an error (reached train.steps, or stopped)
    close()                          always, last, also after an error: files, signal handlers

Logging, rank 0 only (`default_callbacks`): ProgressLine, MetricsFile, TensorBoard. Run control, on every rank
because each is collective (`control_callbacks`), after the logging ones: GuardAction (train.on_bad_step),
Evaluation (train.eval_interval), Checkpointing (checkpoint.interval, save_final), StopOnRequest
(train.stop_signals, train.exit_after_minutes). The trainer they see offers `state`, `cfg`, `device`,
`is_logger`, `run_dir`, `guard`, `scheduler`, `save()`, `load(path)`, `evaluate()`, `emit(hook, ...)` and
`last_saved`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from recurdepth.errors import TrainingHalted
from recurdepth.train.checkpoint import latest_checkpoint
from recurdepth.train.guards import StopRequest


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
    """The hooks of the module docstring, each doing nothing by default."""

    def on_train_start(self, trainer) -> None: ...

    def on_step_end(self, trainer, m: StepMetrics) -> Optional[str]:
        self.on_step(m)
        return None

    def on_step(self, m: StepMetrics) -> None: ...
    def on_bad_step(self, trainer, reason: str) -> None: ...
    def on_eval(self, step: int, values: dict) -> None: ...
    def on_train_end(self, trainer) -> None: ...
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
    """The logging callbacks (rank 0), then `extra`."""
    if not is_logger:
        return list(extra or [])
    cbs: list = [ProgressLine(total_steps, log_interval), MetricsFile(run_dir / "metrics.jsonl")]
    if tensorboard:
        cbs.append(TensorBoard(run_dir / "tensorboard"))
    return cbs + list(extra or [])


# ------------------------------------------------------------------ run control (every rank)

class GuardAction(Callback):
    """A bad step (numerical guard), before its update is applied, per `train.on_bad_step`: `halt` saves the
    state before the update and raises TrainingHalted; `skip` records the batch and goes on; `rollback`
    reloads the latest checkpoint and skips the batch when it comes round again (halt when there is none).
    Every bad step is a line in `<run_dir>/bad_steps.jsonl`."""

    def __init__(self, action: str):
        self.action = action

    def on_bad_step(self, trainer, reason: str) -> None:
        action, step, state = self.action, trainer.state.step + 1, trainer.state
        self.record(trainer, step, reason, action)
        if action == "rollback":
            target = latest_checkpoint(trainer.cfg.checkpoint_dir)
            if target is not None:
                bad_batch = state.consumed_samples
                trainer.state = state = trainer.load(target, check=False)
                state.skipped_batches.append(bad_batch)
                state.step -= 1  # the step's bookkeeping then lands exactly on the checkpoint's step
                state.consumed_samples -= trainer.cfg.train.global_batch_size
                trainer.scheduler.step(increment=-1)
                trainer.guard.history.clear()
                if trainer.is_logger:
                    print(f"step {step}: {reason}; rolled back to {target.name}, batch at sample {bad_batch} "
                          f"will be skipped", flush=True)
                return
            action = "halt"  # nothing to roll back to
        if action == "halt":
            saved = trainer.save()
            raise TrainingHalted(f"step {step}: {reason}; halted before applying it (checkpoint {saved}); resume "
                                 f"with train.on_bad_step=skip or rollback to continue past it")
        state.skipped_batches.append(state.consumed_samples)
        if trainer.is_logger:
            print(f"step {step}: {reason}; update skipped, batch at sample {state.consumed_samples} recorded",
                  flush=True)

    @staticmethod
    def record(trainer, step: int, reason: str, action: str) -> None:
        if trainer.is_logger:
            with open(trainer.run_dir / "bad_steps.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "reason": reason, "action": action,
                                    "consumed_samples": trainer.state.consumed_samples, "time": time.time()}) + "\n")


class Evaluation(Callback):
    """Validation every `interval` steps (0: never), its values sent to every callback's `on_eval`."""

    def __init__(self, interval: int):
        self.interval = interval

    def on_step_end(self, trainer, m: StepMetrics) -> Optional[str]:
        if self.interval and trainer.state.step % self.interval == 0:
            trainer.emit("on_eval", trainer.state.step, trainer.evaluate())
        return None


class Checkpointing(Callback):
    """A save every `interval` steps (0: never) and, with `save_final`, one at the end of a run that trained
    and reached `total_steps` unless that step was just saved."""

    def __init__(self, interval: int, save_final: bool, total_steps: int):
        self.interval, self.save_final, self.total = interval, save_final, total_steps
        self.first_step = 0

    def on_train_start(self, trainer) -> None:
        self.first_step = trainer.state.step

    def on_step_end(self, trainer, m: StepMetrics) -> Optional[str]:
        if self.interval and trainer.state.step % self.interval == 0:
            trainer.save()
        return None

    def on_train_end(self, trainer) -> None:
        step = trainer.state.step
        ran = step > self.first_step  # a run resumed at its last step has nothing new to save
        if (self.save_final and ran and step >= self.total
                and (trainer.last_saved is None or step % max(self.interval, 1))):
            trainer.save()


class StopOnRequest(Callback):
    """The graceful stop (`guards.StopRequest`): its signal handlers are installed for the run; after every
    step but the last the ranks agree on a stop, and then every rank saves and the run ends."""

    def __init__(self, exit_after_minutes: Optional[float], signals, total_steps: int):
        self.minutes, self.signals, self.total = exit_after_minutes, signals, total_steps
        self.request: Optional[StopRequest] = None

    def on_train_start(self, trainer) -> None:
        self.request = StopRequest(self.minutes, self.signals)

    def on_step_end(self, trainer, m: StepMetrics) -> Optional[str]:
        if self.request is None or trainer.state.step >= self.total:
            return None
        reason = self.request.agree(trainer.device)
        if reason is not None:
            saved = trainer.save()
            if trainer.is_logger:
                print(f"stopping after step {trainer.state.step} on {reason}; checkpoint {saved}", flush=True)
        return reason

    def close(self) -> None:
        if self.request is not None:
            self.request.restore()
            self.request = None


def control_callbacks(cfg) -> list:
    """The run-control callbacks of a config, in the order they act after a step."""
    t, c = cfg.train, cfg.checkpoint
    return [GuardAction(t.on_bad_step), Evaluation(t.eval_interval),
            Checkpointing(c.interval, c.save_final, t.steps),
            StopOnRequest(t.exit_after_minutes, t.stop_signals, t.steps)]
