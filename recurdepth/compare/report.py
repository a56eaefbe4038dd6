"""The outputs of `recurdepth compare`: the printed table, the one verdict line, compare.csv, compare.json and
compare.png. Multipliers print as `1.95x [1.70-2.21]` (point, then the bootstrap interval), loss differences as
`-0.012 [-0.020,-0.004]` in nats; `inf` marks a loss below the baseline's asymptote (the baseline never
reaches it). A claim is made only where an interval excludes 1 (multipliers) or 0 (loss differences)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from recurdepth.atomic import write_atomically
from recurdepth.compare.analysis import EXTRAPOLATION_FACTORS, MATCHINGS, Comparison, Interval

PNG_NAME, CSV_NAME, JSON_NAME = "compare.png", "compare.csv", "compare.json"


def default_out_dir(results_path: Path, baseline: str, candidate: str) -> Path:
    """`compare-<baseline>-vs-<candidate>/` beside the results file."""
    return Path(results_path).parent / f"compare-{baseline}-vs-{candidate}"


def verdict(c: Comparison) -> str:
    """One line: the model-FLOP multiplier with its interval, rungs and seeds behind it, and which matchings the
    claim survives (each interval on the same side of 1, or of 0 for the token-matched loss difference)."""
    pct = f"{c.level:.0%}"
    seeds = "/".join(str(r.seeds) for r in c.rungs)
    head = f"verdict: {c.candidate} vs {c.baseline}: "
    where = (f"rungs {len(c.rungs)}, seeds {seeds} (baseline {'/'.join(map(str, c.baseline_seeds))})")
    cm = c.multiplier.get("model_flops")
    if cm is None:
        return (head + f"compute multiplier undefined at model FLOPs: every candidate rung's loss is at or below "
                       f"the baseline's fitted asymptote E={c.fits['model_flops'].law.E:.4g}, which more "
                       f"baseline compute never reaches; {where}; survives: nothing to test")
    text = head + f"compute multiplier {_x(cm.value)} ({pct} CI {_x(cm.lo, '')}-{_x(cm.hi, '')}) at model FLOPs, "
    text += where
    undefined = c.undefined_rungs()
    if undefined:
        text += f" ({len(undefined)} more rung(s) below the baseline's asymptote: CM infinite, left out)"
    if not c.noise_estimated:
        return text + ("; survives: not tested (no noise estimate: 3 baseline runs and no repeated seeds, so the "
                       "interval is a point; add seeds or rungs)")
    side = cm.side(1.0)
    if side == 0:
        return text + f"; survives: none (CI includes 1)" + _others(c, side)
    claim = "candidate better" if side > 0 else "candidate worse"
    held, failed = _survival(c, side)
    text += f"; {claim}; survives: {', '.join(held)}"
    return text + (f"; does not survive: {', '.join(failed)}" if failed else "")


def _survival(c: Comparison, side: int) -> tuple[list, list]:
    held, failed = [], []
    for key, name in MATCHINGS.items():
        iv = c.multiplier.get(key)
        if iv is None:
            failed.append(f"{name} (not measured)")
        elif iv.side(1.0) == side:
            held.append(name)
        else:
            failed.append(f"{name} ({_x(iv.value)}, CI {_x(iv.lo, '')}-{_x(iv.hi, '')})")
    tm = c.token_matched
    if tm is None:
        failed.append("token-matched (not measured)")
    elif tm.side(0.0) == -side:  # better means a lower loss
        held.append("token-matched")
    else:
        failed.append(f"token-matched (dL {_d(tm)})")
    return held, failed


def _others(c: Comparison, side: int) -> str:
    """With no claim at model FLOPs, what the other matchings say (so a contradiction is not hidden)."""
    parts = [f"{name} {_x(c.multiplier[k].value)} (CI {_x(c.multiplier[k].lo, '')}-{_x(c.multiplier[k].hi, '')})"
             for k, name in MATCHINGS.items() if k != "model_flops" and k in c.multiplier]
    if c.token_matched is not None:
        parts.append(f"token-matched dL {_d(c.token_matched)}")
    return f"; also {', '.join(parts)}" if parts else ""


def table(c: Comparison) -> str:
    """The fits, one row per candidate rung, the all-rung row, the trend and extrapolation, phi, accuracy, notes."""
    pct = f"{c.level:.0%}"
    lines = [f"compare {c.candidate} vs {c.baseline} ({c.results_path}); baseline fits L = E + A (C/C0)^-alpha in "
             f"log loss; [{pct} bootstrap interval, B={c.bootstrap}, seed {c.seed}]"]
    for key, fit in c.fits.items():
        name = MATCHINGS.get(key, "tokens")
        lines.append(f"  fit over {name:<14} {fit.points} points: E={fit.law.E:.4g} [{fit.E.lo:.4g}-{fit.E.hi:.4g}]"
                     f"  alpha={fit.law.alpha:.3g} [{fit.alpha.lo:.3g}-{fit.alpha.hi:.3g}]  A={fit.law.A:.4g}"
                     f"  C0={fit.law.C0:.4g}")
    keys = [k for k in MATCHINGS if k in c.multiplier or any(k in r.multiplier for r in c.rungs)]
    head = f"{'rung':>4} {'seeds':>5} {'model FLOPs':>11} {'tokens':>10} {'loss':>7}"
    head += "".join(f" {'CM ' + MATCHINGS[k]:>22}" for k in keys)
    head += f" {'dL FLOP-matched':>24} {'dL token-matched':>24}"
    lines.append(head)
    for r in c.rungs:
        line = f"{r.rung:>4} {r.seeds:>5} {r.compute['model_flops']:>11.3e} {r.compute.get('tokens', math.nan):>10.3e}"
        line += f" {r.loss:>7.4f}" + "".join(f" {_cm(r.multiplier.get(k)):>22}" for k in keys)
        line += f" {_d(r.flop_matched):>24} {_d(r.token_matched):>24}"
        lines.append(line)
    line = f"{'all':>4} {'':>5} {'':>11} {'':>10} {'':>7}" + "".join(f" {_cm(c.multiplier.get(k)):>22}" for k in keys)
    lines.append(line + f" {_d(c.flop_matched):>24} {_d(c.token_matched):>24}")
    lines.append("  (CM: baseline compute needed for the candidate's loss / candidate compute, geometric mean over "
                 "rungs; dL: candidate loss - baseline fit, mean over rungs; < 0 favours the candidate)")
    if c.trend is not None:
        lines.append(f"trend d log CM / d log C (model FLOPs): {c.trend.value:+.3f} [{c.trend.lo:+.3f},"
                     f"{c.trend.hi:+.3f}]")
        for factor in EXTRAPOLATION_FACTORS:
            at, iv = c.extrapolation[factor]
            lines.append(f"EXTRAPOLATION (straight trend beyond the data) to {factor}x the largest rung, C={at:.3e}: "
                         f"{_cm(iv)}")
    if c.phi is not None:
        lines.append(f"phi (recurrence equivalence, N = N_once + r^phi N_rec): {c.phi.value:.3f} "
                     f"[{c.phi.lo:.3f}-{c.phi.hi:.3f}]")
    for r in c.rungs:
        for name, acc in r.accuracy.items():
            base = "n/a (no 2 baseline rungs report it around this compute)" if acc["baseline"] is None else (
                f"{acc['baseline']:.3f} (diff {acc['difference']:+.3f})")
            lines.append(f"accuracy {name} rung {r.rung}: candidate {acc['candidate']:.3f}, baseline at matched "
                         f"model FLOPs {base}")
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)


def to_json(c: Comparison, verdict_line: str) -> dict:
    iv = lambda x: None if x is None else x.to_dict()  # noqa: E731
    return {
        "baseline": c.baseline, "candidate": c.candidate, "results": c.results_path, "level": c.level,
        "bootstrap": c.bootstrap, "seed": c.seed, "fits": {k: f.to_dict() for k, f in c.fits.items()},
        "rungs": [{"rung": r.rung, "seeds": r.seeds, "compute": r.compute, "loss": r.loss,
                   "multiplier": {k: v.to_dict() for k, v in r.multiplier.items()},
                   "flop_matched": iv(r.flop_matched), "token_matched": iv(r.token_matched),
                   "accuracy": r.accuracy} for r in c.rungs],
        "baseline_seeds": c.baseline_seeds, "multiplier": {k: v.to_dict() for k, v in c.multiplier.items()},
        "trend": iv(c.trend),
        "extrapolation": {f"{k}x": {"model_flops": at, "multiplier": v.to_dict()}
                          for k, (at, v) in c.extrapolation.items()},
        "flop_matched": iv(c.flop_matched), "token_matched": iv(c.token_matched),
        "phi": iv(c.phi), "phi_law": None if c.phi_law is None else vars(c.phi_law),
        "notes": c.notes, "verdict": verdict_line,
    }


def to_csv(c: Comparison) -> str:
    """One row per candidate rung: compute, loss, each multiplier and loss difference with its interval."""
    cols = ["rung", "seeds", "model_flops", "hardware_flops", "wall_seconds", "tokens", "loss"]
    for k in MATCHINGS:
        cols += [f"cm_{k}", f"cm_{k}_lo", f"cm_{k}_hi"]
    for k in ("flop_matched", "token_matched"):
        cols += [f"dloss_{k}", f"dloss_{k}_lo", f"dloss_{k}_hi"]
    names = sorted({n for r in c.rungs for n in r.accuracy})
    cols += [f"{side}_accuracy_{n}" for n in names for side in ("candidate", "baseline")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for r in c.rungs:
        row = [r.rung, r.seeds] + [r.compute.get(k, "") for k in ("model_flops", "hardware_flops", "wall_seconds",
                                                                     "tokens")] + [r.loss]
        for iv in [r.multiplier.get(k) for k in MATCHINGS] + [r.flop_matched, r.token_matched]:
            row += ["", "", ""] if iv is None else [iv.value, iv.lo, iv.hi]
        for n in names:
            acc = r.accuracy.get(n, {})
            row += [_blank(acc.get("candidate")), _blank(acc.get("baseline"))]
        writer.writerow(row)
    return buf.getvalue()


def plot(c: Comparison, results_rows: dict, path: Path) -> Path:
    """Loss vs model FLOPs of both families with the baseline's fit (left); CM per rung per matching (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    law = c.fits["model_flops"].law
    for name, marker in ((c.baseline, "o"), (c.candidate, "s")):
        rows = results_rows[name]
        ax.scatter([r["model_flops"] for r in rows], [r["final_val_loss"] for r in rows], marker=marker, label=name,
                   alpha=0.7)
    xs = [r["model_flops"] for rows in results_rows.values() for r in rows]
    grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 200)
    ax.plot(grid, law.loss(grid), color="black", lw=1,
            label=f"{c.baseline} fit: {law.E:.3g} + {law.A:.3g} (C/{law.C0:.2g})^-{law.alpha:.3g}")
    ax.axhline(law.E, color="gray", ls=":", lw=1, label=f"asymptote E={law.E:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model FLOPs")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, (key, name) in enumerate(MATCHINGS.items()):
        pts = [(r.compute["model_flops"], r.multiplier[key]) for r in c.rungs
               if key in r.multiplier and math.isfinite(r.multiplier[key].value)]
        if not pts:
            continue
        x = np.array([p[0] for p in pts]) * (1.06 ** (i - 1))  # side by side at each rung
        y = np.array([p[1].value for p in pts])
        lo = np.array([min(p[1].lo, p[1].value) for p in pts])
        hi = np.array([p[1].hi if math.isfinite(p[1].hi) else p[1].value for p in pts])
        ax2.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", capsize=3, label=name)
    ax2.axhline(1.0, color="black", lw=1)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("candidate model FLOPs (rung)")
    ax2.set_ylabel(f"compute multiplier ({c.level:.0%} interval)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{c.candidate} vs {c.baseline}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomically(path, buf.getvalue())


def write_outputs(c: Comparison, results_rows: dict, out: Path, verdict_line: str) -> dict:
    """compare.png, compare.csv and compare.json into `out` (created here); returns {kind: path}."""
    out.mkdir(parents=True, exist_ok=True)
    return {"png": plot(c, results_rows, out / PNG_NAME),
            "csv": write_atomically(out / CSV_NAME, to_csv(c)),
            "json": write_atomically(out / JSON_NAME, json.dumps(to_json(c, verdict_line), indent=1) + "\n")}


def _x(value: float, suffix: str = "x") -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return "inf" if math.isinf(value) else f"{value:.3g}{suffix}"


def _cm(iv: Interval | None) -> str:
    return "" if iv is None else f"{_x(iv.value)} [{_x(iv.lo, '')}-{_x(iv.hi, '')}]"


def _d(iv: Interval | None) -> str:
    return "" if iv is None else f"{iv.value:+.4f} [{iv.lo:+.4f},{iv.hi:+.4f}]"


def _blank(value):
    return "" if value is None else value
