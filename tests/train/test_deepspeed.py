"""The DeepSpeed engine (ZeRO 1/2/3, optimizer offload) against the megatron engine, exact resume under
DeepSpeed, and its refusals. All runs are DP=2 under torchrun/gloo with DeepSpeed's CPU accelerator."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMALL, TINY, assert_same_losses, read_metrics, run_cli

STEPS = 6
NAN_STEP = 2  # every run below injects a NaN loss at this step and skips it: the skip path is compared too


def common(run_dir, data_cache, *extra):
    return ["train", str(TINY), *SMALL, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}",
            "logging.tensorboard=false", f"optimizer.decay_steps={STEPS}", "train.on_bad_step=skip", *extra]


def train(run_dir, data_cache, *extra, steps=STEPS, check=True):
    return run_cli([*common(run_dir, data_cache, *extra), f"train.steps={steps}"], nproc=2, check=check,
                   env_extra={"RECURDEPTH_INJECT_NAN_AT_STEP": str(NAN_STEP)})


@pytest.fixture(scope="module")
def megatron_run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("megatron")
    train(run_dir, data_cache, "checkpoint.interval=0")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("stage,offload", [(1, False), (2, True), (3, False)])
def test_zero_stages_match_the_megatron_engine(megatron_run, tmp_path, data_cache, stage, offload):
    run_dir = tmp_path / f"zero{stage}"
    out = train(run_dir, data_cache, "train.engine=deepspeed", f"deepspeed.zero_stage={stage}",
                f"deepspeed.offload_optimizer={str(offload).lower()}", "checkpoint.interval=0")
    assert f"deepspeed ZeRO-{stage}" in out.stdout
    reference, ds = read_metrics(megatron_run), read_metrics(run_dir)
    assert_same_losses(reference, ds, STEPS, atol=1e-5)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it trains
    # the skipped step is recorded, and the DeepSpeed config this run used is in its run directory
    bad = [json.loads(line) for line in (run_dir / "bad_steps.jsonl").read_text().splitlines()]
    assert [(b["step"], b["action"]) for b in bad] == [(NAN_STEP, "skip")]
    written = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert written["zero_optimization"]["stage"] == stage
    assert ("offload_optimizer" in written["zero_optimization"]) == offload
    assert written["train_batch_size"] == 8 and written["gradient_accumulation_steps"] == 2


@pytest.mark.slow
def test_resume_under_deepspeed_is_exact(tmp_path, data_cache):
    ds = ["train.engine=deepspeed", "deepspeed.zero_stage=3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(straight, data_cache, *ds, "checkpoint.interval=0")
    train(split, data_cache, *ds, "checkpoint.interval=3", steps=3)
    ckpt = split / "checkpoints" / "step_00000003"
    assert (ckpt / "deepspeed").is_dir() and json.loads((ckpt / "recurdepth.json").read_text())["engine"] == "deepspeed"
    out = train(split, data_cache, *ds, "checkpoint.interval=3")
    assert "resumed from" in out.stdout
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in a][NAN_STEP:] == [r["loss"] for r in b][NAN_STEP:]  # exact, not a tolerance

    # the other engine, or another data-parallel size, refuses this checkpoint with one line and exit 2
    bad = run_cli([*common(split, data_cache, "checkpoint.resume=required"), f"train.steps={STEPS + 1}"], nproc=2,
                  check=False)
    text = bad.stdout + bad.stderr
    assert "error: " in text and "written by the deepspeed engine" in text  # (torchrun adds its own traceback)
    assert "exitcode  : 2" in text  # the ranks exited 2 (torchrun itself then exits 1)
    bad = run_cli([*common(split, data_cache, *ds), f"train.steps={STEPS + 1}"], nproc=1, check=False)
    assert bad.returncode == 2 and "on 2 ranks" in bad.stderr and "Traceback" not in bad.stderr
    assert (split / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"  # nothing damaged


def test_deepspeed_refuses_model_parallel_layouts(tmp_path, data_cache):
    out = run_cli([*common(tmp_path / "x", data_cache, "train.engine=deepspeed", "parallel.tensor=2"), "train.steps=1"],
                  check=False)
    assert out.returncode == 2 and "data parallelism only" in out.stderr and "Traceback" not in out.stderr
    out = run_cli([*common(tmp_path / "x", data_cache, "train.engine=deepspeed", "deepspeed.offload_params=true"),
                   "train.steps=1"], check=False)
    assert out.returncode == 2 and "deepspeed.offload_params" in out.stderr
    assert not (tmp_path / "x").exists()


def test_a_plain_process_trains_with_deepspeed_without_launcher_variables(tmp_path, data_cache):
    """No torchrun, no LOCAL_RANK (a plain process, srun, MPICH): DeepSpeed's own assertion wants LOCAL_RANK;
    the engine fills it from the discovered rank instead of a traceback."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run([sys.executable, "-m", "recurdepth", *common(tmp_path / "run", data_cache),
                          "train.steps=2", "train.engine=deepspeed", "checkpoint.interval=0",
                          "checkpoint.save_final=false"], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0 and "done: 2 steps" in out.stdout, out.stderr[-3000:]
