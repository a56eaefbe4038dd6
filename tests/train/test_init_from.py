"""checkpoint.init_from: a fresh run from another checkpoint's model weights (Ouro's two stages: exit_gate, then
exit_gate_tune with the LM frozen). After stage 2 every LM weight is bit-identical to stage 1's and only the
gate moved; a run whose objective adds modules names the tensors it kept as initialised; a bad source is one
error line with nothing written."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SMALL, TINY, assert_one_error, read_metrics, run_cli

COMMON = ["train", str(TINY), *SMALL, "checkpoint.interval=0", "logging.tensorboard=false",
          "recurrence.sampler=fixed", "recurrence.depth=3", "recurrence.backprop_depth=2"]


def weights(run_dir):
    from recurdepth.infer.loading import load_model

    return {n: p.detach().clone() for n, p in load_model(run_dir).model.named_parameters()}


@pytest.mark.slow
def test_two_stage_exit_gate_training_keeps_the_lm_and_moves_the_gate(tmp_path, data_cache, megatron_single_process):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    run_cli([*COMMON, "objective.kind=exit_gate", "train.steps=3", f"train.run_dir={stage1}",
             f"data.cache_dir={data_cache}"])
    out = run_cli([*COMMON, "objective.kind=exit_gate_tune", "train.steps=3", f"train.run_dir={stage2}",
                   f"checkpoint.init_from={stage1}", "optimizer.lr=0.05", f"data.cache_dir={data_cache}"])
    assert "initialised from the model weights of" in out.stdout and "kept as initialised" not in out.stdout
    assert read_metrics(stage2)[0]["step"] == 1  # a fresh run
    before, after = weights(stage1), weights(stage2)
    assert before.keys() == after.keys()
    moved = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert moved == ["exit_gate.bias", "exit_gate.weight"]


@pytest.mark.slow
def test_modules_the_source_lacks_are_named_and_kept(tmp_path, data_cache):
    source = tmp_path / "lm"
    run_cli([*COMMON, "train.steps=1", f"train.run_dir={source}", f"data.cache_dir={data_cache}"])
    out = run_cli([*COMMON, "objective.kind=exit_gate", "train.steps=1", f"train.run_dir={tmp_path / 'gated'}",
                   f"checkpoint.init_from={source}/checkpoints", f"data.cache_dir={data_cache}"])
    assert "not in it, kept as initialised: exit_gate.bias, exit_gate.weight" in out.stdout


def test_a_missing_source_is_one_error_line_and_nothing_is_written(tmp_path, data_cache):
    out = run_cli([*COMMON, "train.steps=1", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}",
                   f"checkpoint.init_from={tmp_path / 'nowhere'}"], check=False, timeout=120)
    assert_one_error(out, "not found")
    assert not (tmp_path / "run").exists()


def test_another_model_shape_is_refused_in_one_line(tmp_path, data_cache):
    source = tmp_path / "lm"
    run_cli([*COMMON, "train.steps=1", f"train.run_dir={source}", f"data.cache_dir={data_cache}"])
    out = run_cli([*COMMON, "train.steps=1", "model.hidden_size=32", f"train.run_dir={tmp_path / 'run'}",
                   f"checkpoint.init_from={source}", f"data.cache_dir={data_cache}"], check=False, timeout=120)
    assert_one_error(out, "shapes differ")
    assert not (tmp_path / "run").exists()
