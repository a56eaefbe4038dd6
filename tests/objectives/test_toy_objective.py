"""An objective added from this file alone (no line of recurdepth changed): registered with `register_objective`,
with its own config section (an option and its validation), an extra module the model carries, a step hook and a
metric. It trains 2 steps in one process, on DP=2 and on PP=2 (the looped schedule runs it: one pass), with the
same losses on every layout.

    python tests/objectives/test_toy_objective.py train ...            # this file is also the launcher script
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from tests.conftest import ROOT, SMALL, TINY, assert_one_error, assert_same_losses, cli_command, read_metrics

STEPS = 2


def define_toy():
    """The toy objective: the LM loss times (weight + s), s a learned scalar that starts at 0."""
    import torch

    from recurdepth.config import require
    from recurdepth.objectives import LMObjective, ObjectiveSection, masked_loss_sum

    @dataclass
    class ToySection(ObjectiveSection):
        kind: str = "toy"
        weight: float = 0.5

        def validate(self, cfg) -> None:
            require(self.weight > 0, "objective.weight", self.weight, "use a weight > 0")

    class ToyScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(1))  # 1-D: initialize_parameters fills it with 0

    class ToyObjective(LMObjective):
        kind = "toy"
        Section = ToySection

        def __init__(self, cfg, tokenizer):
            super().__init__(cfg, tokenizer)
            self.step = -1

        @classmethod
        def extra_modules(cls, cfg, first_stage, last_stage):
            return {"toy": ToyScale()} if last_stage else {}

        def set_step(self, step):
            self.step = step

        def factor(self, model):
            from recurdepth.parallel.passes import unwrap

            m = unwrap(model)
            return self.cfg.objective.weight + m.toy.scale

        def loss_sum(self, model, mb, window, collect_health=False):
            per_token = model(mb.tokens, labels=mb.labels, window=window, sample_ids=mb.sample_ids)
            return masked_loss_sum(per_token, mb.loss_mask) * self.factor(model)[0]

        def pipeline_loss(self, per_token, mb):
            return masked_loss_sum(per_token, mb.loss_mask) * self.factor(self.model)[0]

        def metrics(self):
            return {"toy_step": float(self.step)}

    return ToyObjective


BASE = ["train", str(TINY), *SMALL, f"train.steps={STEPS}", "checkpoint.interval=0", "checkpoint.save_final=false",
        "logging.tensorboard=false", "recurrence.sampler=fixed", "recurrence.depth=3", "recurrence.backprop_depth=2",
        "objective.kind=toy", "objective.weight=0.7"]


def run_toy(args: list, nproc: int) -> subprocess.CompletedProcess:
    _, env = cli_command(args, nproc=nproc)
    env["PYTHONPATH"] = str(ROOT)
    script = os.path.join(ROOT, "tests", "objectives", "test_toy_objective.py")
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_a_registered_objective_trains_on_one_process_dp2_and_pp2(tmp_path, data_cache):
    runs = {}
    for name, nproc, extra in (("one", 1, []), ("dp2", 2, ["train.micro_batch_size=2"]),
                               ("pp2", 2, ["parallel.pipeline=2"])):
        run_dir = tmp_path / name
        out = run_toy([*BASE, *extra, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"], nproc)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
        runs[name] = read_metrics(run_dir)
    for name in ("dp2", "pp2"):
        assert_same_losses(runs["one"], runs[name], STEPS)
    for rows in runs.values():
        assert [r["health/toy_step"] for r in rows] == [0.0, 1.0]  # set_step and metrics reached the step


def test_a_registered_objectives_option_is_validated_by_its_own_rule(tmp_path):
    out = run_toy([*BASE, "objective.weight=-1", f"train.run_dir={tmp_path}"], 1)
    assert_one_error(out, "objective.weight=-1", "use a weight > 0")


def test_a_registered_objectives_options_are_its_own():
    from recurdepth.config import load_config
    from recurdepth.errors import ConfigError
    from recurdepth.objectives import register_objective

    register_objective("toy", define_toy())
    assert load_config(None, ["objective.kind=toy", "objective.weight=0.25"]).objective.weight == 0.25
    with pytest.raises(ConfigError, match="objective.weight is an option of objective.kind=toy, not of lm"):
        load_config(None, ["objective.weight=0.25"])
    with pytest.raises(ConfigError, match="unknown config key objective.wieght"):
        load_config(None, ["objective.kind=toy", "objective.wieght=0.25"])


if __name__ == "__main__":
    from recurdepth.cli import main
    from recurdepth.objectives import register_objective

    register_objective("toy", define_toy())
    sys.exit(main())
