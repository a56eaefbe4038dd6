"""`recurdepth sweep` end to end: a refused sweep file is one error line and writes nothing; a local sweep
killed in its second run and run again skips the finished run, resumes the killed one from its checkpoint and
writes rows `recurdepth compare` reads; `--slurm` writes a job array whose task runs under the simulated slurm
of tests/test_launch.py and appends its row, accuracy at the test depths included."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from recurdepth.compare.results import read_results
from tests.conftest import ROOT, TINY, assert_one_error, cli_command, run_cli
from tests.test_launch import fake_bin

# tiny shapes, few steps; a small procedural set keeps `recurdepth eval`'s held-out split quick to draw
COMMON = ["model.hidden_size=32", "model.num_heads=2", "model.seq_length=32", "train.global_batch_size=4",
          "train.micro_batch_size=2", "optimizer.warmup_steps=1", "logging.peak_tflops=1",
          "logging.tensorboard=false", "logging.health_interval=0", "logging.log_interval=1", "checkpoint.interval=2",
          "data.sources=[{builtin: stdlib-docs, weight: 0.8}, {procedural: addition, n: 300, weight: 0.2}]"]


def write_sweep(tmp_path: Path, data_cache: str, families: dict, budgets=(1e9,), **extra) -> Path:
    spec = {"base": str(TINY), "out": str(tmp_path / "out"), "overrides": [*COMMON, f"data.cache_dir={data_cache}"],
            "budgets": list(budgets), "seeds": [0], "families": families, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("families,budgets,mode,needle", [
    ({"looped": {"overrides": ["model.hiden_size=64"]}}, (1e9,), [],
     "family 'looped' rung 0: unknown config key model.hiden_size; did you mean model.hidden_size?"),
    ({"looped": {}}, (1e6, 1e9), ["--slurm"], "family 'looped' rung 0: budget 1e+06 FLOPs is below one optimizer step"),
], ids=["unknown-key", "budget-below-one-step"])
def test_bad_sweep_is_one_error_line_and_writes_nothing(tmp_path, data_cache, families, budgets, mode, needle):
    path = write_sweep(tmp_path, data_cache, families, budgets)
    assert_one_error(run_cli(["sweep", str(path), *mode], check=False), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # no out directory


def attempts(run_dir: Path) -> list:
    return [json.loads(line)["what"] for line in (run_dir / "sweep_attempts.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_sweep_rerun_skips_finished_runs_and_resumes_the_killed_one(tmp_path, data_cache):
    path = write_sweep(tmp_path, data_cache, eval={"test_depths": [], "points": 2}, budgets=(0.9e9,), families={
        "deep": {"overrides": ["recurrence.sampler=fixed", "recurrence.depth=2"]},
        "shallow": {"overrides": ["recurrence.sampler=fixed", "recurrence.depth=1"]}})
    out = tmp_path / "out"
    first, second = out / "runs" / "deep-r0-s0", out / "runs" / "shallow-r0-s0"
    # SIGKILL the sweep once its second run has a checkpoint (its trainer dies with it); should the run outpace
    # the poll, its trainer SIGKILLs itself after step 12 (deep-r0-s0 has 10 steps, shallow-r0-s0 14)
    cmd, env = cli_command(["sweep", str(path)], env_extra={"RECURDEPTH_KILL_AT_STEP": "12:0"})
    sweep = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (second / "checkpoints" / "latest").exists() and sweep.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        sweep.kill()
        text = sweep.communicate()[0]
    finally:
        sweep.kill()
    assert sweep.returncode in (-9, 1), text[-3000:]
    plan = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert plan["deep-r0-s0"]["steps"] < 12 < plan["shallow-r0-s0"]["steps"]
    assert len(read_results(out).rows) == 1
    stamp = (first / "metrics.jsonl").stat().st_mtime_ns
    again = run_cli(["sweep", str(path)])
    assert "deep-r0-s0 is finished" in again.stdout and "2 of 2 run(s) finished" in again.stdout, again.stdout
    assert "resumed from" in (second / "sweep.log").read_text()
    assert attempts(first) == ["train"] and (first / "metrics.jsonl").stat().st_mtime_ns == stamp  # not re-run
    assert attempts(second)[-1] == "train" and len(attempts(second)) in (1, 2)  # a SIGKILLed sweep saw no end
    results = read_results(out)
    assert [r["variant"] for r in results.rows] == ["deep-r0-s0", "shallow-r0-s0"]
    for row in results.rows:
        planned = plan[row["variant"]]
        assert row["model_flops"] == pytest.approx(planned["model_flops"], rel=1e-9)  # the trainer's own count
        assert planned["model_flops"] - row["model_flops"] / planned["steps"] < row["budget_flops"] <= row["model_flops"]
        assert row["tokens"] == planned["steps"] * 4 * 32 and row["accuracy"] == {}
        assert row["best_val_loss"] <= row["final_val_loss"] and row["peak_memory_bytes"] > 10 ** 7
    assert results.rows[0]["depth"] == 2 and results.rows[1]["depth"] == 1
    assert results.rows[0]["config_hash"] != results.rows[1]["config_hash"]


@pytest.mark.slow
def test_slurm_job_array_task_runs_under_simulated_slurm(tmp_path, data_cache):
    path = write_sweep(tmp_path, data_cache, families={"looped": {"overrides": ["recurrence.mean=2"]}},
                       eval={"test_depths": [1, 2], "n": 4}, budgets=(5e8,), slurm={"time": "00:30:00"})
    out = run_cli(["sweep", str(path), "--slurm"])
    script = tmp_path / "out" / "sweep.sbatch"
    assert f"wrote {script}: a job array of 1 run(s)" in out.stderr and os.access(script, os.X_OK)
    text = script.read_text()
    assert "#SBATCH --array=0-0\n" in text and "#SBATCH --time=00:30:00" in text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sweep.json", "sweep.sbatch"]
    log = tmp_path / "log"
    log.mkdir()
    fake_bin(tmp_path, "scontrol", f'echo "$@" > {log}/scontrol')
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_JOB_ID="4242", SLURM_JOB_ID="4243", SLURM_PROCID="0",
               SLURM_NTASKS="1", SLURM_JOB_NODELIST="nodeA", PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    job = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "== recurdepth sweep task 0 of job 4242" in job.stdout and "sweep task exited with status 0" in job.stdout
    assert not (log / "scontrol").exists()  # no USR1: nothing requeued
    (row,) = read_results(tmp_path / "out").rows
    assert row["variant"] == "looped-r0-s0" and row["family"] == "looped" and row["rung"] == 0
    assert set(row["accuracy"]) == {"r=1", "r=2"} and row["depth"] == 2.0
    assert row["tokenizer"].startswith("byte:264:") and row["dataset"].startswith("mix-")
    assert row["effective_params"] == row["params_once"] + 2 * row["params_rec"]
