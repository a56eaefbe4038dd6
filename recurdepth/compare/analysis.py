"""What `recurdepth compare` computes: how much compute the baseline family needs to match the candidate.

Conventions (docs/compare.md has the method at length).
- Seeds are aggregated per rung: a rung's loss is the geometric mean of its seeds' final_val_loss, its compute
  (model FLOPs, hardware FLOPs, wall seconds, tokens) the geometric mean of theirs. A row without `rung` is
  grouped by its model FLOPs.
- The baseline's L(C) = E + A (C / C0)^-alpha is fitted once per matching: C = model FLOPs, hardware FLOPs or
  wall seconds, and separately L(D) over tokens. Compute multiplier at a candidate rung:
  CM = C_base(L_cand) / C_cand, > 1 when the candidate reaches its loss with less compute than the baseline
  would need. L_cand <= E means the baseline never reaches that loss: CM is infinite (reported, not fitted).
- The headline multiplier of a matching is the geometric mean of CM over the rungs where CM is finite; the trend
  is the least-squares slope of log CM on log C (model FLOPs) over those rungs, and the extrapolation is that
  straight line at 10x and 100x the largest rung's C: it assumes the trend stays straight, beyond the data.
- FLOP-matched delta = L_cand - L_base_fit(C_cand) (model FLOPs); token-matched delta = L_cand -
  L_base_fit(D_cand). Negative is better for the candidate. The two can disagree in sign.
- Intervals are percentile intervals (default 90%) of a residual bootstrap in log loss: each replicate adds to
  every baseline run's fitted log loss a residual drawn with replacement from a pool, refits every law, and moves
  each candidate rung's log loss by the mean of as many draws as it has seeds. The pool is the baseline's
  model-FLOP fit residuals scaled by sqrt(n / (n - 3)) and the candidate's deviations from its rung means scaled
  by sqrt(n_j / (n_j - 1)): noise is assumed the same in both families and at every rung. With few residuals
  the interval is also widened by t_df / z at its level (df = n - 3 + sum (n_j - 1)), Hesterberg's "expanded
  percentile" correction, so that it widens like a t interval would. (Resampling whole runs within a rung
  instead halves the variance when a rung has two seeds and gives intervals far too narrow.)
- phi: the recurrence-equivalence law of fit.py fitted to the candidate's runs when their depth r varies, with
  the same bootstrap on its own residuals (scaled by sqrt(n / (n - 6)) and t_{n-6} / z).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Optional

import numpy as np

from recurdepth.compare.fit import (PowerLaw, RecurrenceLaw, fit_power_law, fit_recurrence_law, invert_power_law,
                                    refit_power_law, refit_recurrence_phi)
from recurdepth.compare.results import Results, check_families
from recurdepth.errors import DataError

MATCHINGS = {"model_flops": "model FLOPs", "hardware_flops": "hardware FLOPs", "wall_seconds": "wall-clock"}
EXTRAPOLATION_FACTORS = (10, 100)
ACCURACY_MARGIN = 1.1  # a candidate rung within this factor outside the baseline's C range uses the edge rung
MIN_POINTS = 3


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval [lo, hi]; values may be inf (a multiplier that is undefined
    because the loss lies below the baseline's asymptote)."""

    value: float
    lo: float
    hi: float

    def side(self, null: float) -> int:
        """+1 when the whole interval lies above `null`, -1 below, 0 when it contains it."""
        return 1 if self.lo > null else -1 if self.hi < null else 0

    def to_dict(self) -> dict:
        return {"value": _json_number(self.value), "lo": _json_number(self.lo), "hi": _json_number(self.hi)}


@dataclass
class Fit:
    """One baseline law with the bootstrap intervals of E and alpha."""

    x: str
    law: PowerLaw
    points: int
    E: Interval
    alpha: Interval

    def to_dict(self) -> dict:
        return {"x": self.x, "E": self.E.to_dict(), "A": self.law.A, "alpha": self.alpha.to_dict(),
                "C0": self.law.C0, "points": self.points}


@dataclass
class RungResult:
    """One candidate rung, seeds aggregated: its compute, loss and every comparison made at it."""

    rung: int
    seeds: int
    compute: dict  # key of MATCHINGS or "tokens" -> the rung's geometric-mean value
    loss: float
    multiplier: dict = field(default_factory=dict)  # matching -> Interval
    flop_matched: Optional[Interval] = None
    token_matched: Optional[Interval] = None
    accuracy: dict = field(default_factory=dict)  # name -> {"candidate", "baseline", "difference"}


@dataclass
class Comparison:
    """Everything `compare` found: per-rung results, per-matching headline multipliers, trend, phi, notes."""

    baseline: str
    candidate: str
    results_path: str
    level: float
    bootstrap: int
    seed: int
    fits: dict  # key of MATCHINGS or "tokens" -> Fit
    rungs: list
    baseline_seeds: list  # seeds per baseline rung, smallest rung first
    multiplier: dict = field(default_factory=dict)  # matching -> Interval over rungs (geometric mean)
    trend: Optional[Interval] = None
    extrapolation: dict = field(default_factory=dict)  # factor -> (C, Interval)
    flop_matched: Optional[Interval] = None
    token_matched: Optional[Interval] = None
    phi: Optional[Interval] = None
    phi_law: Optional[RecurrenceLaw] = None
    noise_estimated: bool = True  # False: 3 baseline runs and no repeated seeds, so every interval is a point
    notes: list = field(default_factory=list)

    def undefined_rungs(self, matching: str = "model_flops") -> list:
        return [r.rung for r in self.rungs if matching in r.multiplier and math.isinf(r.multiplier[matching].value)]


def compare(results: Results, baseline: str, candidate: str, bootstrap: int = 1000, seed: int = 0,
            level: float = 0.9, matchings=tuple(MATCHINGS) + ("tokens",)) -> Comparison:
    """Compare family `candidate` against family `baseline` of checked `results` (see the module docstring);
    `matchings` limits the laws fitted (model_flops always is). Raises DataError when the baseline has fewer
    than 3 distinct model-FLOP values (no fit)."""
    check_families(results, baseline, candidate)
    if bootstrap < 1 or not 0 < level < 1:
        raise DataError(f"--bootstrap {bootstrap} / --level {level}: use at least 1 replicate and a level in (0, 1)")
    base_rows, cand_rows = results.family(baseline), results.family(candidate)
    distinct = _distinct(row["model_flops"] for row in base_rows)
    if distinct < MIN_POINTS:
        raise DataError(f"--baseline {baseline!r} has {distinct} distinct model_flops value(s) in {results.path}; a "
                        f"fit of E + A C^-alpha needs at least {MIN_POINTS} rungs")
    rng = np.random.default_rng(seed)
    groups = group_rungs(cand_rows)
    base_groups = group_rungs(base_rows)
    out = Comparison(baseline, candidate, str(results.path), level, bootstrap, seed, {}, [],
                     [len(g) for _, g in base_groups])
    keys = ["model_flops"] + [k for k in MATCHINGS if k in matchings and k != "model_flops"
                              and _has(base_rows + cand_rows, k, out.notes)] + ["tokens"] * ("tokens" in matchings)
    base_loss = np.log([row["final_val_loss"] for row in base_rows])
    for key in keys:
        values = [row[key] for row in base_rows]
        if _distinct(values) < MIN_POINTS:
            out.notes.append(f"{key}: the baseline has fewer than {MIN_POINTS} distinct values; not fitted")
            continue
        out.fits[key] = fit_power_law(values, np.exp(base_loss))
    _, residuals = out.fits["model_flops"]
    pool = _noise_pool(residuals, groups, level)
    out.noise_estimated = pool is not None
    if pool is None:
        out.notes.append("no replicate runs and only 3 baseline runs: no noise estimate, so the intervals are "
                         "points (they say nothing about uncertainty)")
        pool = np.zeros(1)
    draws = pool[rng.integers(len(pool), size=(bootstrap, len(base_rows)))]
    for (rung, rows) in groups:
        compute = {k: _geomean([row[k] for row in rows]) for k in out.fits}
        out.rungs.append(RungResult(rung, len(rows), compute, _geomean([row["final_val_loss"] for row in rows])))
    cand_log = np.log([r.loss for r in out.rungs])
    cand_draws = np.stack([pool[rng.integers(len(pool), size=(bootstrap, r.seeds))].mean(axis=1)
                           for r in out.rungs], axis=1)
    cand_loss_reps = np.exp(cand_log[None, :] + cand_draws)  # [B, rungs]
    laws = {}
    for key, (law, _) in list(out.fits.items()):
        values = np.array([row[key] for row in base_rows], dtype=float)
        params = refit_power_law(law, values, np.log(law.loss(values))[None, :] + draws)
        laws[key] = params
        out.fits[key] = Fit(key, law, _distinct(values), _interval(law.E, params[:, 0], level),
                            _interval(law.alpha, params[:, 2], level))
    for key in (k for k in MATCHINGS if k in out.fits):
        _multipliers(out, key, laws[key], cand_loss_reps, level)
    _trend(out, laws, cand_loss_reps, level)
    _loss_deltas(out, laws, cand_loss_reps, level)
    _accuracy(out, base_groups, groups)
    _phi(out, cand_rows, rng, bootstrap, level)
    return out


def group_rungs(rows: list) -> list:
    """[(rung, rows)] smallest compute first: by `rung` where every row has one, else by model FLOPs."""
    groups = defaultdict(list)
    by_rung = all("rung" in row for row in rows)
    for row in rows:
        groups[row["rung"] if by_rung else float(f"{row['model_flops']:.6g}")].append(row)
    ordered = sorted(groups.items(), key=lambda kv: _geomean([r["model_flops"] for r in kv[1]]))
    return [(key if by_rung else i, g) for i, (key, g) in enumerate(ordered)]


def _multipliers(out: Comparison, key: str, params: np.ndarray, cand_loss_reps: np.ndarray, level: float) -> None:
    law = out.fits[key].law
    c = np.array([r.compute[key] for r in out.rungs])
    point = law.compute_at([r.loss for r in out.rungs]) / c
    reps = invert_power_law(cand_loss_reps, params[:, :1], params[:, 1:2], params[:, 2:3], law.C0) / c
    for j, rung in enumerate(out.rungs):
        rung.multiplier[key] = _interval(point[j], reps[:, j], level, log=True)
    finite = np.isfinite(point)
    if key == "model_flops" and not finite.all():
        gaps = ", ".join(f"rung {r.rung} loss {r.loss:.4g}" for r, f in zip(out.rungs, finite) if not f)
        out.notes.append(f"{gaps}: at or below the baseline's fitted asymptote E={law.E:.4g} (model FLOPs); the "
                         f"baseline never reaches it, so CM is infinite there and left out of the headline")
    if finite.any():
        with np.errstate(invalid="ignore"):
            out.multiplier[key] = _interval(math.exp(np.log(point[finite]).mean()),
                                            np.exp(np.log(reps[:, finite]).mean(axis=1)), level, log=True)


def _trend(out: Comparison, laws: dict, cand_loss_reps: np.ndarray, level: float) -> None:
    """d log CM / d log C over the rungs with finite CM (model FLOPs), and its straight line extrapolated."""
    if "model_flops" not in out.multiplier:
        return
    finite = [j for j, r in enumerate(out.rungs) if math.isfinite(r.multiplier["model_flops"].value)]
    log_c = np.log([out.rungs[j].compute["model_flops"] for j in finite])
    if len(finite) < 2 or np.ptp(log_c) == 0:
        out.notes.append("trend: fewer than 2 rungs with a finite multiplier; no slope or extrapolation")
        return
    law, params = out.fits["model_flops"].law, laws["model_flops"]
    c = np.array([out.rungs[j].compute["model_flops"] for j in finite])
    point = np.log(law.compute_at([out.rungs[j].loss for j in finite]) / c)
    reps = np.log(invert_power_law(cand_loss_reps[:, finite], params[:, :1], params[:, 1:2], params[:, 2:3],
                                   law.C0) / c)
    reps[~np.isfinite(reps).all(axis=1)] = np.nan  # a replicate with a rung below its E has no slope
    centred = log_c - log_c.mean()
    slope = lambda y: ((y - y.mean(axis=-1, keepdims=True)) * centred).sum(axis=-1) / (centred ** 2).sum()  # noqa: E731
    s_point, s_reps = slope(point), slope(reps)
    out.trend = _interval(float(s_point), s_reps, level)
    dropped = int(np.isnan(s_reps).sum())
    if dropped:
        out.notes.append(f"trend: {dropped} of {len(s_reps)} bootstrap replicates put a rung below E and were "
                         f"left out of its interval")
    for factor in EXTRAPOLATION_FACTORS:
        target = math.log(factor * c.max()) - log_c.mean()
        at = lambda y, s: y.mean(axis=-1) + s * target  # noqa: E731
        out.extrapolation[factor] = (factor * float(c.max()),
                                     _interval(math.exp(at(point, s_point)), np.exp(at(reps, s_reps)), level,
                                               log=True))


def _loss_deltas(out: Comparison, laws: dict, cand_loss_reps: np.ndarray, level: float) -> None:
    """FLOP-matched (model FLOPs) and token-matched loss differences per rung and averaged over rungs."""
    loss = np.array([r.loss for r in out.rungs])
    for key, attr in (("model_flops", "flop_matched"), ("tokens", "token_matched")):
        if key not in out.fits:
            continue
        law, p = out.fits[key].law, laws[key]
        x = np.array([r.compute[key] for r in out.rungs])
        point = loss - law.loss(x)
        reps = cand_loss_reps - (p[:, :1] + p[:, 1:2] * (x[None, :] / law.C0) ** -p[:, 2:3])
        for j, rung in enumerate(out.rungs):
            setattr(rung, attr, _interval(point[j], reps[:, j], level))
        setattr(out, attr, _interval(point.mean(), reps.mean(axis=1), level))


def _accuracy(out: Comparison, base_groups: list, groups: list) -> None:
    """Verified accuracy of each candidate rung against the baseline's, interpolated linearly in log C (model
    FLOPs) between baseline rungs; not extrapolated beyond ACCURACY_MARGIN outside their range."""
    names = sorted({name for _, rows in groups for row in rows for name in (row.get("accuracy") or {})})
    for name in names:
        base = [(math.log(_geomean([r["model_flops"] for r in rows])), _mean_accuracy(rows, name))
                for _, rows in base_groups]
        base = sorted((c, a) for c, a in base if a is not None)
        for rung, (_, rows) in zip(out.rungs, groups):
            cand = _mean_accuracy(rows, name)
            if cand is None:
                continue
            at, ref = math.log(rung.compute["model_flops"]), None
            if len(base) >= 2 and base[0][0] - math.log(ACCURACY_MARGIN) <= at <= base[-1][0] + math.log(
                    ACCURACY_MARGIN):
                ref = float(np.interp(at, [c for c, _ in base], [a for _, a in base]))
            rung.accuracy[name] = {"candidate": cand, "baseline": ref,
                                   "difference": None if ref is None else cand - ref}
    if names and not any(v["baseline"] is not None for r in out.rungs for v in r.accuracy.values()):
        out.notes.append("accuracy: no candidate rung lies within the compute range of 2 or more baseline rungs "
                         "that report it; nothing compared")


def _phi(out: Comparison, rows: list, rng, bootstrap: int, level: float) -> None:
    """The recurrence-equivalence exponent from the candidate's runs, when their depth varies."""
    keys = ("params_once", "params_rec", "depth")
    if not all(all(row.get(k) is not None for k in keys) for row in rows):
        out.notes.append("phi: not fitted (candidate runs lack params_once, params_rec or depth)")
        return
    depths = sorted({row["depth"] for row in rows})
    if len(depths) < 2:
        if depths[0] != 1:
            out.notes.append(f"phi: not fitted (every candidate run has r = {depths[0]:g})")
        return
    if len(rows) < 7 or not any(row["params_rec"] > 0 for row in rows):
        out.notes.append(f"phi: not fitted ({len(rows)} candidate runs; the 6-parameter law needs 7 or more, "
                         f"with params_rec > 0)")
        return
    cols = [np.array([row[k] for row in rows], dtype=float) for k in keys + ("tokens", "final_val_loss")]
    law, resid = fit_recurrence_law(*cols)
    n, q = len(rows), (1 + level) / 2
    pool = resid * math.sqrt(n / (n - 6)) * student_t_quantile(q, n - 6) / NormalDist().inv_cdf(q)
    fitted = np.log(cols[4]) - resid
    phis = refit_recurrence_phi(law, *cols[:4], fitted[None, :] + pool[rng.integers(len(pool),
                                                                                       size=(bootstrap, len(rows)))])
    out.phi, out.phi_law = _interval(law.phi, phis, level), law


def _noise_pool(residuals: np.ndarray, groups: list, level: float) -> Optional[np.ndarray]:
    """Residuals in log loss the bootstrap draws from, widened by t_df / z (see the module docstring); None
    when there are none (3 baseline runs, no rung with two seeds)."""
    n = len(residuals)
    parts = [residuals * math.sqrt(n / (n - 3))] if n > 3 else []
    df = max(n - 3, 0)
    for _, rows in groups:
        if len(rows) >= 2:
            logs = np.log([row["final_val_loss"] for row in rows])
            parts.append((logs - logs.mean()) * math.sqrt(len(rows) / (len(rows) - 1)))
            df += len(rows) - 1
    if not parts:
        return None
    p = (1 + level) / 2
    return np.concatenate(parts) * student_t_quantile(p, df) / NormalDist().inv_cdf(p)


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t: exact for df 1 and 2, Cornish-Fisher (Hill 1970) to four terms from df 3
    (within 0.3% at df 3, p = 0.95, and better as df grows)."""
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def _interval(point: float, reps: np.ndarray, level: float, log: bool = False) -> Interval:
    """Percentile interval of the replicates (NaN ones left out); `log` takes the quantiles of log values."""
    reps = np.asarray(reps, dtype=float)
    reps = reps[~np.isnan(reps)]
    if not len(reps):
        return Interval(float(point), math.nan, math.nan)
    q = np.quantile(np.log(reps) if log else reps, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    lo, hi = (np.exp(q) if log else q).tolist()
    return Interval(float(point), float(lo), float(hi))


def _has(rows: list, key: str, notes: list) -> bool:
    missing = sum(row.get(key) is None for row in rows)
    if missing and key != "model_flops":
        notes.append(f"{MATCHINGS[key]}: {missing} of {len(rows)} runs lack {key}; that matching is skipped")
    return not missing


def _distinct(values) -> int:
    return len({float(f"{v:.6g}") for v in values})


def _geomean(values) -> float:
    return float(np.exp(np.mean(np.log(np.asarray(values, dtype=float)))))


def _mean_accuracy(rows: list, name: str) -> Optional[float]:
    values = [row["accuracy"][name] for row in rows if name in (row.get("accuracy") or {})]
    return float(np.mean(values)) if values else None


def _json_number(value: float):
    """JSON has no inf or NaN: inf is written "inf" (a multiplier the baseline never reaches), NaN null."""
    if value is None or math.isnan(value):
        return None
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")
