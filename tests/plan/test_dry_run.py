"""`recurdepth plan --dry-run`: the real modules of each stage's representative rank, built on the meta device
under the fake process group, hold the bytes the analytic plan says (within 1%)."""

import pytest

from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from recurdepth.plan import shape
from recurdepth.plan.dryrun import dry_run

SMALL = ["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=16", "train.micro_batch_size=4",
         "model.vocab_size=512"]


def small(extra=()):
    return load_config("configs/tiny.yaml", SMALL + list(extra))


def test_each_stage_matches_the_plan_within_one_percent():
    run = dry_run(small(), 1, 8, "h100")  # TP=2 x PP=2 x DP=2 on 8 fake ranks
    assert (run.plan.tp, run.plan.pp, run.plan.dp) == (2, 2, 2)
    assert [r.rank for r in run.ranks] == [0, 4] and [r.stage for r in run.ranks] == [0, 1]
    for r in run.ranks:
        assert r.params > 0 and r.worst_rel < 0.01, run.format()
        assert r.schedule_ops > 0  # the trainer's pipeline schedule was built for the stage


def test_a_miscounted_stage_is_caught(monkeypatch):
    real = shape.core_layers_on
    monkeypatch.setattr(shape, "core_layers_on", lambda cfg, s, pp: real(cfg, s, pp) + (s == 1))
    run = dry_run(small(), 1, 8, "h100")
    assert abs(run.ranks[1].rel(run.ranks[1].params, run.ranks[1].analytic_params)) > 0.01


def test_a_layout_that_does_not_divide_is_one_line():
    with pytest.raises(ConfigError, match="not divisible"):
        dry_run(small(), 1, 6, "h100")
