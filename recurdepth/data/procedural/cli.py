"""`recurdepth data procedural {list,generate,verify}`: list tasks, write verified train/test JSONL splits,
re-verify a JSONL file. `add_procedural_parser(subparsers)` adds the `procedural` verb to a parser (the
`data` verb of the main CLI); `python -m recurdepth.data.procedural ...` runs it standalone."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from recurdepth.errors import DataError, RecurdepthError


def _kv(items: Optional[Sequence[str]]) -> Optional[dict]:
    if not items:
        return None
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DataError(f"difficulty must be key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_procedural_parser(subparsers) -> argparse.ArgumentParser:
    proc = subparsers.add_parser("procedural", help="verifiable procedural tasks: list, generate, verify")
    verbs = proc.add_subparsers(dest="procedural", required=True)
    ls = verbs.add_parser("list", help="own tasks with their difficulty knobs (--rg: reasoning-gym's names)")
    ls.add_argument("--rg", action="store_true", help="list reasoning-gym tasks (rg:<name>)")
    gen = verbs.add_parser("generate", help="write a verified split as JSONL")
    gen.add_argument("task", help="task name, e.g. sort or rg:chain_sum")
    gen.add_argument("--n", type=int, required=True, help="number of samples")
    gen.add_argument("--split", choices=("train", "test"), default="train")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--difficulty", nargs="*", metavar="KEY=VALUE", help="e.g. min_len=9 max_len=16")
    gen.add_argument("--train-n", type=int, default=None, help="size of the train split to exclude (test)")
    gen.add_argument("--train-difficulty", nargs="*", metavar="KEY=VALUE",
                     help="difficulty of the train split to exclude (test; default: --difficulty)")
    gen.add_argument("--out", required=True, help="output .jsonl path (e.g. data/procedural/sort-test.jsonl)")
    ver = verbs.add_parser("verify", help="re-verify every sample of a JSONL file")
    ver.add_argument("path")
    proc.set_defaults(func=run_procedural)
    return proc


def run_procedural(args: argparse.Namespace) -> int:
    from recurdepth.data.procedural import (generate_split, get_task, list_rg_tasks, list_tasks, read_jsonl,
                                            verify_sample, write_jsonl)

    if args.procedural == "list":
        if args.rg:
            print("\n".join(list_rg_tasks()))
        else:
            for name in list_tasks():
                task = get_task(name)
                print(f"{name}: {task.description}; difficulty {json.dumps(dict(task.default_difficulty))}")
        return 0
    if args.procedural == "generate":
        samples = generate_split(args.task, args.n, args.split, _kv(args.difficulty), args.seed,
                                 train_n=args.train_n, train_difficulty=_kv(args.train_difficulty))
        write_jsonl(samples, args.out)
        print(f"wrote {len(samples)} verified {args.task} {args.split} samples to {args.out}")
        return 0
    samples = read_jsonl(args.path)
    bad = [i for i, s in enumerate(samples, 1) if not verify_sample(s)]
    print(f"{len(samples) - len(bad)}/{len(samples)} samples verified" +
          (f"; failing lines: {', '.join(map(str, bad[:20]))}" if bad else ""))
    return 1 if bad else 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recurdepth.data.procedural")
    add_procedural_parser(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
    except RecurdepthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
