"""`recurdepth bench pipeline`: tokens/s of the looped pipeline schedule vs the naive split, same machine,
same launch.

Both run PP=p (default 2) under torchrun on this machine, with a fixed r and k, the same model, data and
micro-batches: `looped` splits the core's layers over the stages (one iteration = one trip around the
ring, interleaved 1F1B over r virtual stages); `naive` puts the whole core on the first stage (all r
iterations in one trip; the last stage only runs coda and head). Reported: tokens/s over the timed
steps (after one warm-up step), and the bubble fraction from the looped schedule's own timeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _child(args) -> int:
    import tempfile

    import torch

    from recurdepth.config import load_config
    from recurdepth.train.trainer import Trainer

    rows = []
    for split in ("looped", "naive"):
        cfg = load_config(args.config or str(DEFAULT_CONFIG), list(args.overrides) + [
            f"parallel.pipeline={args.stages}", f"parallel.pipeline_split={split}", "parallel.record_timeline=true",
            "recurrence.sampler=fixed", f"recurrence.depth={args.depth}", f"recurrence.backprop_depth={args.k}",
            f"train.steps={args.steps + 1}", f"train.run_dir={tempfile.mkdtemp(prefix='recurdepth-bench-pp-')}",
            "checkpoint.interval=0", "checkpoint.save_final=false", "logging.tensorboard=false",
            "logging.health_interval=0", "logging.peak_tflops=1", "checkpoint.resume=never"])
        trainer = Trainer(cfg, callbacks=[])
        trainer.callbacks = []
        trainer.train_step()  # warm-up
        torch.distributed.barrier()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        torch.distributed.barrier()
        seconds = time.perf_counter() - start
        tokens = args.steps * cfg.train.global_batch_size * cfg.model.seq_length
        bubble = trainer.schedule.bubble_fraction() if split == "looped" else float("nan")
        rows.append((split, tokens, seconds, bubble, cfg.train.global_batch_size))
    if torch.distributed.get_rank() == 0:
        base = rows[1][1] / rows[1][2]
        print(f"pipeline PP={args.stages}, r={args.depth}, k={args.k}, {args.steps} timed steps "
              f"(tokens/s over the timed steps; bubble from the looped schedule's own timeline)")
        print(f"{'split':<8} {'tokens':>10} {'seconds':>9} {'tokens/s':>10} {'vs naive':>9} {'bubble':>8}")
        for split, tokens, seconds, bubble, _ in rows:
            tps = tokens / seconds
            print(f"{split:<8} {tokens:>10,} {seconds:>9.2f} {tps:>10,.0f} {tps / base:>9.2f} {bubble:>8.3f}")
    return 0


def run_pipeline_bench(args) -> int:
    if args.child:
        return _child(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.stages}",
           "-m", "recurdepth", "bench", "pipeline", args.config or str(DEFAULT_CONFIG), *args.overrides,
           "--stages", str(args.stages), "--depth", str(args.depth), "--k", str(args.k), "--steps", str(args.steps),
           "--child"]
    threads = max(1, (os.cpu_count() or 2) // args.stages)
    out = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), capture_output=True, text=True)
    lines = [ln for ln in out.stdout.splitlines() if not ln.startswith(("recurdepth |", "["))]
    print("\n".join(lines))
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
    return out.returncode


def add_pipeline_bench_parser(subs) -> None:
    import argparse

    p = subs.add_parser("pipeline", help="looped pipeline schedule vs naive split: tokens/s under torchrun")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--depth", type=int, default=8, help="r (fixed)")
    p.add_argument("--k", type=int, default=4, help="backprop depth k")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for CI")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
