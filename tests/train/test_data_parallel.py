"""Data parallel (megatron DDP + distributed optimizer) under torchrun/gloo equals one process."""

import pytest

from tests.conftest import SMALL, TINY, read_metrics, run_cli


@pytest.mark.slow
def test_two_ranks_match_one_rank(tmp_path, data_cache):
    common = ["train", str(TINY), *SMALL, "train.steps=5", f"data.cache_dir={data_cache}",
              "checkpoint.interval=0", "checkpoint.save_final=false", "logging.tensorboard=false"]
    run_cli([*common, f"train.run_dir={tmp_path / 'dp1'}"], nproc=1)
    run_cli([*common, f"train.run_dir={tmp_path / 'dp2'}"], nproc=2)
    one, two = read_metrics(tmp_path / "dp1"), read_metrics(tmp_path / "dp2")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert a["depth"] == b["depth"]
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]
