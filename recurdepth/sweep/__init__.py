"""`recurdepth sweep SWEEP.yaml`: the runs `recurdepth compare` compares (issue 18), each sized to a budget.

spec.py reads SWEEP.yaml (its docstring is the schema) into runs = family x rung x seed, each validated by the
config loader and sized to its rung's model-FLOP budget (sizing.py); runner.py trains them locally (one after
another or `parallel` at a time), resuming killed runs and skipping finished ones, and appends one row per run
to `<out>/results.jsonl` (rows.py); slurm.py writes the same sweep as a job array (`--slurm`), whose tasks run
`--task I`. Every check runs before the out directory exists, so a refused sweep writes nothing.
"""

from __future__ import annotations

import argparse
import sys


def add_sweep_parser(verbs) -> None:
    p = verbs.add_parser("sweep", help="train a compute ladder of variants and write its results table: "
                                       "recurdepth sweep SWEEP.yaml [--slurm | --task I]")
    p.add_argument("sweep", help="the sweep file, e.g. configs/compare/sweep.yaml")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--slurm", action="store_true",
                     help="write <out>/sweep.sbatch, a job array with one task per run, instead of training")
    how.add_argument("--task", type=int, action="append", default=None, metavar="I",
                     help="run only run I of the sweep (repeatable; what an array task runs)")
    how.add_argument("--dry-run", action="store_true", help="print the runs, their steps and FLOPs; write nothing")
    p.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    from recurdepth.errors import ConfigError
    from recurdepth.sweep.spec import load_sweep

    sweep = load_sweep(args.sweep)
    if args.task:
        bad = [i for i in args.task if not 0 <= i < len(sweep.runs)]
        if bad:
            raise ConfigError(f"--task {bad[0]} is not a run of {args.sweep}; it has runs 0..{len(sweep.runs) - 1}")
    if args.dry_run:
        print(plan_table(sweep))
        return 0
    if args.slurm:
        from recurdepth.atomic import write_atomically
        from recurdepth.sweep.slurm import render_array

        text = render_array(sweep)
        sweep.out.mkdir(parents=True, exist_ok=True)
        write_atomically(sweep.out / "sweep.json", sweep.plan_json())
        target = write_atomically(sweep.out / "sweep.sbatch", text, mode=0o755)
        print(f"wrote {target}: a job array of {len(sweep.runs)} run(s); submit with: sbatch {target}",
              file=sys.stderr)
        return 0
    from recurdepth.sweep.runner import run_sweep

    return run_sweep(sweep, set(args.task) if args.task else None)


def plan_table(sweep) -> str:
    """One line per run: index, variant, steps, tokens, budget and planned model FLOPs, parameters."""
    lines = [f"{'#':>3} {'variant':<24} {'steps':>7} {'tokens':>11} {'budget':>9} {'FLOPs':>9} {'params':>9} "
             f"{'effective':>9}"]
    for r in sweep.runs:
        s = r.sizing
        lines.append(f"{r.index:>3} {r.variant:<24} {s.steps:>7} {s.tokens:>11,} {r.budget_flops:>9.3g} "
                     f"{s.model_flops:>9.3g} {s.unique_params:>9,} {s.effective_params:>9.3g}")
    return "\n".join(lines)
