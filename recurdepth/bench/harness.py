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
    """The peak MFU divides by: this machine's cached matmul peak (`recurdepth/peak.py`: best of many bursts, per
    dtype and thread count), and bursts sampled in this run between timed steps, which tell how busy the machine
    is now. `best` is the higher of the two (a run that beats the cache updates it), so a busy moment never
    lowers the denominator and MFU does not swing with it."""

    dtype: torch.dtype = torch.float32
    samples: list = field(default_factory=list)
    cached: object = None  # recurdepth.peak.Peak
    floor: object = None  # where the device emulates `dtype` (bf16 on an AVX2 CPU): its fp32 Peak (peak.mfu_peak)
    quick: bool = False  # --quick: small squares, few bursts, nothing cached (CI checks the table, not the peak)

    @property
    def device(self) -> str:
        return "cuda" if torch.cuda.is_available() else "cpu"

    def sample(self, repeats: int = 1) -> float:
        from recurdepth.peak import CPU_SIZES, GPU_SIZES, QUICK_SIZES, cached_peak, measure_matmul_peak

        from recurdepth.peak import emulated, measure

        peak_of = ((lambda dtype: measure(self.device, dtype, bursts=3, seconds=0.05, sizes=QUICK_SIZES))
                   if self.quick else (lambda dtype: cached_peak(self.device, dtype)))
        if self.cached is None:
            self.cached = peak_of(self.dtype)
            if emulated(self.device, self.dtype):
                self.floor = peak_of(torch.float32)
        sizes = QUICK_SIZES if self.quick else GPU_SIZES if self.device == "cuda" else CPU_SIZES
        self.samples.append(measure_matmul_peak(sizes, repeats=repeats, dtype=self.dtype, device=self.device))
        return self.best

    @property
    def best(self) -> float:
        return max([self.cached.flops if self.cached is not None else 0.0, *self.samples,
                    self.floor.flops if self.floor is not None else 0.0])

    def keep(self) -> None:
        """Record this run's best burst in the cache if it beats the cached peak."""
        import datetime

        from recurdepth.peak import Peak, record

        if self.samples and max(self.samples) > self.cached.flops and not self.quick:
            self.cached = record(Peak(self.cached.key, max(self.samples), list(self.samples),
                                      datetime.date.today().isoformat(), torch.__version__))

    def describe(self) -> str:
        now = max(self.samples) if self.samples else 0.0
        floor = ("" if self.floor is None else f"\n{str(self.dtype).replace('torch.', '')} is emulated here: MFU "
                 f"divides by the fp32 {self.floor.describe()}, the rate the emulation computes at")
        return (f"{self.cached.describe()}\nthis run's bursts between steps: best {now / 1e9:,.1f} GFLOP/s "
                f"({now / max(self.cached.flops, *self.samples):.0%} of the {str(self.dtype).replace('torch.', '')} peak; lower = a busier machine now), {len(self.samples)} samples"
                f"{floor}")


def best_and_median(values: list) -> tuple:
    """(best, median) of per-step seconds: best = the fastest step."""
    return min(values), statistics.median(values)
