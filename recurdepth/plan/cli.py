"""The `recurdepth plan` verb (wired in recurdepth/cli.py): its parser and what it runs."""

from __future__ import annotations

import argparse

from recurdepth.config import load_config
from recurdepth.plan.devices import DEVICES
from recurdepth.plan.planner import plan
from recurdepth.plan.speed import DEFAULT_ASSUMED_MFU


def add_plan_parser(verbs) -> None:
    """`recurdepth plan CONFIG [overrides] --nodes N --gpus-per-node G --gpu h100 [--strict] [--dry-run]`."""
    p = verbs.add_parser("plan", help="per-rank memory, fit and estimated step time of a config on a cluster, "
                                      "without GPUs: recurdepth plan CONFIG --nodes N --gpus-per-node G --gpu h100")
    p.add_argument("config", help="YAML config, e.g. configs/huginn-3.5b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.pipeline=2")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="devices (processes) per node (default 8; 1 with --gpu cpu)")
    p.add_argument("--gpu", default="h100", type=str.lower, choices=sorted(DEVICES),
                   help="device kind (default h100); cpu = this machine's RAM and measured matmul peak")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary size, instead of reading data.tokenizer; the model's is "
                        "model.vocab_size when set (refused when smaller), else this, as in training")
    p.add_argument("--assumed-mfu", type=float, default=None,
                   help=f"achievable fraction of the peak FLOP/s for the step time (default {DEFAULT_ASSUMED_MFU})")
    p.add_argument("--strict", action="store_true", help="exit 3 when the plan does not fit")
    p.add_argument("--dry-run", action="store_true",
                   help="also build the real model of one rank per pipeline stage on the meta device under a fake "
                        "process group and its pipeline schedule; print its bytes beside the plan's")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (1 if args.gpu == "cpu" else 8)
    result = plan(cfg, args.nodes, gpus, args.gpu, vocab_size=args.vocab_size, assumed_mfu=args.assumed_mfu,
                  config_name=str(args.config))
    print(result.format(), flush=True)
    if args.dry_run:
        from recurdepth.plan.dryrun import dry_run

        print(dry_run(cfg, args.nodes, gpus, args.gpu, vocab_size=args.vocab_size,
                      config_name=str(args.config)).format(), flush=True)
    return 3 if args.strict and not result.fits else 0
