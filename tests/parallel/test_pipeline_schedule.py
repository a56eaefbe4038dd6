"""LoopedPipelineSchedule: the op order (pure simulation) and a real PP=2 run under torchrun/gloo.

Simulation: every order passes the dependency checker, the checker rejects broken orders, and the
bubble measured from the logical-time timeline is the ring's fill/drain only (for p | m).
torchrun (tests/parallel/_pipeline_worker.py): a float64 toy looped model split over 2 (and 4) stages,
and run as a one-stage pipeline, gives the summed loss and every parameter gradient of an unsplit
explicit-loop reference (atol 1e-12); the timeline the run records equals the simulated one; forward-only
trips keep no autograd tensors.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from recurdepth.model.depth import BackpropWindow
from recurdepth.parallel.pipeline import (
    Op,
    build_order,
    check_order,
    default_cap,
    expected_bubble,
    expected_bubble_window,
    idle_over_makespan,
    max_in_flight,
    simulate_timeline,
    timeline_bubble,
)
from tests.parallel import _pipeline_worker as toy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(REPO, "tests", "parallel", "_pipeline_worker.py")
TIMEOUT_S = 240
ATOL = 1e-12


def simulated_bubble(p, r, k, m):
    w = BackpropWindow.of(r, k)
    orders = build_order(p, m, w)
    check_order(orders, p, m, w)
    return timeline_bubble(simulate_timeline(orders, p, w), p)


# ------------------------------------------------------------------------------------------- simulation


def test_bubble_matches_interleaved_formula():
    # idle / (p * makespan) = 1/17 here; the formula (p-1)/(r m) = 1/16 is idle / ideal compute.
    b = simulated_bubble(2, 4, 4, 4)
    assert expected_bubble(2, 4, 4) == 0.0625
    assert abs(b - 0.0625) <= 0.1 * 0.0625, b
    assert b == pytest.approx(1 / 17)
    b = simulated_bubble(4, 8, 8, 8)
    assert abs(b - expected_bubble(4, 8, 8)) <= 0.1 * expected_bubble(4, 8, 8), b


def test_bubble_with_truncated_backprop():
    # k < r: trips 1..r-k are forward-only, so a micro-batch costs r + 2k (not 3r) units per stage while the
    # fill + drain stays 3(p-1): the bubble is 3(p-1)/(m (r + 2k)), larger than (p-1)/(r m).
    w = BackpropWindow.of(4, 2)
    b = simulated_bubble(2, 4, 2, 4)
    assert expected_bubble_window(2, w, 4) == pytest.approx(3 / 32)
    assert b == pytest.approx(idle_over_makespan(3 / 32))  # 3/35 = 0.0857
    assert b > expected_bubble(2, 4, 4)
    assert expected_bubble_window(2, BackpropWindow.of(4, 4), 4) == expected_bubble(2, 4, 4)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("r,k", [(1, 1), (3, 5), (4, 2), (5, 1), (6, 6), (3, 0)])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_orders_are_valid_and_reach_the_fill_drain_bound(p, r, k, groups):
    m = p * groups
    w = BackpropWindow.of(r, k)
    orders = build_order(p, m, w)
    check_order(orders, p, m, w)
    b = timeline_bubble(simulate_timeline(orders, p, w), p)
    assert b == pytest.approx(idle_over_makespan(expected_bubble_window(p, w, m)), abs=1e-12)
    # memory: at most cap chunks hold activations; no-grad trips hold none
    assert all(peak <= default_cap(p, s, w) for s, peak in enumerate(max_in_flight(orders)))
    assert max(max_in_flight(orders)) <= p * w.with_grad


@pytest.mark.parametrize("p,r,k,m", [(2, 4, 2, 3), (3, 5, 2, 7), (4, 2, 1, 3), (2, 3, 3, 1)])
def test_orders_valid_when_groups_are_partial(p, r, k, m):
    w = BackpropWindow.of(r, k)
    check_order(build_order(p, m, w), p, m, w)


def test_checker_rejects_broken_orders():
    p, m, w = 2, 4, BackpropWindow.of(4, 2)
    good = build_order(p, m, w)
    check_order(good, p, m, w)

    missing = [list(o) for o in good]
    missing[1].remove(Op("B", 2, 3))
    with pytest.raises(AssertionError, match="differ"):
        check_order(missing, p, m, w)

    backward_first = [list(o) for o in good]  # a backward before its own forward
    i, j = backward_first[0].index(Op("F", 0, 3)), backward_first[0].index(Op("B", 0, 3))
    backward_first[0][i], backward_first[0][j] = backward_first[0][j], backward_first[0][i]
    with pytest.raises(AssertionError, match="cannot complete"):
        check_order(backward_first, p, m, w)

    cyclic = [list(o) for o in good]  # stage 0 waits for iteration 1's trip before starting it: deadlock
    i, j = cyclic[0].index(Op("f", 1, 1)), cyclic[0].index(Op("f", 1, 2))
    cyclic[0][i], cyclic[0][j] = cyclic[0][j], cyclic[0][i]
    with pytest.raises(AssertionError, match="cannot complete"):
        check_order(cyclic, p, m, w)


def test_order_phases():
    """Warm-up: forwards only until a group's grad trips are in flight; then B and forwards alternate;
    cool-down: backwards only."""
    p, r, k, m = 2, 4, 4, 4
    orders = build_order(p, m, BackpropWindow.of(r, k))
    kinds0 = "".join(op.kind for op in orders[0] if op.kind in "fFB")
    assert kinds0 == "F" * 8 + "BF" * 8 + "B" * 8
    kinds1 = "".join(op.kind for op in orders[1] if op.kind in "fFB")
    assert kinds1 == "F" * 7 + "BF" * 9 + "B" * 7


# ---------------------------------------------------------------------------------------------- torchrun


def launch(nproc, outdir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER,
           str(outdir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # own session: a timeout ends torchrun with its workers
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"pipeline worker ({nproc} procs) timed out after {TIMEOUT_S}s:\n{out[-6000:]}")
    if proc.returncode != 0:
        pytest.fail(f"pipeline worker ({nproc} procs) failed (exit {proc.returncode}):\n{out[-6000:]}")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def pp_results(tmp_path_factory):
    return launch(2, tmp_path_factory.mktemp("pipeline2"))


@pytest.fixture(scope="module")
def pp4_results(tmp_path_factory):
    return launch(4, tmp_path_factory.mktemp("pipeline4"))


def by_stage(results, case, key):
    return [res[case][key] for res in results]


def assert_matches_reference(stages, r, k):
    ref = toy.reference(r, k)
    grads = {}
    for st in stages:
        assert not set(grads) & set(st["grads"])
        grads.update(st["grads"])
    # every parameter got a gradient (none at all when forward only)
    assert sorted(grads) == sorted(ref["grads"]) == (sorted(toy.full_params()) if k > 0 else [])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(grads[name], g, atol=ATOL, rtol=0, msg=f"grad {name}, window ({r}, {k})")
    torch.testing.assert_close(stages[-1]["loss"], ref["loss"], atol=ATOL, rtol=0)
    for st in stages[:-1]:
        assert float(st["loss"]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("r,k", [(4, 2), (1, 1), (3, 5), (4, 4), (3, 0)])
def test_pp2_equals_single_process(pp_results, r, k):
    assert_matches_reference(by_stage(pp_results, "pp", (r, k)), r, k)


@pytest.mark.slow
def test_pp2_without_timeline(pp_results):
    stages = by_stage(pp_results, "pp_untimed", (4, 2))
    assert_matches_reference(stages, 4, 2)
    assert all(st["timeline"] == [] for st in stages)


@pytest.mark.slow
@pytest.mark.parametrize("r,k", [(4, 2), (3, 5)])
def test_one_stage_pipeline_equals_single_process(pp_results, r, k):
    for rank in range(2):
        assert_matches_reference([pp_results[rank]["pp1"][(r, k)]], r, k)


def test_reference_distinguishes_windows():
    """The comparison above can fail: the window changes the gradients at this tolerance."""
    a, b = toy.reference(4, 2), toy.reference(4, 4)
    assert max((a["grads"][n] - b["grads"][n]).abs().max().item() for n in a["grads"]) > 1e-6


def assert_timeline_is_simulated(stages, r, k):
    p, m, w = len(stages), toy.M, BackpropWindow.of(r, k)
    for st in stages[1:]:
        assert st["timeline"] == stages[0]["timeline"]  # the same on every stage
    orders = build_order(p, m, w)
    assert stages[0]["orders"] == [[tuple(op) for op in o] for o in orders]
    assert stages[0]["timeline"] == [vars(s) for s in simulate_timeline(orders, p, w)]
    for st in stages:
        assert st["bubble"] == pytest.approx(simulated_bubble(p, r, k, m))


@pytest.mark.slow
@pytest.mark.parametrize("r,k", [(4, 2), (1, 1), (3, 5), (4, 4), (3, 0)])
def test_recorded_timeline_equals_simulation(pp_results, r, k):
    stages = by_stage(pp_results, "pp", (r, k))
    assert_timeline_is_simulated(stages, r, k)
    if (r, k) == (4, 4):
        assert abs(stages[0]["bubble"] - 0.0625) <= 0.1 * 0.0625


@pytest.mark.slow
@pytest.mark.parametrize("r,k", [(4, 2), (1, 1), (3, 5), (4, 4), (3, 0)])
def test_pp4_equals_single_process(pp4_results, r, k):
    """Four stages: next and previous stage differ, two middle stages without embed or head."""
    stages = by_stage(pp4_results, "pp", (r, k))
    assert_matches_reference(stages, r, k)
    assert_timeline_is_simulated(stages, r, k)


@pytest.mark.slow
def test_forward_only_trips_save_nothing(pp_results):
    for rank in range(2):
        counts = pp_results[rank]["saved"]
        assert counts[(6, 2)] == counts[(2, 2)] > 0, counts
