"""compare against ground truth: tables drawn from a known law (tests/compare/synthetic.py) whose compute
multiplier m, asymptote and recurrence exponent phi are known, so each estimate can be checked against it."""

from pathlib import Path

import numpy as np
import pytest

from recurdepth.compare.analysis import compare
from recurdepth.compare.report import table, verdict
from recurdepth.compare.results import Results
from tests.compare import synthetic

SIGMA = 0.01  # log-normal noise on every run's loss: 1% of the loss
TRIALS = 50
BOOTSTRAP = 200


def results(rows: list) -> Results:
    return Results(Path("synthetic.jsonl"), rows, list(range(1, len(rows) + 1)))


@pytest.mark.parametrize("m", [0.8, 1.0, 2.0])
def test_interval_covers_the_true_multiplier(m):
    """5 baseline rungs x 2 seeds, candidate at m C x 2 seeds, 1% noise: the 90% interval of the model-FLOP
    multiplier holds m in >= 85% of 50 independent tables (measured over 400 tables: ~90%), and is not
    uselessly wide (median hi/lo < 1.3; it is ~1.14 at this noise)."""
    rng = np.random.default_rng([0, int(m * 10)])
    hits, widths = 0, []
    for _ in range(TRIALS):
        c = compare(results(synthetic.table(m, SIGMA, rng)), "dense", "looped", bootstrap=BOOTSTRAP, seed=1,
                    matchings=("model_flops",))
        iv = c.multiplier["model_flops"]
        hits += iv.lo <= m <= iv.hi
        widths.append(iv.hi / iv.lo)
    assert hits >= 0.85 * TRIALS, (m, hits)
    assert np.median(widths) < 1.3, np.median(widths)


@pytest.mark.parametrize("m", [0.8, 1.0, 2.0])
def test_noiseless_point_estimates(m):
    """Without noise the multiplier is m at every rung and under every matching (hardware FLOPs are 1.2x model
    FLOPs and wall seconds proportional in both families), with no trend; FLOP-matched loss difference has the
    sign of 1 - m."""
    c = compare(results(synthetic.table(m, 0.0, np.random.default_rng(0))), "dense", "looped", bootstrap=50)
    for key in ("model_flops", "hardware_flops", "wall_seconds"):
        assert c.multiplier[key].value == pytest.approx(m, rel=0.10), key
        for rung in c.rungs:
            assert rung.multiplier[key].value == pytest.approx(m, rel=0.10), (key, rung.rung)
    assert abs(c.trend.value) < 0.02
    assert c.extrapolation[100][1].value == pytest.approx(m, rel=0.10)
    if m == 1.0:
        assert abs(c.flop_matched.value) < 1e-6
    else:
        assert np.sign(c.flop_matched.value) == np.sign(1 - m)
    line = verdict(c)
    assert line.startswith("verdict: looped vs dense: compute multiplier") and "\n" not in line


def test_better_candidate_survives_every_matching_and_says_so():
    c = compare(results(synthetic.table(2.0, SIGMA, np.random.default_rng(3))), "dense", "looped", bootstrap=300)
    line = verdict(c)
    assert "candidate better" in line
    assert "survives: model FLOPs, hardware FLOPs, wall-clock, token-matched" in line, line
    assert "seeds 2/2/2/2/2 (baseline 2/2/2/2/2)" in line, line


def test_equal_candidate_claims_nothing():
    c = compare(results(synthetic.table(1.0, SIGMA, np.random.default_rng([0, 10]))), "dense", "looped",
                bootstrap=300)
    iv = c.multiplier["model_flops"]
    assert iv.lo <= 1 <= iv.hi
    assert "survives: none (CI includes 1)" in verdict(c)


def test_loss_below_the_asymptote_is_reported_not_fitted():
    """A candidate rung below the baseline's E: CM infinite at that rung, left out of the headline, said in a
    note and in the verdict; every other output still there."""
    rows = synthetic.table(1.5, 0.0, np.random.default_rng(0))
    top = [r for r in rows if r["family"] == "looped" and r["rung"] == 4]
    for r in top:
        r["final_val_loss"] = 0.95 * synthetic.E
    c = compare(results(rows), "dense", "looped", bootstrap=50)
    assert c.rungs[-1].multiplier["model_flops"].value == float("inf")
    assert c.multiplier["model_flops"].value == pytest.approx(1.5, rel=0.05)
    assert c.undefined_rungs() == [4]
    assert any("below the baseline's fitted asymptote" in n for n in c.notes)
    assert "below the baseline's asymptote" in verdict(c)
    table(c)
    for r in rows:
        if r["family"] == "looped":
            r["final_val_loss"] = 0.9 * synthetic.E
    c = compare(results(rows), "dense", "looped", bootstrap=50)
    assert "model_flops" not in c.multiplier and "undefined" in verdict(c)


def test_token_and_flop_matching_can_disagree():
    """A looped candidate at r = 4 spends 4x the FLOPs per token: it reaches at C only the baseline's loss at
    C / 2 (worse FLOP-matched) while its tokens are a quarter of the baseline's at C, where the baseline's L(D)
    is higher (better token-matched). compare reports both signs."""
    rows = synthetic.table(0.5, 0.0, np.random.default_rng(0))
    for r in rows:
        if r["family"] == "looped":
            r["tokens"] //= 4
    c = compare(results(rows), "dense", "looped", bootstrap=50)
    assert c.flop_matched.value > 0 > c.token_matched.value
    assert "does not survive: token-matched" in verdict(c)


def test_accuracy_is_interpolated_in_log_compute():
    """Baseline accuracy linear in log10 C: the candidate's rungs compare against the line's value at their C;
    a rung far beyond the baseline's range gets no baseline value."""
    rows = synthetic.table(1.0, 0.0, np.random.default_rng(0))
    for r in rows:
        if r["family"] == "dense":
            r["accuracy"] = {"r=8": 0.1 * (np.log10(r["model_flops"]) - 14)}
        else:
            r["model_flops"] *= 1.5  # between baseline rungs
            r["accuracy"] = {"r=8": 0.5}
    c = compare(results(rows), "dense", "looped", bootstrap=20, matchings=("model_flops",))
    for rung in c.rungs[:-1]:
        want = 0.1 * (np.log10(rung.compute["model_flops"]) - 14)
        assert rung.accuracy["r=8"]["baseline"] == pytest.approx(want, abs=1e-9)
        assert rung.accuracy["r=8"]["difference"] == pytest.approx(0.5 - want, abs=1e-9)
    assert c.rungs[-1].accuracy["r=8"]["baseline"] is None  # 1.5x beyond the largest baseline rung


def phi_rows(phi: float, sigma: float, rng) -> list:
    """Runs varying r, parameters and tokens, drawn from L = E + A N^-alpha + B D^-beta with
    N = N_once + r^phi N_rec (fit.py's law) and log-normal noise sigma."""
    rows = []
    for n_once in (1e6, 3e6):
        for n_rec in (2e6, 6e6):
            for r in (1, 2, 4, 8):
                for d in (1e8, 4e8, 1.6e9):
                    n = n_once + r ** phi * n_rec
                    loss = 1.8 + 60.0 * n ** -0.3 + 90.0 * d ** -0.28
                    flops = 6 * (n_once + r * n_rec) * d
                    rows.append(synthetic.row("looped", len(rows), 0, flops, loss * np.exp(rng.normal(0, sigma)),
                                              params_once=int(n_once), params_rec=int(n_rec), depth=float(r),
                                              tokens=int(d)))
    rows += [synthetic.row("dense", 0, i, c, synthetic.law(c)) for i, c in enumerate(synthetic.RUNGS)]
    return rows


@pytest.mark.parametrize("phi,sigma", [(0.46, 0.0), (0.46, 0.002), (0.8, 0.002)])
def test_phi_recovered(phi, sigma):
    c = compare(results(phi_rows(phi, sigma, np.random.default_rng(5))), "dense", "looped", bootstrap=200,
                matchings=("model_flops",))
    assert abs(c.phi.value - phi) < 0.05, c.phi
    if sigma:
        assert c.phi.lo <= phi <= c.phi.hi, c.phi
    assert "phi" in table(c)


def test_phi_needs_varying_depth():
    c = compare(results(synthetic.table(1.0, 0.0, np.random.default_rng(0))), "dense", "looped", bootstrap=20,
                matchings=("model_flops",))
    assert c.phi is None and any("every candidate run has r = 4" in n for n in c.notes)


def test_no_noise_estimate_makes_no_claim():
    """3 baseline runs and one seed per candidate rung: the residuals are exactly 0, so the intervals are points;
    the verdict must not turn them into a claim."""
    rows = synthetic.table(1.3, 0.01, np.random.default_rng(0), seeds=1, cand_seeds=1, rungs=synthetic.RUNGS[:3])
    c = compare(results(rows), "dense", "looped", bootstrap=50)
    assert not c.noise_estimated and any("no noise estimate" in n for n in c.notes)
    line = verdict(c)
    assert "survives: not tested (no noise estimate" in line and "candidate better" not in line, line
