"""SWEEP.yaml -> the sweep's runs, every one validated and sized before anything is written.

    base: configs/tiny.yaml          # the config every run starts from
    out: runs/sweep                  # results.jsonl, sweep.json, runs/<variant>/, sweep.sbatch
    overrides: [data.cache_dir=...]  # every run (a list of section.key=value, or a mapping section.key: value)
    budgets: [3e12, 1e13, 3e13]      # model FLOPs per rung, smallest first (rung 0)
    seeds: [0, 1]                    # every rung; or one list per rung: [[0, 1, 2], [0, 1], [0, 1]]
    families:                        # the variants compared, e.g. dense vs looped
      looped: {overrides: [recurrence.mean=4]}
      wide:                          # per-rung overrides: one entry per budget (e.g. the width ladder)
        overrides: {recurrence.mean: 2}
        rungs: [[model.hidden_size=64], [model.hidden_size=96], [model.hidden_size=128]]
    eval: {test_depths: [4, 16], n: 100, points: 4}
    parallel: 1                      # runs at a time (local)
    nproc: 1                         # ranks per run (torchrun when > 1; GPUs per array task on slurm)
    slurm: {time: "04:00:00", partition: gpu, account: null, cpus_per_task: null, signal_seconds: 300,
            requeue: false, job_name: null}

A run is family x rung x seed, named `<family>-r<rung>-s<seed>` (its `variant`), trained by
`recurdepth train BASE <overrides> <family overrides> <rung overrides> train.seed=S train.steps=N
train.run_dir=OUT/runs/<variant> train.eval_interval=I` in that order. train.steps is sized to the rung's
budget (`sizing.py`); train.eval_interval is the largest divisor of N giving at least `eval.points`
evaluations, so the last step is always evaluated (the final validation loss). Those four keys belong to the
sweep: setting them in overrides is refused. Relative paths (base, out, and those in configs) are relative to
the directory `recurdepth sweep` runs in; the job array runs there too. Every error is one ConfigError line
naming the key (and the family and rung), raised before the out directory exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from recurdepth.config import Config, _suggest, load_config, read_yaml_mapping
from recurdepth.errors import ConfigError, RecurdepthError
from recurdepth.sweep.sizing import Sizing, is_dense, size_run

TOP_KEYS = {"base", "out", "overrides", "budgets", "seeds", "families", "eval", "parallel", "nproc", "slurm"}
FAMILY_KEYS = {"overrides", "rungs"}
EVAL_KEYS = {"test_depths", "n", "points"}
SLURM_KEYS = {"time", "partition", "account", "cpus_per_task", "signal_seconds", "requeue", "job_name"}
OWNED = ("train.steps", "train.seed", "train.run_dir", "train.eval_interval")  # the sweep sets these


@dataclass(frozen=True)
class EvalSpec:
    """Verified procedural accuracy after training at each of `test_depths` (`n` samples per task), and
    validation at least `points` times during training."""

    test_depths: tuple = (4, 16)
    n: int = 100
    points: int = 4


@dataclass(frozen=True)
class RunPlan:
    """One run of the sweep: its place (family, rung, seed), the overrides it trains with, and its sizing."""

    index: int
    variant: str
    family: str
    rung: int
    seed: int
    budget_flops: float
    overrides: tuple  # after the base config; the sweep's own keys last
    run_dir: Path
    eval_interval: int
    sizing: Sizing
    config_hash: str
    tokenizer: str
    dataset: str
    has_procedural: bool
    dense: bool  # model.kind=dense: no accuracy yet (`recurdepth eval` decodes looped models only)


@dataclass(frozen=True)
class Sweep:
    path: Path
    base: Path
    out: Path
    runs: list
    eval: EvalSpec
    parallel: int = 1
    nproc: int = 1
    slurm: dict = field(default_factory=dict)

    @property
    def results_path(self) -> Path:
        return self.out / "results.jsonl"

    def plan_json(self) -> str:
        """The resolved plan, written to `<out>/sweep.json` for the record."""
        runs = [{"index": r.index, "variant": r.variant, "family": r.family, "rung": r.rung, "seed": r.seed,
                 "budget_flops": r.budget_flops, "steps": r.sizing.steps, "model_flops": r.sizing.model_flops,
                 "eval_interval": r.eval_interval, "config_hash": r.config_hash, "overrides": list(r.overrides)}
                for r in self.runs]
        return json.dumps({"sweep": str(self.path), "base": str(self.base), "runs": runs}, indent=1) + "\n"


def load_sweep(path) -> Sweep:
    """Read SWEEP.yaml (module docstring), validate and size every run; one ConfigError line otherwise."""
    path = Path(path)
    raw = _read_yaml(path)
    _known(raw, TOP_KEYS, "")
    for key in ("base", "out", "budgets", "families"):
        if key not in raw:
            raise ConfigError(f"{path} has no {key}: key; a sweep needs base, out, budgets and families")
    base, out = Path(str(raw["base"])), Path(str(raw["out"])).resolve()
    if not base.is_file():
        raise ConfigError(f"base: config file {str(base)!r} not found; give a YAML config such as configs/tiny.yaml")
    budgets = _budgets(raw["budgets"])
    seeds = _seeds(raw.get("seeds", [0]), len(budgets))
    common = _overrides(raw.get("overrides"), "overrides")
    ev = _eval(raw.get("eval") or {})
    parallel, nproc = _count(raw.get("parallel", 1), "parallel"), _count(raw.get("nproc", 1), "nproc")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise ConfigError(f"slurm: {slurm!r} must be a mapping, e.g. {{time: '04:00:00', partition: gpu}}")
    _known(slurm, SLURM_KEYS, "slurm.")
    families = raw["families"]
    if not isinstance(families, dict) or not families:
        raise ConfigError("families: must map each family name to its overrides, e.g. {looped: {overrides: "
                          "[recurrence.mean=4]}}")
    runs: list = []
    for name, spec in families.items():
        for rung, budget in enumerate(budgets):
            where = f"family {name!r} rung {rung}"
            overrides = common + _family_overrides(name, spec, rung, len(budgets))
            for seed in seeds[rung]:
                runs.append(_plan_run(len(runs), base, out, str(name), rung, seed, budget, overrides, ev, where))
    return Sweep(path, base, out, runs, ev, parallel, nproc, slurm)


def _plan_run(index, base, out, family, rung, seed, budget, overrides, ev, where) -> RunPlan:
    from recurdepth.plan.shape import resolve_vocab_size

    variant = f"{family}-r{rung}-s{seed}"
    run_dir = out / "runs" / variant
    try:
        cfg = load_config(base, [*overrides, f"train.seed={seed}", f"train.run_dir={run_dir}"])
        sizing = size_run(cfg, resolve_vocab_size(cfg), budget, where)
    except RecurdepthError as exc:
        raise ConfigError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    interval = eval_interval(sizing.steps, ev.points)
    owned = (f"train.seed={seed}", f"train.steps={sizing.steps}", f"train.run_dir={run_dir}",
             f"train.eval_interval={interval}")
    cfg = load_config(base, [*overrides, *owned])
    return RunPlan(index, variant, family, rung, seed, float(budget), tuple(overrides) + owned, run_dir, interval,
                   sizing, config_hash(cfg), tokenizer_id(cfg), dataset_id(cfg),
                   any("procedural" in s for s in cfg.data.sources), is_dense(cfg))


def eval_interval(steps: int, points: int) -> int:
    """steps // j for the smallest divisor j >= points of steps: at least `points` evaluations, the last at the
    final step (a prime number of steps is evaluated every step)."""
    j = next(j for j in range(min(points, steps), steps + 1) if steps % j == 0)
    return steps // j


# ------------------------------------------------------------------ ids of a run's config, tokenizer, data

def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash(cfg: Config) -> str:
    """The resolved config, less where it writes (train.run_dir, checkpoint.dir, data.cache_dir)."""
    d = cfg.to_dict()
    d["train"].pop("run_dir"), d["checkpoint"].pop("dir"), d["data"].pop("cache_dir")
    return _digest(d)


def tokenizer_id(cfg: Config) -> str:
    """`byte:<vocab>:<fingerprint>`, `sentencepiece:<vocab>:<sha256 of the model file>` or
    `hf:<vocab>:<fingerprint of tokenizer.json and its config files>` (`hf_fingerprint`)."""
    from recurdepth.data.tokenizer import build_tokenizer

    tok = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model)
    return f"{cfg.data.tokenizer}:{tok.vocab_size}:{tok.fingerprint()}"


def dataset_id(cfg: Config) -> str:
    """The data mix (sources, weights, split, builtin size), less where it is cached and the tokenizer."""
    d = {k: v for k, v in cfg.to_dict()["data"].items() if k not in ("cache_dir", "tokenizer", "tokenizer_model")}
    return "mix-" + _digest(d)


# ------------------------------------------------------------------ the YAML's pieces

def _read_yaml(path: Path) -> dict:
    return read_yaml_mapping(path, "sweep file", "configs/compare/sweep.yaml",
                             "a mapping (base:, out:, budgets:, families:, ...)")


def _known(raw: dict, keys: set, prefix: str) -> None:
    for key in raw:
        if key not in keys:
            raise ConfigError(f"unknown sweep key {prefix}{key}{_suggest(str(key), keys, prefix=prefix)}")


def _number(value) -> Optional[float]:
    if isinstance(value, str):  # PyYAML reads 3e12 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _budgets(raw) -> list:
    values = [_number(v) for v in raw] if isinstance(raw, list) else [None]
    if not values or any(v is None or not v > 0 or v == float("inf") for v in values):
        raise ConfigError(f"budgets: {raw!r} must be a list of model FLOPs per rung, e.g. [3e12, 1e13, 3e13]")
    if values != sorted(values) or len(set(values)) != len(values):
        raise ConfigError(f"budgets: {raw!r} must increase (rung 0 is the smallest); sort them")
    return values


def _seeds(raw, rungs: int) -> list:
    """Seeds per rung: one list for every rung, or a list of lists, one per rung."""
    def ints(xs):
        return isinstance(xs, list) and xs and all(isinstance(x, int) and not isinstance(x, bool) for x in xs) \
            and len(set(xs)) == len(xs)
    if ints(raw):
        return [list(raw)] * rungs
    if isinstance(raw, list) and len(raw) == rungs and all(ints(x) for x in raw):
        return [list(x) for x in raw]
    raise ConfigError(f"seeds: {raw!r} must be a list of distinct integers (every rung), or one such list per rung "
                      f"({rungs} lists), e.g. [[0, 1, 2], [0, 1], [0, 1]]")


def _overrides(raw, where: str) -> list:
    """A list of `section.key=value` strings, or a mapping section.key -> value, as override strings."""
    if raw is None:
        return []
    if isinstance(raw, dict):
        items = [f"{k}={json.dumps(v)}" for k, v in raw.items()]
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        items = list(raw)
    else:
        raise ConfigError(f"{where}: {raw!r} must be a list of section.key=value or a mapping section.key: value")
    for item in items:
        key = item.split("=", 1)[0].strip()
        if key in OWNED:
            how = "seeds:" if key == "train.seed" else "out:" if key == "train.run_dir" else \
                "eval.points" if key == "train.eval_interval" else "budgets:"
            raise ConfigError(f"{where}: {key} is set by the sweep (from {how}); remove it")
    return items


def _family_overrides(name, spec, rung: int, rungs: int) -> list:
    where = f"family {name!r}"
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: {spec!r} must be a mapping with overrides: and optionally rungs:")
    _known(spec, FAMILY_KEYS, f"families.{name}.")
    out = _overrides(spec.get("overrides"), f"{where} overrides")
    per_rung = spec.get("rungs")
    if per_rung is not None:
        if not isinstance(per_rung, list) or len(per_rung) != rungs:
            raise ConfigError(f"{where} rungs: give one entry of overrides per budget ({rungs}), e.g. "
                              f"[[model.hidden_size=64], [model.hidden_size=96]]")
        out += _overrides(per_rung[rung], f"{where} rung {rung} overrides")
    return out


def _count(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: {value!r} must be an integer >= 1")
    return value


def _eval(raw) -> EvalSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"eval: {raw!r} must be a mapping, e.g. {{test_depths: [4, 16], n: 100}}")
    _known(raw, EVAL_KEYS, "eval.")
    depths = raw.get("test_depths", list(EvalSpec.test_depths))
    if not isinstance(depths, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
        raise ConfigError(f"eval.test_depths: {depths!r} must be a list of depths r >= 1, e.g. [4, 16] ([] = none)")
    return EvalSpec(tuple(sorted(set(depths))), _count(raw.get("n", EvalSpec.n), "eval.n"),
                    _count(raw.get("points", EvalSpec.points), "eval.points"))
