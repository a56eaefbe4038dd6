"""What the in-process benchmarks share: a one-process trainer for a config, the mm peak sampled between
steps, and the table conventions (best and median over timed steps; the machine may be shared)."""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "bench.yaml"
QUICK_OVERRIDES = ["model.hidden_size=64", "model.num_heads=4", "model.seq_length=64", "train.global_batch_size=4",
                   "train.micro_batch_size=2", "recurrence.sampler=fixed", "recurrence.depth=3",
                   "recurrence.backprop_depth=2"]
# a bench run only trains: no checkpoints, no TensorBoard, no health metrics, no start-up peak measurement
# (the bench samples the peak itself, between steps)
_QUIET = ["checkpoint.interval=0", "checkpoint.save_final=false", "checkpoint.resume=never",
          "logging.tensorboard=false", "logging.health_interval=0", "logging.peak_tflops=1",
          "train.eval_interval=0"]


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (default: what torch chose, one per core) and return the count."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def bench_trainer(config: str | None, overrides: list, steps: int):
    """A one-process `Trainer` for `config` + `overrides` that can run `steps` steps, writing to a temp dir."""
    from recurdepth.config import load_config
    from recurdepth.train.trainer import Trainer

    cfg = load_config(config or str(DEFAULT_CONFIG), list(overrides) + _QUIET + [
        f"train.steps={steps}", f"train.run_dir={tempfile.mkdtemp(prefix='recurdepth-bench-')}"])
    trainer = Trainer(cfg, callbacks=[])
    trainer.callbacks = []
    return trainer


@dataclass
class PeakSampler:
    """The best FLOP/s of a large `torch.mm` seen so far: sampled once up front and again between timed steps,
    so it sees the same (shared) machine as the steps do."""

    sizes: tuple = (1024, 2048)
    samples: list = field(default_factory=list)

    def sample(self, repeats: int = 1) -> float:
        from recurdepth.train.flops import measure_matmul_peak

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        sizes = (4096, 8192) if device == "cuda" else self.sizes
        self.samples.append(measure_matmul_peak(sizes, repeats=repeats, dtype=dtype, device=device))
        return self.best

    @property
    def best(self) -> float:
        return max(self.samples)

    def describe(self) -> str:
        return (f"peak = best torch.mm of {len(self.samples)} samples (square {'/'.join(map(str, self.sizes))}, "
                f"{torch.get_num_threads()} threads, same process): {self.best / 1e9:,.1f} GFLOP/s")


def best_and_median(values: list) -> tuple:
    """(best, median) of per-step seconds: best = the fastest step."""
    return min(values), statistics.median(values)
