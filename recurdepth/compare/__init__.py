"""`recurdepth compare RESULTS --baseline NAME --candidate NAME`: compute multipliers of one family of a sweep
against another (issue 18). results.py reads and checks the table, fit.py fits the laws, analysis.py compares,
report.py prints and writes. Every check runs before the output directory exists, so a refused command writes
nothing. The method, its assumptions and how to read the output: docs/compare.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_compare_parser(verbs) -> None:
    p = verbs.add_parser("compare", help="compute multipliers of one sweep family against another: recurdepth "
                                         "compare RESULTS --baseline NAME --candidate NAME")
    p.add_argument("results", help="the sweep's results.jsonl (one JSON object per finished run) or its directory")
    p.add_argument("--baseline", required=True, help="family whose L(C) is fitted, e.g. dense")
    p.add_argument("--candidate", required=True, help="family compared against it, e.g. looped")
    p.add_argument("--out", default=None,
                   help="output directory (default: compare-<baseline>-vs-<candidate>/ beside the results file)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws (default 0)")
    p.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    p.set_defaults(func=run_compare)


def run_compare(args: argparse.Namespace) -> int:
    from recurdepth.compare.analysis import compare
    from recurdepth.compare.report import default_out_dir, table, verdict, write_outputs
    from recurdepth.compare.results import read_results
    from recurdepth.errors import DataError

    results = read_results(args.results)
    out = Path(args.out) if args.out else default_out_dir(results.path, args.baseline, args.candidate)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; give a directory")
    comparison = compare(results, args.baseline, args.candidate, args.bootstrap, args.seed, args.level)
    line = verdict(comparison)
    written = write_outputs(comparison, {n: results.family(n) for n in (args.baseline, args.candidate)}, out, line)
    print(table(comparison))
    print(f"wrote {', '.join(str(p) for p in written.values())}")
    print(line, flush=True)
    return 0
