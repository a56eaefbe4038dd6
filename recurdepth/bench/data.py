"""`recurdepth bench data`: throughput and memory of `recurdepth data preprocess`.

Conventions: the corpus is stdlib docstrings written as JSONL (repeated, in shuffled order, up to the
asked size). `raw encode` = one process calling sentencepiece's `encode` per document on the same text
(the baseline); `preprocess` = the full pipeline (read, parse, tokenize in workers, write .bin/.idx,
manifest). Speed-up = preprocess tokens/s / raw tokens/s. Memory = peak resident set of the
preprocess main process and of its largest worker, each run in a fresh process, at two corpus sizes:
flat peaks mean memory does not grow with corpus size.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Stdlib docstrings as JSONL, repeated in shuffled order up to `megabytes`; returns documents written."""
    from recurdepth.data.builtin_corpus import stdlib_documents

    docs = list(stdlib_documents(int(20e6)))
    rng, target, written, n = random.Random(seed), int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            rng.shuffle(docs)
            for doc in docs:
                line = json.dumps({"text": doc}) + "\n"
                f.write(line)
                written, n = written + len(line), n + 1
                if written >= target:
                    break
    return n


def _raw_encode(corpus: Path, model: str) -> tuple[int, float]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model)
    texts = [json.loads(line)["text"] for line in open(corpus)]
    start = time.perf_counter()
    tokens = sum(len(sp.encode(t)) for t in texts)
    return tokens, time.perf_counter() - start


def _child(args) -> int:
    from recurdepth.data.preprocess import preprocess

    out = preprocess([args.corpus], args.out, args.model, workers=args.workers, progress=False)
    print(json.dumps({"tokens": out["tokens"], "seconds": out["seconds"],
                      "main_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
    return 0


def _run_child(corpus: Path, out: Path, model: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "recurdepth", "bench", "data", "--child", "--corpus", str(corpus),
           "--out", str(out), "--model", model, "--workers", str(workers)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        sys.stderr.write(res.stderr[-3000:])
        raise SystemExit(res.returncode)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_data_bench(args) -> int:
    if args.child:
        return _child(args)
    from recurdepth.data.tokenizer_train import train_tokenizer

    sizes = [float(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="recurdepth-bench-data-") as tmp:
        tmp = Path(tmp)
        corpora = {}
        for mb in sizes:
            corpora[mb] = tmp / f"corpus-{mb:g}mb.jsonl"
            write_corpus(corpora[mb], mb)
        model = args.model
        if model is None:
            train_tokenizer([corpora[sizes[0]]], tmp / "spm", vocab_size=args.vocab_size, input_sentence_size=200_000)
            model = str(tmp / "spm.model")
        small = corpora[sizes[0]]
        raw_tokens, raw_s = _raw_encode(small, model)
        rows = [_run_child(small, tmp / f"w{w}", model, w) for w in (1, args.workers)]
        mem = [_run_child(corpora[mb], tmp / f"m{mb:g}", model, args.workers) for mb in sizes]
    raw_tps = raw_tokens / raw_s
    print(f"data pipeline, corpus {sizes[0]:g} MB of stdlib-docstring JSONL, sentencepiece vocab "
          f"{args.vocab_size if args.model is None else 'given'} (one run; the machine is shared, compare ratios)")
    print(f"{'run':<28} {'tokens':>12} {'seconds':>9} {'tokens/s':>12} {'vs raw':>8}")
    print(f"{'raw sp.encode, 1 process':<28} {raw_tokens:>12,} {raw_s:>9.2f} {raw_tps:>12,.0f} {1.0:>8.2f}")
    for w, row in zip((1, args.workers), rows):
        tps = row["tokens"] / row["seconds"]
        print(f"{f'preprocess, {w} worker(s)':<28} {row['tokens']:>12,} {row['seconds']:>9.2f} {tps:>12,.0f} "
              f"{tps / raw_tps:>8.2f}")
    print(f"\npeak memory of preprocess ({args.workers} workers) vs corpus size")
    print(f"{'corpus MB':>10} {'tokens':>12} {'main MiB':>10} {'worker MiB':>11}")
    for mb, row in zip(sizes, mem):
        print(f"{mb:>10g} {row['tokens']:>12,} {row['main_peak_mb']:>10.0f} {row['worker_peak_mb']:>11.0f}")
    return 0


def add_data_bench_parser(subs) -> None:
    p = subs.add_parser("data", help="preprocess tokens/s vs raw sentencepiece encode; memory vs corpus size")
    p.add_argument("--sizes", default="10,100", help="corpus sizes in MB (default 10,100); throughput uses the first")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model", default=None, help="a sentencepiece .model (default: train one on the corpus)")
    p.add_argument("--quick", action="store_true", help="tiny corpora, for CI")
    p.add_argument("--child", action="store_true", help=argparse_suppress())
    p.add_argument("--corpus", help=argparse_suppress())
    p.add_argument("--out", help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS
