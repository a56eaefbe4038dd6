"""`recurdepth bench objectives`: step time and peak memory of thought-token objectives against the plain LM
step on the same config: `--objective quiet_star` (T thought tokens, with and without per-thought
checkpointing) or `--objective coconut` (stage k with c latents per replaced step, n = k c latents: n + 1
passes per micro-batch, with the KV-cached passes and with the recomputing ones).

Each variant runs in a fresh process at a fixed recurrence (r, k): one warm-up step (optimizer state,
allocator pools), then the peak is reset and `--steps` measured steps run (median time). Coconut's stage is
pinned: `objective.coconut_stage_steps` = STAGE_STEPS and the trainer's step counter set to stage x STAGE_STEPS
after the first warm-up step, then one more warm-up step at that stage (every row of its table, lm too, runs
the same two warm-up steps); each row reports the stage and the passes per micro-batch it ran. Memory as in
`bench memory`: on CPU the resident-set high-water mark (VmHWM) and the step's share (peak - resident before the
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

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = {"quiet_star": CONFIGS / "quiet-star.yaml", "coconut": CONFIGS / "coconut.yaml"}
DEFAULT_THOUGHTS = {"quiet_star": 8, "coconut": 2}
STAGE_STEPS = 1_000_000  # Coconut's steps per stage while measuring: the pinned stage lasts every step
QUICK = {"quiet_star": ["model.hidden_size=64", "model.seq_length=32", "train.global_batch_size=2",
                        "train.micro_batch_size=2"],
         "coconut": ["model.hidden_size=64", "train.global_batch_size=2", "train.micro_batch_size=2",
                     "data.sources=[{procedural: multiplication, n: 200, difficulty: {max_digits: 2}}]"]}


def variants(objective: str, thoughts: int, stage: int = 2) -> dict[str, dict]:
    """Name -> {"overrides": [...], "step": the trainer step to measure at, or None} of each measured variant."""
    if objective == "quiet_star":
        qs = ["objective.kind=quiet_star", f"objective.thought_length={thoughts}"]
        return {name: {"overrides": o, "step": None} for name, o in (
            ("lm", ["objective.kind=lm"]),
            (f"quiet_star T={thoughts}", [*qs, "objective.checkpoint_thoughts=false"]),
            (f"quiet_star T={thoughts} + checkpoint", [*qs, "objective.checkpoint_thoughts=true"]))}
    from dataclasses import fields

    from recurdepth.objectives.coconut import CoconutSection

    # lm on a Coconut config: its coconut_* keys back at their defaults (another kind's options are refused)
    lm = ["objective.kind=lm", *(f"objective.{f.name}={json.dumps(f.default)}" for f in fields(CoconutSection)
                                 if f.name != "kind")]
    co = ["objective.kind=coconut", f"objective.coconut_thoughts_per_step={thoughts}",
          f"objective.coconut_stage_steps={STAGE_STEPS}"]
    step = stage * STAGE_STEPS
    return {"lm": {"overrides": lm, "step": step},
            f"coconut stage={stage} c={thoughts} + kv cache": {"overrides": [*co, "objective.coconut_kv_cache=true"],
                                                           "step": step},
            f"coconut stage={stage} c={thoughts} recompute": {"overrides": [*co, "objective.coconut_kv_cache=false"],
                                                          "step": step}}


def add_objectives_bench_parser(subs) -> None:
    import argparse

    p = subs.add_parser("objectives", help="step time and peak memory: plain LM vs Quiet-STaR (T thoughts, "
                                           "with and without per-thought checkpointing) or vs Coconut (stage k, "
                                           "c latents per step, with and without the KV cache)")
    p.add_argument("config", nargs="?", default=None,
                   help="YAML config (default: configs/quiet-star.yaml, or configs/coconut.yaml for coconut)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--objective", choices=sorted(DEFAULT_CONFIG), default="quiet_star",
                   help="the objective measured against lm (default quiet_star)")
    p.add_argument("--thoughts", type=int, default=None,
                   help="quiet_star: thought tokens T (default 8); coconut: latents per replaced step c (default 2)")
    p.add_argument("--stage", type=int, default=2, help="coconut: the curriculum stage k measured (default 2)")
    p.add_argument("--depth", type=int, default=4, help="fixed recurrence r (default 4)")
    p.add_argument("--k", type=int, default=2, help="backprop depth k (default 2)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per variant (default 3)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for CI")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def _measure(config: str, overrides: list, depth: int, k: int, steps: int, at_step=None) -> dict:
    trainer = warm_trainer(config, overrides, depth, k, steps)
    if at_step is not None:  # pin the step (Coconut's stage), and warm up once more there
        trainer.state.step = at_step
        trainer.train_step()
    objective, passes = trainer.objective, getattr(trainer.objective, "forward_passes", None)
    probe, times, stages = MemoryProbe(trainer.device), [], set()
    for i in range(steps):
        start = time.perf_counter()
        if i == 0:
            with probe.saving():
                trainer.train_step()
        else:
            trainer.train_step()
        probe.sync()
        times.append(time.perf_counter() - start)
        if passes is not None:
            stages.add(objective.stage)
    cfg = trainer.cfg
    row = {"step_s": sorted(times)[len(times) // 2], **probe.result(), "device": trainer.device.type,
           "tokens": cfg.train.global_batch_size * cfg.model.seq_length}
    if passes is not None:  # Coconut: the stage it ran at and its passes per micro-batch
        micro = steps * cfg.train.global_batch_size // cfg.train.micro_batch_size
        row.update(stage="-".join(str(s) for s in sorted(stages)), passes=(objective.forward_passes - passes) / micro)
    return row


def run_objectives_bench(args) -> int:
    config = args.config or str(DEFAULT_CONFIG[args.objective])
    overrides = list(args.overrides)
    if args.quick:
        overrides += QUICK[args.objective]
    if args.child is not None:
        child = json.loads(args.child)
        row = _measure(config, [*overrides, *child["overrides"]], args.depth, args.k, args.steps, child["step"])
        print(json.dumps(row))
        return 0
    rows = []
    thoughts = args.thoughts if args.thoughts is not None else DEFAULT_THOUGHTS[args.objective]
    for i, (name, extra) in enumerate(variants(args.objective, thoughts, args.stage).items()):
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
        print(f"{r['variant']:<32} {r['step_s']:>8.3f} {r['step_s'] / base['step_s']:>6.2f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['step_bytes'] / 2**20:>9.1f} {r['saved_bytes'] / 2**20:>10.1f} "
              f"{r['saved_bytes'] / max(base['saved_bytes'], 1):>6.1f}")
    for r in rows:
        if "passes" in r:
            print(f"{r['variant']}: stage {r['stage']}, {r['passes']:g} passes per micro-batch")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0

