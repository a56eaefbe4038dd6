"""`recurdepth bench SUB`: measurements that print one table each (speed and memory targets live here,
never in timed unit tests)."""

from __future__ import annotations

import argparse

from recurdepth.bench.names import GPU_CHECKS


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
    from recurdepth.bench.pipeline import add_pipeline_bench_parser

    add_step_bench_parser(subs)
    add_dense_bench_parser(subs)
    add_data_bench_parser(subs)
    add_pipeline_bench_parser(subs)
    from recurdepth.bench.objectives import add_objectives_bench_parser

    add_objectives_bench_parser(subs)
    add_decode_bench_parser(subs)
    add_peak_bench_parser(subs)
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


def add_dense_bench_parser(subs) -> None:
    """`bench dense` (here, not in bench/dense.py, so that building the parser does not import torch)."""
    p = subs.add_parser("dense", help="looped model vs a dense megatron GPT with the same depth: achieved FLOP/s")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/bench.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--depth", type=int, default=None, help="r (default: the config's fixed depth or rounded mean)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each model (default 3)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one step: for CI")


def add_step_bench_parser(subs) -> None:
    """`bench step` (here, not in bench/step.py, so that building the parser does not import torch)."""
    p = subs.add_parser("step", help="tokens/s, achieved FLOP/s, MFU/HFU of the training step vs a measured mm peak")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/bench.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch_size=4")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: for CI")
    p.add_argument("--profile", action="store_true",
                   help="also profile two more steps of recurdepth and of the plain baseline: ms per op, side by side")
    p.add_argument("--precisions", metavar="LIST", default=None,
                   help="train the config in each of these precisions (e.g. fp32,bf16), steps interleaved in one "
                        "run; tokens/s and MFU (each against its own dtype's peak) side by side")
    p.add_argument("--versus", metavar="OVERRIDES", default=None,
                   help="also train the config with these overrides on top (one quoted string, e.g. "
                        "\"objective.kind=recursion_router objective.router_capacity=[1.0,0.5]\"), steps interleaved "
                        "in one run; tokens/s, FLOPs and speed side by side")
    p.add_argument("--huginn", metavar="DIR", default=None,
                   help="also time Huginn's published modeling code from this checkout of "
                        "seal-rg/recurrent-pretraining (needs transformers<5), interleaved")


def add_decode_bench_parser(subs) -> None:
    """`bench decode` (here, not in bench/decode.py, so that building the parser does not import torch)."""
    p = subs.add_parser("decode", help="tokens/s of greedy `generate` (KV cache, KL exit) vs naive decoding "
                                       "(megatron forward and plain PyTorch, no cache)")
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="decode a trained checkpoint's model instead of a randomly initialised one")
    p.add_argument("--depths", default=None, help="comma-separated r values (default 4,32)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 32)")
    p.add_argument("--prompt-length", type=int, default=None, help="prompt ids per row (default 32)")
    p.add_argument("--exit-kl", type=float, default=5e-4, metavar="EPS",
                   help="KL threshold of the exit-kl variant (default 5e-4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, r=2,4, batch 1,2, 4 tokens: for CI")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")


def add_peak_bench_parser(subs) -> None:
    """`bench peak` (here, not in peak.py, so that building the parser does not import torch)."""
    p = subs.add_parser("peak", help="measure the matmul peak MFU divides by (best of N bursts, with the spread) "
                                     "and cache it per machine, dtype and thread count")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="default fp32")
    p.add_argument("--bursts", type=int, default=10, help="bursts of square torch.mm (default 10)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: one per core)")
    p.add_argument("--refresh", action="store_true", help="replace the cached entry even if it is higher")
    p.add_argument("--quick", action="store_true", help="tiny sizes, not cached: for CI")


def add_gpu_check_parser(subs) -> None:
    """`bench gpu-check` (here, not in bench/gpu_check.py, so that building the parser does not import torch)."""
    p = subs.add_parser("gpu-check", help="the GPU acceptance checks in one table: TE vs local spec, a ~1B bf16 step "
                                          "(tokens/s, MFU), train.compile, TE checkpoint -> local load, KV-cached "
                                          "decoding, a Quiet-STaR step (--quick: tiny shapes, for CI)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one timed step: for CI (CPU)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(GPU_CHECKS)}")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="skip checks that would start after this many seconds (default 480; --quick: none)")
