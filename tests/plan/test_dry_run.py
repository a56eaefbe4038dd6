"""`recurdepth plan --dry-run`: the real modules of each stage's representative rank, built on the meta device
under the fake process group, hold the bytes the analytic plan says (within 1%)."""

import json
import subprocess
import sys

import pytest

from recurdepth.config import load_config
from recurdepth.errors import ConfigError
from recurdepth.plan.dryrun import dry_run

SMALL = ["parallel.tensor=2", "parallel.pipeline=2", "train.global_batch_size=16", "train.micro_batch_size=4",
         "model.vocab_size=512"]


def small(extra=()):
    return load_config("configs/tiny.yaml", SMALL + list(extra))


def fresh_dry_run(miscount: bool = False) -> list[dict]:
    """dry_run of the small layout in a new process (it needs one without torch.distributed, which other tests
    in this session initialise); `miscount` adds a layer to stage 1 in plan's shape model."""
    code = f"""
import json
from recurdepth.config import load_config
from recurdepth.plan import shape
from recurdepth.plan.dryrun import dry_run
real = shape.core_layers_on
if {miscount}:
    shape.core_layers_on = lambda cfg, s, pp: real(cfg, s, pp) + (s == 1)
run = dry_run(load_config("configs/tiny.yaml", {SMALL!r}), 1, 8, "h100")
assert (run.plan.tp, run.plan.pp, run.plan.dp) == (2, 2, 2)
print(json.dumps([dict(rank=r.rank, stage=r.stage, params=r.params, worst=r.worst_rel, ops=r.schedule_ops,
                       rel=abs(r.rel(r.params, r.analytic_params))) for r in run.ranks]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_each_stage_matches_the_plan_within_one_percent():
    ranks = fresh_dry_run()  # TP=2 x PP=2 x DP=2 on 8 fake ranks
    assert [r["rank"] for r in ranks] == [0, 4] and [r["stage"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["params"] > 0 and r["worst"] < 0.01, ranks
        assert r["ops"] > 0  # the trainer's pipeline schedule was built for the stage


def test_a_miscounted_stage_is_caught():
    assert fresh_dry_run(miscount=True)[1]["rel"] > 0.01


def test_a_layout_that_does_not_divide_is_one_line():
    with pytest.raises(ConfigError, match="not divisible"):
        dry_run(small(), 1, 6, "h100")
