"""Each objective trains under DP=2 and PP=2 (torchrun/gloo, fp32) with the per-step losses of one process
(1e-5 relative): pause (random pretraining pauses and M pauses before procedural answers; the looped pipeline
schedule), coconut (its curriculum crosses stages 0..3 in 4 steps, so 1, 3, 5 and 5 passes per micro-batch;
`pipeline_run` through `pipelined_forward`), the plain LM objective driven through `pipelined_forward`, and the
learned exits (exit_gate, ponder) and deep supervision under DP=2, TP=2 and PP=2, the recursion routers and
per-sample depth under DP=2 and TP=2 (they refuse PP: tests/objectives/test_router.py, test_sized_depth.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SMALL, TINY, assert_same_losses, cli_command, read_metrics, run_cli

STEPS = 4
BASE = ["train", str(TINY), *SMALL, f"train.steps={STEPS}", "checkpoint.interval=0", "checkpoint.save_final=false",
        "logging.tensorboard=false", "recurrence.sampler=fixed", "recurrence.depth=3", "recurrence.backprop_depth=2"]
OBJECTIVE = {
    "pause": ["objective.kind=pause", "objective.pause_fraction=0.15", "objective.pause_count=3",
              "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    "coconut": ["objective.kind=coconut", "objective.coconut_thoughts_per_step=2", "objective.coconut_max_stage=2",
                "objective.coconut_stage_steps=1", "model.seq_length=80",
                "data.sources=[{procedural: multiplication, n: 500, difficulty: {max_digits: 2}}]"],
    "lm": ["data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    # learned exits: every iteration read out, the gate's halting distribution in the loss
    "exit_gate": ["objective.kind=exit_gate", "objective.exit_beta=0.05",
                  "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    "deep_supervision": ["objective.kind=deep_supervision", "objective.supervision_segments=2",
                         "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    "ponder": ["objective.kind=ponder", "objective.readout=last",
               "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    # Mixture-of-Recursions: expert-choice (top-k per iteration, MoR's capacities) and token-choice (padded rows)
    "router_expert": ["objective.kind=recursion_router", "objective.router=expert",
                      "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    "router_token": ["objective.kind=recursion_router", "objective.router=token",
                     "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"],
    # per-sample depth: hops k = 1..4 -> r = k, each row its own window (k = 2)
    "depth_by_size": ["objective.kind=depth_by_size",
                      "data.sources=[{procedural: hops, n: 500, difficulty: {min_hops: 1, max_hops: 4}}]"],
}
LAYOUTS = {"dp2": ["train.micro_batch_size=2"], "pp2": ["parallel.pipeline=2", "parallel.record_timeline=true"],
           "tp2": ["parallel.tensor=2"]}


def lm_bubble(p: int, r: int, k: int, m: int) -> float:
    """The plain LM's bubble at p, r, k, m from the looped schedule's own timeline (its executor records exactly
    this simulation: tests/parallel)."""
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.parallel.schedule import build_order, simulate_timeline, timeline_bubble

    w = BackpropWindow.of(r, k)
    return timeline_bubble(simulate_timeline(build_order(p, m, w), p, w), p)


def assert_bubble_like_the_lm(rows: list, m: int) -> None:
    """Multi-pass micro-batches interleaved over the stages: every step's recorded bubble within 1.2x of the plain
    LM's at the same p=2, r, k, m (run one after another they would idle about half the time)."""
    got = [(row["health/pipeline_bubble"], lm_bubble(2, row["depth"], row["backprop_depth"], m)) for row in rows]
    assert all(0 < b <= 1.2 * lm for b, lm in got), got


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_cache):
    cache = {}

    def get(kind):
        if kind not in cache:
            run_dir = tmp_path_factory.mktemp(f"{kind}-one-process")
            run_cli([*BASE, *OBJECTIVE[kind], f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"])
            cache[kind] = read_metrics(run_dir)
        return cache[kind]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("kind,layout", [("pause", "dp2"), ("pause", "pp2"), ("coconut", "dp2"), ("coconut", "pp2"),
                                         ("exit_gate", "dp2"), ("exit_gate", "tp2"), ("ponder", "tp2"),
                                         ("exit_gate", "pp2"), ("ponder", "pp2"),
                                         ("deep_supervision", "dp2"), ("deep_supervision", "tp2"),
                                         ("deep_supervision", "pp2"),
                                         ("router_expert", "dp2"), ("router_expert", "tp2"), ("router_token", "tp2"),
                                         ("depth_by_size", "dp2"), ("depth_by_size", "tp2")])
def test_objective_layout_matches_one_process(one_process, tmp_path, data_cache, kind, layout):
    run_cli([*BASE, *OBJECTIVE[kind], *LAYOUTS[layout], f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}"],
            nproc=2)
    rows = read_metrics(tmp_path)
    assert_same_losses(one_process(kind), rows, STEPS)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    if layout == "pp2":
        assert_bubble_like_the_lm(rows, m=4)  # global batch 8 in micro-batches of 2


@pytest.mark.slow
def test_lm_through_pipelined_forward_matches_one_process(one_process, tmp_path, data_cache):
    args = [*BASE, *OBJECTIVE["lm"], *LAYOUTS["pp2"], f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}"]
    _, env = cli_command(args, nproc=2)
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "objectives", "_pipelined_lm_main.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    rows = read_metrics(tmp_path)
    assert_same_losses(one_process("lm"), rows, STEPS)
    assert_bubble_like_the_lm(rows, m=4)
