"""Operations: agreed graceful stop, restart after SIGKILL, crash while checkpointing and the numerical guard
(retention: tests/train/test_retention.py)."""

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, SMALL, TINY, cli_command, read_metrics, run_cli

DECAY = 60  # a fixed LR schedule, so runs of different lengths share it
COMMON = ["train", str(TINY), *SMALL, "logging.tensorboard=false", "data.sources=[{builtin: stdlib-docs}]",
          f"optimizer.decay_steps={DECAY}"]


def last_per_step(rows):
    return {r["step"]: r for r in rows}  # after a restart a step may be logged twice: the later one counts


def straight(tmp_path, data_cache, steps, nproc=1):
    run_dir = tmp_path / f"straight-{steps}-{nproc}"
    run_cli([*COMMON, f"train.steps={steps}", "checkpoint.interval=0", "checkpoint.save_final=false",
             f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"], nproc=nproc)
    return last_per_step(read_metrics(run_dir))


@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_and_resumes_identically(tmp_path, data_cache):
    run_dir = tmp_path / "stopped"
    cmd, env = cli_command([*COMMON, "train.steps=400", "checkpoint.interval=0", f"train.run_dir={run_dir}",
                            f"data.cache_dir={data_cache}"], nproc=2)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "recurdepth" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].send_signal(signal.SIGTERM)  # one rank only: the other must follow at the same step
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    assert "stopping after step" in out
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().strip()[5:])
    assert 3 <= stopped_at < 400
    total = stopped_at + 3
    run_cli([*COMMON, f"train.steps={total}", "checkpoint.interval=0", f"train.run_dir={run_dir}",
             f"data.cache_dir={data_cache}"], nproc=2)
    resumed, ref = last_per_step(read_metrics(run_dir)), straight(tmp_path, data_cache, total, nproc=2)
    assert sorted(resumed) == list(range(1, total + 1))
    assert [resumed[s]["loss"] for s in resumed] == [ref[s]["loss"] for s in ref]


@pytest.mark.slow
def test_sigkill_restart_matches_uninterrupted(tmp_path, data_cache):
    run_dir = tmp_path / "killed"
    out = run_cli([*COMMON, "train.steps=8", "checkpoint.interval=2", f"train.run_dir={run_dir}",
                   f"data.cache_dir={data_cache}"], nproc=2, torchrun_args=("--max-restarts=1",),
                  env_extra={"RECURDEPTH_KILL_AT_STEP": "5:1"})
    assert "resumed from" in out.stdout and "step_00000004" in out.stdout
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows].count(5) == 2  # step 5 ran before the kill and again after the restart
    got, ref = last_per_step(rows), straight(tmp_path, data_cache, 8, nproc=2)
    assert [got[s]["loss"] for s in range(1, 9)] == [ref[s]["loss"] for s in range(1, 9)]


def test_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, data_cache):
    run_dir = tmp_path / "crashed"
    args = [*COMMON, "train.steps=6", "checkpoint.interval=2", f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"]
    crashed = run_cli(args, check=False, env_extra={"RECURDEPTH_CRASH_IN_SAVE_AT_STEP": "4"})
    assert crashed.returncode == 17
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    assert (ckpts / "step_00000004.tmp").is_dir() and not (ckpts / "step_00000004").exists()
    out = run_cli(args)
    assert "resumed from" in out.stdout and "step_00000002" in out.stdout
    assert not (ckpts / "step_00000004.tmp").exists() and (ckpts / "latest").read_text().strip() == "step_00000006"
    got, ref = last_per_step(read_metrics(run_dir)), straight(tmp_path, data_cache, 6)
    assert [got[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]


@pytest.fixture(scope="module")
def nan_runs(tmp_path_factory, data_cache):
    base = tmp_path_factory.mktemp("nan")
    runs = {}
    for action in ("halt", "skip", "rollback"):
        run_dir = base / action
        runs[action] = (run_dir, run_cli(
            [*COMMON, "train.steps=7", "checkpoint.interval=2", f"train.on_bad_step={action}",
             f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"], check=False,
            env_extra={"RECURDEPTH_INJECT_NAN_AT_STEP": "5"}))
    return runs


def bad_steps(run_dir: Path):
    return [json.loads(x) for x in (run_dir / "bad_steps.jsonl").read_text().splitlines()]


def test_nan_halt_stops_with_message_and_checkpoint(nan_runs):
    run_dir, out = nan_runs["halt"]
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step 5: non-finite loss" in errors[0] and "halted" in errors[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"  # before the bad update
    assert bad_steps(run_dir)[0]["action"] == "halt"


def test_nan_skip_drops_the_update_and_records_the_step(nan_runs, tmp_path, data_cache):
    run_dir, out = nan_runs["skip"]
    assert out.returncode == 0, out.stderr[-2000:]
    rows = last_per_step(read_metrics(run_dir))
    assert rows[5]["guard"].startswith("non-finite loss") and sorted(rows) == list(range(1, 8))
    assert all(rows[s]["loss"] == rows[s]["loss"] for s in (6, 7))  # finite again
    assert bad_steps(run_dir) == [dict(bad_steps(run_dir)[0], step=5, action="skip")]
    ref = straight(tmp_path, data_cache, 7)
    assert [rows[s]["loss"] for s in range(1, 6) if s != 5] == [ref[s]["loss"] for s in range(1, 5)]
    assert rows[6]["loss"] != ref[6]["loss"]  # the dropped update shows in later losses


def test_nan_rollback_reloads_and_skips_the_batch(nan_runs, tmp_path, data_cache):
    run_dir, out = nan_runs["rollback"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rolled back to step_00000004" in out.stdout
    record = bad_steps(run_dir)[0]
    assert record["action"] == "rollback" and record["step"] == 5
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows][-3:] == [5, 6, 7] and all(r["loss"] == r["loss"] for r in rows[-3:])
    ref = straight(tmp_path, data_cache, 7)
    assert [r["lr"] for r in rows[-3:]] == [ref[s]["lr"] for s in (5, 6, 7)]  # the schedule resumes in step
    assert rows[-3]["loss"] != ref[5]["loss"]  # step 5 trained on the next batch, not the bad one
