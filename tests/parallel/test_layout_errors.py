"""Impossible layouts fail with one line naming the cause and the fix, before any process group exists."""

import pytest

from recurdepth.config import load_config
from recurdepth.distributed import check_layout
from recurdepth.errors import ConfigError
from tests.conftest import TINY, run_cli


@pytest.mark.parametrize("world,overrides,needle", [
    (3, ["parallel.tensor=2"], "world size 3 is not divisible by parallel.tensor x parallel.pipeline = 2 x 1"),
    (4, ["parallel.pipeline=2", "model.core_layers=3"], "model.core_layers=3 is not divisible by parallel.pipeline=2"),
    (4, ["model.num_experts=6", "parallel.expert=4"], "model.num_experts=6 is not divisible by parallel.expert=4"),
    (2, ["parallel.expert=2"], "parallel.expert=2 needs an MoE model"),
    (4, ["parallel.tensor=4", "model.num_heads=6", "model.hidden_size=96"], "parallel.tensor=4 does not divide model.num_heads=6"),
    (2, ["train.global_batch_size=6", "train.micro_batch_size=2"], "global_batch_size=6 is not divisible by micro_batch_size x data-parallel size = 2 x 2"),
])
def test_check_layout_names_cause_and_fix(world, overrides, needle):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, world)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_valid_layouts_give_the_data_parallel_size():
    assert check_layout(load_config(TINY, ["parallel.tensor=2", "train.micro_batch_size=4"]), 8) == 4
    assert check_layout(load_config(TINY, ["model.num_experts=4", "parallel.expert=2"]), 2) == 2


@pytest.mark.slow
def test_torchrun_layout_error_exits_2_before_groups(tmp_path):
    out = run_cli(["train", str(TINY), "model.core_layers=3", "parallel.pipeline=2", f"train.run_dir={tmp_path / 'r'}"],
                  nproc=2, check=False, timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    errors = [ln for ln in text.splitlines() if "error: " in ln]
    assert len(errors) == 1 and "not divisible by parallel.pipeline=2" in errors[0]
    assert "exitcode  : 2" in text  # the rank that reported it exited 2 (torchrun itself then exits 1)
    assert "/recurdepth/" not in "".join(ln for ln in text.splitlines() if ln.strip().startswith("File "))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_the_error_line_survives_a_rank_1_quicker_than_rank_0(tmp_path):
    """torchrun tears the job down at the first rank that exits: with rank 0 started 4 s late, a rank 1 that
    exited at once would take rank 0 (the one rank that prints a same-on-every-rank error) with it."""
    import os
    import sys

    script = tmp_path / "late_rank0.sh"
    script.write_text(f'#!/bin/sh\n[ "$RANK" = 0 ] && sleep 4\nexec {sys.executable} "$@"\n')
    os.chmod(script, 0o755)
    out = run_cli(["train", str(TINY), "model.core_layers=3", "parallel.pipeline=2", f"train.run_dir={tmp_path / 'r'}"],
                  nproc=2, check=False, timeout=120, torchrun_args=("--no-python", str(script)))
    text = out.stdout + out.stderr
    errors = [ln for ln in text.splitlines() if "error: " in ln]
    assert out.returncode != 0 and len(errors) == 1, text[-3000:]
    assert "not divisible by parallel.pipeline=2" in errors[0]
