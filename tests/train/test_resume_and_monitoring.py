"""Exact resume (bit for bit on CPU) and what a run leaves behind: metrics, TensorBoard, checkpoints."""

from pathlib import Path

import pytest

from tests.conftest import SMALL, TINY, read_metrics, run_cli

STEPS = 20


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("straight")
    run_cli(["train", str(TINY), *SMALL, f"train.steps={STEPS}", f"train.run_dir={run_dir}",
             f"data.cache_dir={data_cache}", "checkpoint.interval=0", "logging.health_interval=5",
             "train.eval_interval=10"])
    return run_dir


def test_resumed_run_repeats_losses_bit_for_bit(straight_run, tmp_path, data_cache):
    run_dir = tmp_path / "resumed"
    common = ["train", str(TINY), *SMALL, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}",
              "checkpoint.interval=10", "logging.health_interval=5", "train.eval_interval=10",
              f"optimizer.decay_steps={STEPS}"]
    run_cli([*common, "train.steps=10"])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    out = run_cli([*common, f"train.steps={STEPS}"])
    assert "resumed from" in out.stdout
    straight, resumed = read_metrics(straight_run), read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["depth"] for r in resumed] == [r["depth"] for r in straight]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exact equality, not a tolerance
    assert len({r["depth"] for r in straight}) > 1  # the sampled r really varied


def test_progress_line_and_tensorboard_scalars(straight_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(straight_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/depth", "train/tokens_per_sec",
                "train/tflops", "train/mfu", "health/rel_residual", "health/state_norm", "health/token_cosine",
                "valid/loss"}
    assert expected <= tags
    losses = [e.value for e in acc.Scalars("train/loss")]
    metrics = read_metrics(straight_run)
    assert len(losses) == STEPS and losses == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.step for e in acc.Scalars("health/state_norm")] == [5, 10, 15, 20]
    assert losses[-1] < losses[0]


def test_run_directory_contents(straight_run):
    assert (straight_run / "config.yaml").is_file()
    ckpt = straight_run / "checkpoints" / (straight_run / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == f"step_{STEPS:08d}" and (ckpt / "recurdepth.json").is_file()
    from recurdepth.train.checkpoint import saved_config

    assert saved_config(ckpt)["train"]["steps"] == STEPS
    assert not list(Path(straight_run / "checkpoints").glob("*.tmp"))


def test_half_written_and_truncated_checkpoints(straight_run, tmp_path, data_cache):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(straight_run, run_dir)
    ckpts = run_dir / "checkpoints"
    (ckpts / "step_00000030.tmp").mkdir()  # a save that died half-way: never read
    (ckpts / "step_00000030.tmp" / "__0_0.distcp").write_bytes(b"partial")
    common = ["train", str(TINY), *SMALL, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"]
    out = run_cli([*common, f"train.steps={STEPS}"])
    assert f"resumed from {ckpts / f'step_{STEPS:08d}'}" in out.stdout
    assert (ckpts / "latest").read_text().strip() == f"step_{STEPS:08d}"

    shard = sorted((ckpts / f"step_{STEPS:08d}").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated on disk
    before = sorted(p.name for p in ckpts.iterdir())
    for extra, needle in (([], "is corrupt: __0_0.distcp has"), (["--no-verify"], "cannot read checkpoint")):
        bad = run_cli([*common, f"train.steps={STEPS + 1}", *extra], check=False)
        assert bad.returncode == 2
        errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in bad.stderr, bad.stderr[-2000:]
        assert sorted(p.name for p in ckpts.iterdir()) == before  # nothing written, nothing removed
