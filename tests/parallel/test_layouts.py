"""Every parallel layout gives the single-process numbers: 5 optimizer steps under torchrun/gloo, fp32,
per-step loss within 1e-5 relative of one process with the same global batch and weights."""

import pytest

from tests.conftest import SMALL, TINY, read_metrics, run_cli

STEPS = 5
COMMON = ["train", str(TINY), *SMALL, f"train.steps={STEPS}", "checkpoint.interval=0", "checkpoint.save_final=false",
          "logging.tensorboard=false", "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 2000, weight: 0.3}]"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("one-process")
    run_cli([*COMMON, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"])
    return read_metrics(run_dir)


def assert_same_losses(reference, rows):
    assert len(rows) == len(reference) == STEPS
    for a, b in zip(reference, rows):
        assert a["depth"] == b["depth"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [
    (2, ["parallel.tensor=2"]),
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (4, ["parallel.tensor=2"]),  # DP=2 x TP=2
], ids=["tp2", "tp2-sp", "dp2xtp2"])
def test_layout_matches_one_process(reference, tmp_path, data_cache, nproc, layout):
    run_cli([*COMMON, *layout, f"train.run_dir={tmp_path}", f"data.cache_dir={data_cache}"], nproc=nproc)
    assert_same_losses(reference, read_metrics(tmp_path))
