"""Checkpoints are never lost or corrupted by how a run is resumed, retained, guarded or misused: each test is
a fault a user hits, driven through the CLI, with the checkpoint folder compared before and after."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from recurdepth.train.checkpoint import ARCHIVE, LATEST, MANIFEST, complete_checkpoints, manifest
from tests.conftest import ROOT, SMALL, TINY, assert_one_error, cli_command, read_metrics, run_cli
from tests.snapshot import assert_unchanged, tree_snapshot

# Huginn-exportable small shapes (export is one of the loaders that must verify checksums)
COMMON = ["train", str(TINY), *SMALL, "logging.tensorboard=false", "data.sources=[{builtin: stdlib-docs}]",
          "optimizer.decay_steps=60", "model.norm_before_coda=true", "model.embedding_scale=8"]


def train(run_dir: Path, data_cache: str, *extra: str, check: bool = True, env: dict | None = None):
    return run_cli([*COMMON, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", *extra], check=check,
                   env_extra=env)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_cache) -> Path:
    """30 steps with checkpoints at 10, 20, 30 (copied by each test that changes it)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train(run_dir, data_cache, "train.steps=30", "checkpoint.interval=10")
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == [
        "step_00000010", "step_00000020", "step_00000030"]
    return run_dir


def copy_of(base_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(base_run, run_dir)
    return run_dir


def test_resume_never_is_refused_where_checkpoints_exist_and_fresh_moves_them_aside(base_run, tmp_path, data_cache):
    run_dir = copy_of(base_run, tmp_path)
    before = tree_snapshot(run_dir)
    out = train(run_dir, data_cache, "train.steps=20", "checkpoint.keep_last=1", "--resume", "never", check=False)
    assert_one_error(out, "--resume fresh", "step_00000030")
    assert_unchanged(before, run_dir)
    out = train(run_dir, data_cache, "train.steps=20", "checkpoint.interval=10", "checkpoint.keep_last=1",
                "--resume", "fresh")
    assert "moved 3 checkpoint(s) aside" in out.stdout
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000020"]
    assert (ckpts / LATEST).read_text().strip() == "step_00000020"
    archived = sorted(p.name for p in (ckpts / ARCHIVE).glob("*/step_*"))
    assert archived == ["step_00000010", "step_00000020", "step_00000030"]  # the old run, whole
    assert manifest(ckpts / "step_00000020")["run_id"] != manifest(base_run / "checkpoints" / "step_00000020")["run_id"]
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 21))  # the old run's rows moved aside too
    assert [r["step"] for r in read_metrics(next((ckpts / ARCHIVE).iterdir()))] == list(range(1, 31))


def test_resuming_an_earlier_step_with_keep_last_keeps_the_resume_point(base_run, tmp_path, data_cache):
    run_dir = copy_of(base_run, tmp_path)
    ckpts = run_dir / "checkpoints"
    out = train(run_dir, data_cache, "train.steps=25", "checkpoint.interval=5", "checkpoint.keep_last=1",
                "--resume", str(ckpts / "step_00000010"))
    assert "resumed from" in out.stdout and "moved 2 checkpoint(s) aside" in out.stdout
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000010", "step_00000025"]
    assert (ckpts / LATEST).read_text().strip() == "step_00000025"
    assert sorted(p.name for p in (ckpts / ARCHIVE).glob("*/step_*")) == ["step_00000020", "step_00000030"]
    out = train(run_dir, data_cache, "train.steps=27", "checkpoint.interval=5", "checkpoint.keep_last=1")
    assert "resumed from" in out.stdout and "step_00000025" in out.stdout
    # the earlier resume point is superseded and pruned now; this process's own resume point is kept
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000025", "step_00000027"]


def corrupt_same_size(path: Path) -> None:
    """Overwrite 4 KiB in the middle of the largest shard with other bytes: the size stays the same."""
    shard = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes((b + 1) % 256 for b in data[mid:mid + 4096])
    shard.write_bytes(bytes(data))


def test_a_same_size_corrupted_shard_is_refused_by_every_loader(base_run, tmp_path, data_cache):
    from recurdepth.errors import CheckpointError
    from recurdepth.export.cli import export_checkpoint
    from recurdepth.infer.loading import load_model

    run_dir = copy_of(base_run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000030"
    corrupt_same_size(ckpt)
    before = tree_snapshot(run_dir)
    out = train(run_dir, data_cache, "train.steps=31", check=False)
    assert_one_error(out, "step_00000030 is corrupt", "does not match the sha256", "earlier step_*")
    out = run_cli(["generate", str(run_dir), "--prompt", "a", "--depth", "1", "--max-new-tokens", "1"], check=False,
                  timeout=120)
    assert_one_error(out, "is corrupt")
    for load in (lambda: load_model(run_dir),  # eval's and generate's loader
                 lambda: export_checkpoint(str(ckpt), str(tmp_path / "hf"))):
        with pytest.raises(CheckpointError, match="step_00000030 is corrupt"):
            load()
    assert not (tmp_path / "hf").exists()
    assert_unchanged(before, run_dir)
    out = run_cli(["generate", str(run_dir), "--prompt", "a", "--depth", "1", "--max-new-tokens", "1",
                   "--no-verify"], check=False, timeout=120)
    assert "is corrupt" not in out.stderr  # the opt-out loads it regardless


@pytest.mark.parametrize("action", ["halt", "rollback"])
def test_the_numerical_guard_never_rewrites_the_checkpoint_it_stops_or_rolls_back_at(base_run, tmp_path, data_cache,
                                                                                     action):
    run_dir = copy_of(base_run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000030"
    before = tree_snapshot(ckpt)
    out = train(run_dir, data_cache, "train.steps=33", "checkpoint.interval=0", f"train.on_bad_step={action}",
                check=False, env={"RECURDEPTH_INJECT_NAN_AT_STEP": "31"})
    if action == "halt":
        assert_one_error(out, "step 31: non-finite loss", "halted")
    else:
        assert out.returncode == 0 and "rolled back to step_00000030" in out.stdout, out.stderr[-2000:]
    assert_unchanged(before, ckpt)


def test_a_second_train_on_a_run_dir_in_use_exits_2_naming_the_owner(base_run, tmp_path, data_cache):
    run_dir = copy_of(base_run, tmp_path)
    cmd, env = cli_command([*COMMON, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", "train.steps=400",
                            "checkpoint.interval=0", "checkpoint.save_final=false"])
    first = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / "checkpoints" / ".recurdepth.lock"
        deadline = time.time() + 120
        while not lock.is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.is_file(), first.communicate()
        config = (run_dir / "config.yaml").read_text()
        second = train(run_dir, data_cache, "train.steps=5", "model.hidden_size=128", check=False)
        assert_one_error(second, f"pid {first.pid}", "in use by")
        assert (run_dir / "config.yaml").read_text() == config  # the first run's config, not the second's
        assert first.poll() is None  # still training, undisturbed
    finally:
        first.terminate()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, 31)) + list(range(31, steps[-1] + 1))  # one writer's rows only
    assert not lock.exists()  # released at exit


def test_resume_refuses_a_change_to_the_models_function(base_run, tmp_path, data_cache):
    run_dir = copy_of(base_run, tmp_path)
    before = tree_snapshot(run_dir)
    changes = ["model.rotary_base=50000", "model.embedding_scale=4", "model.norm_before_coda=false"]
    out = train(run_dir, data_cache, "train.steps=31", *changes, check=False)
    assert_one_error(out, "model.rotary_base: checkpoint 10000.0, config 50000.0",
                     "model.embedding_scale: checkpoint 8.0, config 4.0",
                     "model.norm_before_coda: checkpoint True, config False",
                     "checkpoint.allow_changes=[model.embedding_scale,model.norm_before_coda,model.rotary_base]")
    assert_unchanged(before, run_dir)
    out = train(run_dir, data_cache, "train.steps=31", changes[0], "checkpoint.allow_changes=[model.rotary_base]")
    assert "resumed from" in out.stdout  # forced


def test_missing_latest_beside_checkpoints_is_an_error_naming_the_newest(base_run, tmp_path, data_cache):
    run_dir = copy_of(base_run, tmp_path)
    (run_dir / "checkpoints" / LATEST).unlink()
    before = tree_snapshot(run_dir)
    assert_one_error(train(run_dir, data_cache, "train.steps=31", check=False), "no `latest`", "step_00000030",
              "--resume fresh")
    assert_unchanged(before, run_dir)


def test_a_refused_train_creates_no_run_dir(tmp_path, data_cache):
    out = train(tmp_path / "new-run", data_cache, "train.steps=2", "data.sources=[{path: /nonexistent/corpus}]",
                check=False)
    assert_one_error(out, "/nonexistent/corpus")
    assert not (tmp_path / "new-run").exists()


def test_run_dir_under_a_regular_file_is_one_error_line(tmp_path, data_cache):
    (tmp_path / "file").write_text("not a directory")
    before = tree_snapshot(tmp_path)
    assert_one_error(train(tmp_path / "file" / "run", data_cache, "train.steps=2", check=False), "regular file")
    assert_unchanged(before, tmp_path)


@pytest.fixture
def small_disk(tmp_path):
    """A mount point for a tmpfs of a given size (read-only if asked); skipped where mounting is not allowed."""
    mounted = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("needs root to mount a tmpfs (CI runs as root)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_run_dir_is_one_error_line(small_disk, data_cache):
    ro = small_disk("ro", "1m", read_only=True)
    assert_one_error(train(ro / "run", data_cache, "train.steps=2", check=False), str(ro / "run"))
    assert tree_snapshot(ro) == {}


def test_a_full_disk_during_a_save_removes_the_partial_save_and_says_so(small_disk, tmp_path, data_cache):
    disk = small_disk("disk", "300k")
    out = train(tmp_path / "run", data_cache, "train.steps=4", "checkpoint.interval=2", f"checkpoint.dir={disk}",
                check=False)
    assert_one_error(out, "no space left on device", "removed the partial step_00000002.tmp")
    assert not list(disk.glob("step_*")), sorted(p.name for p in disk.iterdir())


@pytest.mark.parametrize("engine", ["megatron", "deepspeed"])
def test_the_guard_fires_on_an_injected_gradient_nan_and_loss_spike(tmp_path, data_cache, engine):
    """A NaN put into a gradient during backward at step 5 (the loss stays finite) and a loss spike at step 7."""
    run_dir = tmp_path / "run"
    out = train(run_dir, data_cache, "train.steps=8", "checkpoint.interval=0", "checkpoint.save_final=false",
                "train.on_bad_step=skip", "train.spike_sigma=6", "train.spike_window=3", f"train.engine={engine}",
                env={"RECURDEPTH_INJECT_NAN_GRAD_AT_STEP": "5", "RECURDEPTH_INJECT_SPIKE_AT_STEP": "7:1000"})
    rows = {r["step"]: r for r in read_metrics(run_dir)}
    assert rows[5].get("guard", "").startswith("non-finite gradient"), (rows[5], out.stdout[-2000:])
    assert rows[5]["loss"] == rows[5]["loss"]  # the loss itself was finite: the gradient check caught it
    assert rows[7].get("guard", "").startswith("loss spike"), (rows[7], out.stdout[-2000:])
    assert not any(rows[s].get("guard") for s in (1, 2, 3, 4, 6, 8))
    bad = [json.loads(x) for x in (run_dir / "bad_steps.jsonl").read_text().splitlines()]
    assert [(b["step"], b["action"]) for b in bad] == [(5, "skip"), (7, "skip")]


@pytest.mark.slow
def test_a_stop_right_after_an_interval_save_keeps_that_checkpoint_on_every_rank(tmp_path, data_cache):
    """Every step is saved (interval 1) and the time budget is spent at once: the stop's save finds the step
    saved, on both ranks alike (one lineage), and the run exits 0 with that checkpoint untouched."""
    run_dir = tmp_path / "run"
    out = run_cli([*COMMON, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}", "train.steps=50",
                   "checkpoint.interval=1", "train.exit_after_minutes=0.0001"], nproc=2)
    assert "stopping after step 1 on time budget" in out.stdout, out.stdout[-2000:]
    ckpts = run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpts)] == ["step_00000001"] and not list(ckpts.glob("*.tmp"))
