"""Quiet-STaR trains under DP=2, PP=2 and TP=2 (torchrun, gloo) with the per-step losses of one process (1e-5):
thoughts are sampled from per-sample seeds, and under PP every stage runs the objective's passes through
`pipelined_forward`, and the thought streams' attention (KV-cached, block-sparse) runs each stage's layers and
each tensor-parallel rank's heads."""

import pytest

from tests.conftest import ROOT, read_metrics, run_cli
from tests.objectives.test_objective_layouts import assert_bubble_like_the_lm

STEPS = 3
COMMON = ["train", str(ROOT / "configs" / "quiet-star.yaml"), "model.hidden_size=32", "model.seq_length=16",
          "objective.thought_length=2", "objective.n_ahead=2", "train.global_batch_size=4", "train.micro_batch_size=2",
          f"train.steps={STEPS}", "train.eval_interval=0", "checkpoint.interval=0", "checkpoint.save_final=false",
          "logging.tensorboard=false", "logging.log_interval=1", "logging.peak_tflops=1", "optimizer.warmup_steps=1"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("quiet-star-one")
    run_cli([*COMMON, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"])
    return read_metrics(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel.pipeline=1"], ["parallel.pipeline=2", "parallel.record_timeline=true"],
                                    ["parallel.tensor=2"]],
                         ids=["dp2", "pp2", "tp2"])
def test_layout_matches_one_process(one_process, tmp_path, data_cache, layout):
    run_cli([*COMMON, *layout, f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}"], nproc=2)
    rows = read_metrics(tmp_path)
    assert len(rows) == len(one_process) == STEPS
    for a, b in zip(one_process, rows):
        assert a["depth"] == b["depth"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    if "parallel.pipeline=2" in layout:  # the micro-batches' passes interleaved over the stages
        assert_bubble_like_the_lm(rows, m=2)
