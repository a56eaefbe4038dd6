"""`recurdepth bench SUB`: measurements that print one table each (speed and memory targets live here,
never in timed unit tests)."""

from __future__ import annotations

import argparse


def add_bench_parser(verbs) -> None:
    bench = verbs.add_parser("bench", help="benchmarks: recurdepth bench step|dense|memory|data|pipeline|objectives|decode|peak|gpu-check [CONFIG] "
                                           "... (--quick: tiny shapes, for CI)")
    subs = bench.add_subparsers(dest="bench", required=True)
    mem = subs.add_parser("memory", help="peak memory of one training step at several recurrences r (fixed k)")
    mem.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/tiny.yaml)")
    mem.add_argument("overrides", nargs="*", help="dotted overrides")
    mem.add_argument("--depths", default="2,4,8,16,32,64",
                     help="comma-separated r values (default 2,4,8,16,32,64); ratios are against r=k when listed")
    mem.add_argument("--k", type=int, default=4, help="backprop depth k (default 4)")
    mem.add_argument("--quick", action="store_true", help="tiny shapes, for CI")
    mem.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    from recurdepth.bench.data import add_data_bench_parser
    from recurdepth.bench.dense import add_dense_bench_parser
    from recurdepth.bench.pipeline import add_pipeline_bench_parser
    from recurdepth.bench.step import add_step_bench_parser

    add_step_bench_parser(subs)
    add_dense_bench_parser(subs)
    add_data_bench_parser(subs)
    add_pipeline_bench_parser(subs)
    from recurdepth.bench.objectives import add_objectives_bench_parser

    add_objectives_bench_parser(subs)
    from recurdepth.bench.decode import add_decode_bench_parser

    add_decode_bench_parser(subs)
    from recurdepth.peak import add_peak_bench_parser

    add_peak_bench_parser(subs)
    from recurdepth.bench.gpu_check import add_gpu_check_parser

    add_gpu_check_parser(subs)
    bench.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench == "step":
        from recurdepth.bench.step import run_step_bench

        return run_step_bench(args)
    if args.bench == "dense":
        from recurdepth.bench.dense import run_dense_bench

        return run_dense_bench(args)
    if args.bench == "memory":
        from recurdepth.bench.memory import run_memory_bench

        return run_memory_bench(args)
    if args.bench == "data":
        from recurdepth.bench.data import run_data_bench

        if args.quick:
            args.sizes, args.vocab_size = "0.5,2", 500
        return run_data_bench(args)
    if args.bench == "pipeline":
        from recurdepth.bench.pipeline import run_pipeline_bench

        if args.quick and not args.child:
            args.overrides = list(args.overrides) + ["model.hidden_size=64", "model.seq_length=64",
                                                     "train.global_batch_size=8", "train.micro_batch_size=2"]
            args.depth, args.k, args.steps = 4, 2, 1
        return run_pipeline_bench(args)
    if args.bench == "objectives":
        from recurdepth.bench.objectives import run_objectives_bench

        return run_objectives_bench(args)
    if args.bench == "decode":
        from recurdepth.bench.decode import run_decode_bench

        return run_decode_bench(args)
    if args.bench == "peak":
        from recurdepth.peak import run_peak_bench

        return run_peak_bench(args)
    if args.bench == "gpu-check":
        from recurdepth.bench.gpu_check import run_gpu_check

        return run_gpu_check(args)
    raise SystemExit(f"unknown bench {args.bench}")
