"""`recurdepth bench objectives`: step time and peak memory of thought-token objectives against the plain LM
step on the same config (Quiet-STaR with T thought tokens, with and without per-thought checkpointing).

Each variant runs in a fresh process at a fixed recurrence (r, k): one warm-up step (optimizer state,
allocator pools), then the peak is reset and `--steps` measured steps run (median time). Memory as in `bench
memory`: on CPU the resident-set high-water mark (VmHWM) and the step's share (peak - resident before the
steps), on GPU torch.cuda.max_memory_allocated; and the bytes autograd keeps from forward to backward (each
storage once), which does not depend on the allocator or the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from recurdepth.bench.memory import MemoryProbe, warm_trainer

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quiet-star.yaml"


def variants(thoughts: int) -> dict[str, list]:
    """Name -> overrides of each measured variant."""
    qs = ["objective.kind=quiet_star", f"objective.thought_length={thoughts}"]
    return {"lm": ["objective.kind=lm"],
            f"quiet_star T={thoughts}": [*qs, "objective.checkpoint_thoughts=false"],
            f"quiet_star T={thoughts} + checkpoint": [*qs, "objective.checkpoint_thoughts=true"]}


def add_objectives_bench_parser(subs) -> None:
    import argparse

    p = subs.add_parser("objectives", help="step time and peak memory: plain LM vs Quiet-STaR (T thoughts, "
                                           "with and without per-thought checkpointing)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/quiet-star.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--thoughts", type=int, default=8, help="thought tokens T (default 8)")
    p.add_argument("--depth", type=int, default=4, help="fixed recurrence r (default 4)")
    p.add_argument("--k", type=int, default=2, help="backprop depth k (default 2)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (default 3)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for CI")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def _measure(config: str, overrides: list, depth: int, k: int, steps: int) -> dict:
    trainer = warm_trainer(config, overrides, depth, k, steps)
    probe, times = MemoryProbe(trainer.device), []
    for i in range(steps):
        start = time.perf_counter()
        if i == 0:
            with probe.saving():
                trainer.train_step()
        else:
            trainer.train_step()
        probe.sync()
        times.append(time.perf_counter() - start)
    cfg = trainer.cfg
    return {"step_s": sorted(times)[len(times) // 2], **probe.result(), "device": trainer.device.type,
            "tokens": cfg.train.global_batch_size * cfg.model.seq_length}


def run_objectives_bench(args) -> int:
    config = args.config or str(DEFAULT_CONFIG)
    overrides = list(args.overrides)
    if args.quick:
        overrides += ["model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=2",
                      "train.micro_batch_size=2"]
    if args.child is not None:
        row = _measure(config, [*overrides, *json.loads(args.child)], args.depth, args.k, args.steps)
        print(json.dumps(row))
        return 0
    rows = []
    for i, (name, extra) in enumerate(variants(args.thoughts).items()):
        cmd = [sys.executable, "-m", "recurdepth", "bench", "objectives", config, *overrides, "--depth",
               str(args.depth), "--k", str(args.k), "--steps", str(args.steps), "--child", json.dumps(extra)]
        env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(29470 + i))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode:
            sys.stderr.write(out.stderr[-2000:])
            return out.returncode
        rows.append({"variant": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    base = rows[0]
    print(f"one training step, r={args.depth} k={args.k}, {base['tokens']} tokens, device={base['device']} "
          f"(median of {args.steps} steps; peak = process high-water mark, step = peak - resident before; "
          f"saved = tensors autograd keeps for backward)")
    print(f"{'variant':<32} {'step s':>8} {'x lm':>6} {'peak MiB':>9} {'step MiB':>9} {'saved MiB':>10} {'x lm':>6}")
    for r in rows:
        print(f"{r['variant']:<32} {r['step_s']:>8.3f} {r['step_s'] / base['step_s']:>6.1f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['step_bytes'] / 2**20:>9.1f} {r['saved_bytes'] / 2**20:>10.1f} "
              f"{r['saved_bytes'] / max(base['saved_bytes'], 1):>6.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0

