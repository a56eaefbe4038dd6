"""reasoning-gym tasks by name (`rg:<name>`), scored by reasoning-gym's own `score_answer`.

`reasoning_gym` is imported lazily (only when an `rg:` task is used). A reasoning-gym entry needs its
metadata to be scored, so every rg `Sample` keeps `meta`: a JSON string with the dataset name, config,
seed, size and index (which regenerate the entry exactly) and the entry itself (a fallback when the entry
cannot be regenerated, e.g. under another reasoning-gym version).
"""

from __future__ import annotations

import difflib
import json
import random
from functools import lru_cache
from typing import Any, Iterator, Mapping, Optional

from recurdepth.data.procedural.base import Sample, Task, corrupt_generic
from recurdepth.errors import DataError

PREFIX = "rg:"
RG_VERSION = "0.1.25"
INSTALL = f"pip install reasoning-gym=={RG_VERSION}"


def _rg():
    try:
        import reasoning_gym  # noqa: F401
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:
        raise DataError(f"reasoning-gym tasks need the reasoning-gym package: {INSTALL} ({exc})") from None
    return reasoning_gym, DATASETS


def rg_names() -> list[str]:
    """Names of reasoning-gym's datasets (without the `rg:` prefix)."""
    return sorted(_rg()[1])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if hasattr(obj, "__dict__"):
        return {k: v for k, v in vars(obj).items() if not k.startswith("_")}
    return repr(obj)


def _config_key(config: Optional[Mapping[str, Any]]) -> str:
    return json.dumps(dict(config or {}), sort_keys=True, default=_jsonable)


@lru_cache(maxsize=64)
def _dataset(name: str, config_json: str, seed: int, size: int):
    reasoning_gym, _ = _rg()
    try:
        return reasoning_gym.create_dataset(name, seed=seed, size=size, **json.loads(config_json))
    except (TypeError, ValueError, AssertionError) as exc:
        raise DataError(f"reasoning-gym task {name!r} rejected its configuration {config_json}: {exc}") from None


class RGTask(Task):
    """A reasoning-gym dataset as a task. `difficulty` is passed to its config (e.g. {"min_terms": 2});
    `verify(prompt, answer)` cannot work without the entry's metadata: use `registry.verify_sample`."""

    def __init__(self, rg_name: str):
        _, datasets = _rg()
        if rg_name not in datasets:
            close = difflib.get_close_matches(rg_name, datasets, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(PREFIX + c for c in close)}? " if close else ""
            raise DataError(f"unknown reasoning-gym task {rg_name!r}: {hint}"
                            f"list them with recurdepth.data.procedural.list_rg_tasks()")
        self.rg_name = rg_name
        self.name = PREFIX + rg_name
        self.description = f"reasoning-gym {rg_name}"
        self.default_difficulty = {}
        self.difficulty_keys = {"*": "any field of the reasoning-gym dataset's config"}

    def resolve(self, difficulty=None) -> dict:
        return dict(difficulty or {})

    def dataset(self, difficulty: Optional[Mapping[str, Any]], seed: int, size: int):
        return _dataset(self.rg_name, _config_key(difficulty), int(seed), int(size))

    def sample_at(self, ds, config_json: str, seed: int, size: int, index: int) -> Sample:
        entry = ds[index]
        meta = json.dumps({"dataset": self.rg_name, "config": json.loads(config_json), "seed": seed,
                           "size": size, "index": index, "entry": entry}, sort_keys=True, default=_jsonable)
        answer = "" if entry["answer"] is None else str(entry["answer"])  # None: no gold answer, scorer only
        return Sample(self.name, str(entry["question"]), answer, (), meta)

    def iter_samples(self, difficulty: Optional[Mapping[str, Any]], seed: int, size: int) -> Iterator[Sample]:
        """Entries 0..size-1 of the dataset with this seed, as samples."""
        config_json = _config_key(difficulty)
        ds = self.dataset(difficulty, seed, size)
        for i in range(size):
            yield self.sample_at(ds, config_json, seed, size, i)

    def generate(self, rng: random.Random, difficulty=None) -> Sample:
        seed = rng.randrange(2 ** 31)
        return next(self.iter_samples(difficulty, seed, 1))

    def solve(self, prompt):
        return None

    def verify(self, prompt, answer):
        raise DataError(f"{self.name}: reasoning-gym answers are scored with the entry's metadata; "
                        f"use recurdepth.data.procedural.verify_sample(sample, answer)")

    def entry_for(self, sample: Sample) -> tuple[Any, Optional[dict]]:
        """(dataset, entry) behind `sample`: the entry regenerated from (config, seed, size, index) when that
        reproduces the prompt, else the stored copy (with dataset None) if it matches the prompt, else
        (None, None)."""
        if not sample.meta or sample.task != self.name:
            return None, None
        try:
            meta = json.loads(sample.meta)
        except json.JSONDecodeError:
            return None, None
        try:
            ds = _dataset(meta["dataset"], _config_key(meta.get("config")), int(meta["seed"]), int(meta["size"]))
            entry = ds[int(meta["index"])]
            if str(entry["question"]) == sample.prompt:
                return ds, entry
        except Exception:  # noqa: BLE001 - fall back to the stored entry
            pass
        stored = meta.get("entry")
        if isinstance(stored, dict) and str(stored.get("question")) == sample.prompt:
            return None, stored
        return None, None

    def score(self, sample: Sample, answer: Optional[str] = None) -> float:
        """reasoning-gym's own score (1.0 = correct) of `answer` (default: the sample's gold answer);
        0.0 when the entry cannot be recovered or the scorer fails on the answer."""
        ds, entry = self.entry_for(sample)
        if entry is None:
            return 0.0
        try:
            if ds is None:
                reasoning_gym, _ = _rg()
                scorer = reasoning_gym.get_score_answer_fn(self.rg_name)
            else:
                scorer = ds.score_answer
            return float(scorer(sample.answer if answer is None else answer, entry))
        except Exception:  # noqa: BLE001 - a scorer that crashes on an answer scores it 0
            return 0.0

    def corrupt(self, sample, rng):
        return corrupt_generic(sample.answer, rng)
