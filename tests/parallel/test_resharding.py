"""A checkpoint saved under one layout resumes under another with the uninterrupted run's losses."""

import shutil

import pytest

from tests.conftest import SMALL, TINY, read_metrics, run_cli

STEPS, SAVED = 6, 3
COMMON = ["train", str(TINY), *SMALL, f"train.steps={STEPS}", "logging.tensorboard=false",
          "data.sources=[{builtin: stdlib-docs}]", f"optimizer.decay_steps={STEPS}"]


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("tp2")
    run_cli([*COMMON, "parallel.tensor=2", f"checkpoint.interval={SAVED}", f"train.run_dir={run_dir}",
             f"data.cache_dir={data_cache}"], nproc=2)
    return run_dir


def resume_from_step(tp2_run, tmp_path, name):
    run_dir = tmp_path / name
    (run_dir / "checkpoints").mkdir(parents=True)
    ckpt = f"step_{SAVED:08d}"
    shutil.copytree(tp2_run / "checkpoints" / ckpt, run_dir / "checkpoints" / ckpt)
    (run_dir / "checkpoints" / "latest").write_text(ckpt + "\n")
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("nproc,layout", [(1, []), (2, []), (4, ["parallel.pipeline=2"])],
                         ids=["tp1-dp1", "tp1-dp2", "tp1-pp2-dp2"])
def test_tp2_checkpoint_resumes_under_other_layouts(tp2_run, tmp_path, data_cache, nproc, layout):
    run_dir = resume_from_step(tp2_run, tmp_path, f"resume-{nproc}")
    out = run_cli([*COMMON, *layout, "checkpoint.interval=0", "checkpoint.save_final=false",
                   f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"], nproc=nproc)
    assert "resumed from" in out.stdout
    straight = {r["step"]: r for r in read_metrics(tp2_run)}
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(SAVED + 1, STEPS + 1))
    for r in resumed:
        ref = straight[r["step"]]
        assert r["depth"] == ref["depth"]
        assert abs(r["loss"] - ref["loss"]) <= 1e-5 * abs(ref["loss"]), (r["step"], r["loss"], ref["loss"])


MOE = ["model.num_experts=4", "model.moe_top_k=2"]


@pytest.fixture(scope="module")
def ep2_run(tmp_path_factory, data_cache):
    """An uninterrupted EP=2 MoE run with a checkpoint at step SAVED."""
    straight = tmp_path_factory.mktemp("ep2")
    run_cli([*COMMON, *MOE, "parallel.expert=2", f"checkpoint.interval={SAVED}", f"train.run_dir={straight}",
             f"data.cache_dir={data_cache}"], nproc=2)
    return straight


@pytest.mark.slow
def test_ep2_checkpoint_resumes_exactly(ep2_run, tmp_path, data_cache):
    """An MoE checkpoint (chained dense + expert optimizers) resumes with the uninterrupted losses. Changing the
    EP size on resume is refused (next test): megatron names the optimizer state by its chaining, which differs
    between EP=1 (one optimizer) and EP>1 (two)."""
    moe, straight = MOE, ep2_run
    run_dir = resume_from_step(straight, tmp_path, "ep2-resumed")
    run_cli([*COMMON, *moe, "parallel.expert=2", "checkpoint.interval=0", "checkpoint.save_final=false",
             f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"], nproc=2)
    ref = {r["step"]: r["loss"] for r in read_metrics(straight)}
    resumed = read_metrics(run_dir)
    assert [r["step"] for r in resumed] == list(range(SAVED + 1, STEPS + 1))
    for r in resumed:
        assert abs(r["loss"] - ref[r["step"]]) <= 1e-5 * abs(ref[r["step"]]), (r["step"], r["loss"], ref[r["step"]])


@pytest.mark.slow
def test_changing_the_expert_parallel_size_on_resume_is_refused_with_one_line(ep2_run, tmp_path, data_cache):
    """EP=2 -> EP=1 is not resharded (megatron keys the expert optimizer state by the EP layout): refused before
    anything is read or written, with one line naming both sizes and the fix, the checkpoint left as it was."""
    from tests.snapshot import assert_unchanged, tree_snapshot

    run_dir = resume_from_step(ep2_run, tmp_path, "ep1-refused")
    before = tree_snapshot(run_dir)
    out = run_cli([*COMMON, *MOE, "parallel.expert=1", f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"],
                  nproc=2, check=False)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert out.returncode != 0 and len(errors) == 1, out.stderr[-3000:]  # one line, from rank 0 (same on every rank)
    for needle in ("was saved with parallel.expert=2", "resuming it with parallel.expert=1 is not supported",
                   "resume with parallel.expert=2"):
        assert needle in errors[0], (needle, errors[0])
    assert "[rank" not in out.stderr, out.stderr[-3000:]  # no rank's traceback (torchrun's own report follows)
    assert_unchanged(before, run_dir)
