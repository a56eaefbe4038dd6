"""Deterministic, verified train/test splits that never share a sample, and their JSONL files.

Each split draws from its own seed (derived from task, split and seed), every sample is verified before it
is returned, and a test split drops any sample whose `sample_hash` (sha256 of the prompt) occurs in the
train split generated with the same arguments (or `train_n`/`train_difficulty` when those differ).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from typing import Any, Iterable, Mapping, Optional

from recurdepth.atomic import write_atomically
from recurdepth.data.procedural.base import Sample
from recurdepth.data.procedural.registry import get_task, verify_sample
from recurdepth.data.procedural.rg import RGTask
from recurdepth.errors import DataError

SPLITS = ("train", "test")


def sample_hash(sample: Sample) -> str:
    """sha256 of the prompt: two samples with the same prompt are the same question."""
    return hashlib.sha256(sample.prompt.encode("utf-8")).hexdigest()


def disjoint(train: Iterable[Sample], test: Iterable[Sample]) -> bool:
    """True when no test sample has the hash of a train sample."""
    seen = {sample_hash(s) for s in train}
    return not any(sample_hash(s) in seen for s in test)


def derive_seed(task_name: str, split: str, seed: int, chunk: int = 0) -> int:
    digest = hashlib.sha256(f"{task_name}\0{split}\0{seed}\0{chunk}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # < 2**31: fits every reasoning-gym seed


def generate_split(task_name: str, n: int, split: str, difficulty: Optional[Mapping[str, Any]] = None,
                   seed: int = 0, *, train_n: Optional[int] = None,
                   train_difficulty: Optional[Mapping[str, Any]] = None,
                   exclude: Optional[Iterable[str]] = None) -> list[Sample]:
    """`n` verified samples of `task_name` for `split` ("train" or "test"), deterministic in the arguments.

    The test split excludes (by `sample_hash`) the train split of the same task and seed, drawn with
    `train_n` samples (default `n`) at `train_difficulty` (default `difficulty`), plus any hashes in
    `exclude`. An own task whose generator yields a sample its verifier rejects raises RuntimeError (a bug);
    a reasoning-gym entry whose gold answer its own scorer rejects is skipped.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"number of samples must be a non-negative integer, got {n!r}")
    task = get_task(task_name)
    d = task.resolve(difficulty)
    excluded = set(exclude or ())
    if split == "test" and n:
        train = generate_split(task_name, n if train_n is None else train_n, "train",
                               difficulty if train_difficulty is None else train_difficulty, seed)
        excluded.update(sample_hash(s) for s in train)
    if isinstance(task, RGTask):
        return _rg_split(task, n, split, d, seed, excluded)

    rng = random.Random(derive_seed(task.name, split, seed))
    out: list[Sample] = []
    skipped, budget = 0, max(1000, 10 * n)
    while len(out) < n:
        sample = task.generate(rng, d)
        if excluded and sample_hash(sample) in excluded:
            skipped += 1
            if skipped > budget:
                raise DataError(f"task {task.name!r}: cannot draw {n} test samples unseen in train at difficulty "
                                f"{d} (only {len(out)} after {skipped} repeats); raise the test difficulty")
            continue
        if not task.verify(sample.prompt, sample.answer):
            raise RuntimeError(f"bug: task {task.name!r} generated a sample its verifier rejects: {sample!r}")
        out.append(sample)
    return out


def _rg_split(task: RGTask, n: int, split: str, d: dict, seed: int, excluded: set) -> list[Sample]:
    out: list[Sample] = []
    rejected = skipped = 0
    chunk = 0
    while len(out) < n:
        need = n - len(out)
        size = need if chunk == 0 else need + 16
        for sample in task.iter_samples(d, derive_seed(task.name, split, seed, chunk), size):
            if excluded and sample_hash(sample) in excluded:
                skipped += 1
                continue
            if not verify_sample(sample):
                if sample.answer == "" and json.loads(sample.meta)["entry"].get("answer") is None:
                    raise DataError(f"task {task.name!r} has no gold answers (reasoning-gym only scores free-form "
                                    f"solutions to it), so it cannot be written as prompt/answer pairs")
                rejected += 1
                continue
            out.append(sample)
            if len(out) == n:
                break
        chunk += 1
        if rejected > max(100, n) or skipped > max(1000, 10 * n):
            raise DataError(f"task {task.name!r}: only {len(out)} of {n} usable samples ({rejected} gold answers "
                            f"rejected by reasoning-gym's scorer, {skipped} repeats of train samples)")
    return out


def _to_record(sample: Sample) -> dict:
    record = {"task": sample.task, "prompt": sample.prompt, "answer": sample.answer, "steps": list(sample.steps)}
    if sample.meta is not None:
        record["meta"] = sample.meta
    return record


def write_jsonl(samples: Iterable[Sample], path) -> None:
    """One JSON object per line ({"task", "prompt", "answer", "steps"}, plus "meta" for reasoning-gym
    samples), written atomically (`recurdepth.atomic.write_atomically`: tmp file, fsync, rename, fsync dir)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, "".join(json.dumps(_to_record(s), ensure_ascii=False) + "\n" for s in samples))


def read_jsonl(path) -> list[Sample]:
    """Samples written by `write_jsonl`; a missing file or a malformed line -> DataError."""
    path = os.fspath(path)
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    out.append(Sample(str(r["task"]), str(r["prompt"]), str(r["answer"]),
                                      tuple(str(x) for x in r.get("steps", ())), r.get("meta")))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                    raise DataError(f"{path}:{lineno}: not a procedural sample ({type(exc).__name__}: {exc})") \
                        from None
    except OSError as exc:
        raise DataError(f"cannot read procedural samples from {path}: {exc.strerror or exc}") from None
    return out
