"""`recurdepth bench memory`: peak memory of one training step vs r at fixed k.

Each r runs in a fresh process (so the allocator's cache from another r cannot hide growth): one warm-up
step (allocates optimizer state), then the peak is reset and one measured step runs. On CPU the peak is
the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) and the step's
own share is that peak minus the resident set just before the step; on GPU it is
torch.cuda.max_memory_allocated. Ratios are against r = k (the first r otherwise). Convention: a ratio <= 1.15
between r=64 and r=4 at k=4 means memory does not grow with r (truncated backprop keeps only k iterations'
activations).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from recurdepth.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def warm_trainer(config: str, overrides: list, depth: int, k: int, steps: int):
    """A Trainer at fixed r and k with logging and checkpoints off, after one warm-up step (optimizer state,
    allocator pools), in a fresh temporary run directory."""
    import tempfile

    from recurdepth.config import load_config
    from recurdepth.train.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="recurdepth-bench-")
    cfg = load_config(config, list(overrides) + [
        "recurrence.sampler=fixed", f"recurrence.depth={depth}", f"recurrence.backprop_depth={k}",
        f"train.steps={steps + 1}", f"train.run_dir={run_dir}", "checkpoint.interval=0",
        "checkpoint.save_final=false", "logging.tensorboard=false", "logging.health_interval=0",
        "logging.peak_tflops=1", "train.eval_interval=0"])
    trainer = Trainer(cfg, callbacks=[])
    trainer.callbacks = []
    trainer.train_step()
    return trainer


class MemoryProbe:
    """Peak memory from here on (CUDA allocator or the process's RSS high-water mark) and the bytes autograd
    saves for backward inside `saving()` (each storage once): the part that could grow with r."""

    def __init__(self, device):
        import torch

        self.gpu = device.type == "cuda"
        if self.gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            _reset_peak()
            self.before = _rss_bytes("VmRSS")
        self.storages: dict = {}

    def saving(self):
        import torch

        def pack(t):
            self.storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def sync(self) -> None:
        if self.gpu:
            import torch

            torch.cuda.synchronize()

    def result(self) -> dict:
        import torch

        self.sync()
        peak = torch.cuda.max_memory_allocated() if self.gpu else _rss_bytes("VmHWM")
        return {"peak_bytes": peak, "step_bytes": peak - self.before, "saved_bytes": sum(self.storages.values())}


def _measure(config: str, overrides: list, depth: int, k: int) -> dict:
    trainer = warm_trainer(config, overrides, depth, k, steps=1)
    probe = MemoryProbe(trainer.device)
    with probe.saving():
        trainer.train_step()
    return {"depth": depth, "k": k, **probe.result(), "device": trainer.device.type}


def run_memory_bench(args) -> int:
    if args.child is not None:
        print(json.dumps(_measure(args.config or str(DEFAULT_CONFIG), args.overrides, args.child, args.k)))
        return 0
    try:
        depths = [int(d) for d in args.depths.split(",")]
    except ValueError:
        raise ConfigError(f"--depths={args.depths!r} must be comma-separated integers, e.g. 4,32") from None
    if any(d < 1 for d in depths):
        raise ConfigError(f"--depths={args.depths!r}: every r must be >= 1")
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["model.hidden_size=64", "model.seq_length=64", "train.global_batch_size=2",
                      "train.micro_batch_size=2"]
    rows = []
    for depth in depths:
        cmd = [sys.executable, "-m", "recurdepth", "bench", "memory", args.config or str(DEFAULT_CONFIG),
               *overrides, "--k", str(args.k), "--child", str(depth)]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29400 + depth % 100))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.stderr.write(out.stderr[-2000:])
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = next((row for row in rows if row["depth"] == args.k), rows[0])
    print(f"peak memory of one training step, k={args.k}, device={base['device']} (peak = process high-water "
          f"mark; step = peak - resident before the step; saved = tensors autograd keeps for backward; "
          f"ratios against r={base['depth']})")
    print(f"{'r':>5} {'peak MiB':>10} {'step MiB':>10} {'saved MiB':>10} {'peak ratio':>11} {'saved ratio':>12}")
    for row in rows:
        print(f"{row['depth']:>5} {row['peak_bytes'] / 2**20:>10.1f} {row['step_bytes'] / 2**20:>10.1f} "
              f"{row['saved_bytes'] / 2**20:>10.1f} {row['peak_bytes'] / base['peak_bytes']:>11.3f} "
              f"{row['saved_bytes'] / max(base['saved_bytes'], 1):>12.3f}")
    return 0
