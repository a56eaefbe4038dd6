"""The command lines of `recurdepth generate` and `recurdepth eval`: argument parsing and checks only; torch,
megatron and the model are imported when a command runs, not when the parser is built."""

from __future__ import annotations

import argparse
from pathlib import Path

from recurdepth.errors import ConfigError
from recurdepth.infer.options import INITS, DecodeOptions


def options_from_args(args: argparse.Namespace) -> DecodeOptions:
    """DecodeOptions from `--depth/--exit-kl/--exit-gate/--exit-router/--max-depth/--kv-share/--warm-start/--init`."""
    exit_gate, exit_router = getattr(args, "exit_gate", None), getattr(args, "exit_router", False)
    if args.exit_kl is not None and exit_gate is not None:
        raise ConfigError("give one exit rule: --exit-kl EPS or --exit-gate Q, not both")
    if exit_router and (args.exit_kl is not None or exit_gate is not None):
        raise ConfigError("give one exit rule: --exit-router routes as trained; drop --exit-kl / --exit-gate")
    if exit_router and args.kv_share is not None:
        raise ConfigError("--exit-router keeps keys and values per iteration (recursion-wise, as trained): "
                          "drop --kv-share")
    if exit_gate is not None and not 0 < exit_gate <= 1:
        raise ConfigError(f"--exit-gate {exit_gate}: use a threshold q in (0, 1] on the gate's exit CDF (1 = full depth)")
    if args.exit_kl is not None or exit_gate is not None:
        if args.exit_kl is not None and args.exit_kl < 0:
            raise ConfigError(f"--exit-kl {args.exit_kl}: use eps >= 0 (0 = never exit early)")
        depth = args.max_depth
    else:
        depth = args.depth
    if depth is None or depth <= 0:
        raise ConfigError(f"depth {depth} is invalid; use --depth N (N >= 1), or --exit-kl EPS with --max-depth N >= 1")
    if args.kv_share is not None and args.kv_share < 1:
        raise ConfigError(f"--kv-share {args.kv_share}: use m >= 1 cache slots per core layer")
    return DecodeOptions(depth=depth, exit_kl=args.exit_kl, exit_gate=exit_gate, exit_router=exit_router,
                         kv_share=args.kv_share,
                         warm_start=args.warm_start,
                         init=args.init, seed=args.seed)


def require_exit_modules(loaded, options: DecodeOptions, depths: tuple = ()) -> None:
    """--exit-gate needs the gate a halting objective trains (`model.exit_gate`), --exit-router the routers of a
    recursion_router run (and depths they were trained for): one line otherwise. A router checkpoint decoded
    without --exit-router runs every token through every iteration: said on stderr."""
    import sys

    if options.exit_gate is not None and not hasattr(loaded.model, "exit_gate"):
        raise ConfigError(f"--exit-gate needs a checkpoint trained with objective.kind=exit_gate or ponder; "
                          f"{loaded.path} was trained with objective.kind={loaded.cfg.objective.kind} (no exit gate); "
                          f"use --exit-kl EPS or --depth N")
    router = getattr(loaded.model, "recursion_router", None)
    if options.exit_router:
        if router is None:
            raise ConfigError(f"--exit-router needs a checkpoint trained with objective.kind=recursion_router; "
                              f"{loaded.path} was trained with objective.kind={loaded.cfg.objective.kind}; "
                              f"use --exit-kl EPS or --depth N")
        n = router.weight.shape[0]
        bad = [d for d in (depths or (options.depth,)) if (d != n if router.mode == "token" else d > n)]
        if bad:
            raise ConfigError(f"depth {bad[0]}: this checkpoint's {router.mode}-choice router was trained for "
                              f"{'exactly' if router.mode == 'token' else 'at most'} {n} iterations; use "
                              f"{'--depth(s) ' + str(n) if router.mode == 'token' else f'depths <= {n}'}")
    elif router is not None:
        print(f"note: {loaded.path} was trained with objective.kind=recursion_router; without --exit-router every "
              f"token runs every iteration (add --exit-router to route as trained)", file=sys.stderr, flush=True)


def add_decode_arguments(parser: argparse.ArgumentParser, depth_required: bool = False) -> None:
    parser.add_argument("--exit-kl", type=float, default=None, metavar="EPS",
                        help="adaptive depth: stop a token's iterations once KL(p_{i-1} || p_i) < EPS")
    parser.add_argument("--exit-gate", type=float, default=None, metavar="Q",
                        help="adaptive depth with the learned gate (a model trained with objective.kind=exit_gate "
                             "or ponder): stop at the first iteration whose exit CDF reaches Q")
    parser.add_argument("--exit-router", action="store_true",
                        help="route each token as a model trained with objective.kind=recursion_router was trained "
                             "(its depth from the router; keys and values recursion-wise)")
    parser.add_argument("--max-depth", type=int, default=32,
                        help="most iterations per token with --exit-kl or --exit-gate")
    parser.add_argument("--kv-share", type=int, default=None, metavar="M",
                        help="share the core's KV cache over iterations: slot i mod M (default: one per iteration)")
    parser.add_argument("--warm-start", action="store_true",
                        help="start each generated token's recurrence from the previous token's final state")
    parser.add_argument("--init", choices=INITS, default="zeros", help="initial state s_0 (default zeros)")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling and a random s_0")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to use instead of the checkpoint's: 'byte', a sentencepiece .model, "
                             "or a Hugging Face tokenizer.json (or its folder)")
    parser.add_argument("--no-verify", action="store_true",
                        help="load the checkpoint without checking its files against the sha256 sums written at save")


def _generate(args: argparse.Namespace) -> int:
    import torch

    from recurdepth.infer.generate import generate
    from recurdepth.infer.loading import load_model, require_looped

    if args.exit_router:
        if args.depth is None:
            raise ConfigError("--exit-router routes within --depth N iterations: give --depth N")
    elif (args.depth is None) == (args.exit_kl is None and args.exit_gate is None):
        raise ConfigError("give exactly one of --depth N, --exit-kl EPS or --exit-gate Q")
    options = options_from_args(args)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: use at least 1")
    loaded = load_model(args.checkpoint, tokenizer=args.tokenizer, verify=not args.no_verify)
    require_looped(loaded, "recurdepth generate")
    require_exit_modules(loaded, options)
    tok = loaded.tokenizer
    ids = [tok.eod] + tok.tokenize(args.prompt)  # documents follow an eod in training
    result = generate(loaded.model, torch.tensor([ids]), args.max_new_tokens, options, tok.eod,
                      temperature=args.temperature, top_k=args.top_k, seed=args.seed, vocab_size=loaded.vocab_size)
    row = result.tokens[0].tolist()
    text = tok.detokenize(row[:row.index(tok.eod)] if tok.eod in row else row)
    print(args.prompt + text, flush=True)
    mode = (f"exit-kl {args.exit_kl:g} (max {options.depth})" if args.exit_kl is not None else
            f"exit-gate {args.exit_gate:g} (max {options.depth})" if args.exit_gate is not None else
            f"exit-router (max {options.depth})" if args.exit_router else f"depth {options.depth}")
    print(f"[{len(row)} tokens | {mode} | mean depth {result.mean_depth:.2f}]", flush=True)
    return 0


def add_generate_parser(verbs) -> None:
    g = verbs.add_parser("generate", help="generate text from a checkpoint: recurdepth generate CKPT --prompt TEXT "
                                          "--depth N | --exit-kl EPS | --exit-gate Q | --depth N --exit-router")
    g.add_argument("checkpoint", help="a step_* checkpoint directory, its checkpoints folder or the run directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--depth", type=int, default=None, help="iterations of the core per token")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=None)
    add_decode_arguments(g)
    g.set_defaults(func=_generate)


def _eval(args: argparse.Namespace) -> int:
    from recurdepth.infer.evaluate import default_out_dir, parse_depths, run_eval, task_sets, write_outputs
    from recurdepth.infer.loading import load_model

    depths = parse_depths(args.depths)
    if args.n < 1:
        raise ConfigError(f"--n {args.n}: use at least 1 sample per task")
    args.depth = depths[-1]
    args.max_depth = depths[-1]
    options = options_from_args(args)
    loaded = load_model(args.checkpoint, tokenizer=args.tokenizer, verify=not args.no_verify)
    require_exit_modules(loaded, options, tuple(depths))
    adaptive = options.exit_kl is not None or options.exit_gate is not None or options.exit_router
    by_size = size_rule(loaded, adaptive) if args.depth_by_size else None
    sets = task_sets(loaded.cfg, args.task, args.n, args.seed)
    exit_rows = [] if adaptive else None
    rows = run_eval(loaded, depths, sets, options, args.valid_samples, exit_rows, by_size)
    out = Path(args.out) if args.out else default_out_dir(loaded.path)
    mode = (f"exit-kl {args.exit_kl:g}" if args.exit_kl is not None else
            f"exit-gate {args.exit_gate:g}" if args.exit_gate is not None else
            "exit-router" if args.exit_router else "fixed depth")
    title = f"{loaded.path} ({mode})"
    meta = {"checkpoint": str(loaded.path), "depths": depths, "depth_by_size": args.depth_by_size,
            "exit_kl": args.exit_kl, "exit_gate": args.exit_gate,
            "exit_router": args.exit_router, "kv_share": args.kv_share,
            "warm_start": args.warm_start, "init": args.init,
            "task_sets": [{"label": s.label, "task": s.task, "difficulty": s.difficulty, "n": len(s.samples)}
                          for s in sets]}
    written = write_outputs(rows, out, title, meta, exit_rows)
    print("wrote " + ", ".join(str(p) for p in written.values() if p), flush=True)
    return 0


def size_rule(loaded, adaptive: bool):
    """--depth-by-size: the checkpoint's per-sample depth rule (size -> r), or a one-line ConfigError."""
    kind = loaded.cfg.objective.kind
    if kind != "depth_by_size":
        raise ConfigError(f"--depth-by-size scores each problem at the r its size gives, a rule of checkpoints trained "
                          f"with objective.kind=depth_by_size; {loaded.path} was trained with objective.kind={kind}: "
                          f"use --depths")
    if adaptive:
        raise ConfigError("--depth-by-size sets each problem's r from its size; it does not combine with --exit-kl, "
                          "--exit-gate or --exit-router (drop one)")
    from recurdepth.objectives import build_objective

    return build_objective(loaded.cfg, loaded.tokenizer).depth


def add_eval_parser(verbs) -> None:
    e = verbs.add_parser("eval", help="validation loss and task accuracy vs test-time depth: recurdepth eval CKPT "
                                      "--depths 1,2,4,8,16,32")
    e.add_argument("checkpoint", help="a step_* checkpoint directory, its checkpoints folder or the run directory")
    e.add_argument("--depths", default="1,2,4,8,16,32", help="comma-separated iterations r (each >= 1)")
    e.add_argument("--task", action="append", default=None, metavar="NAME[@key=value,...]",
                   help="a procedural task and difficulty to score (repeatable); default: each trained task at its "
                        "training difficulty and harder")
    e.add_argument("--n", type=int, default=200, help="held-out samples per task and difficulty")
    e.add_argument("--valid-samples", type=int, default=64, help="validation sequences for the loss (0 = skip)")
    e.add_argument("--out", default=None, help="output folder (default <run dir>/eval/<checkpoint name>)")
    e.add_argument("--depth-by-size", action="store_true",
                   help="also score every problem at the r its size gives (checkpoints of objective.kind="
                        "depth_by_size): rows at depth 0")
    add_decode_arguments(e)
    e.set_defaults(func=_eval)
