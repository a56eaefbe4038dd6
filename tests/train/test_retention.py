"""Retention and resume planning over one checkpoint folder, without training: checkpoints are directories
committed by the same `commit_checkpoint` a real save uses (manifest, rename, `latest`, pruning)."""

from __future__ import annotations

import random
import uuid
from pathlib import Path

import pytest

from recurdepth.errors import CheckpointError
from recurdepth.train.checkpoint import (ARCHIVE, LATEST, MANIFEST, Lineage, apply_resume_plan, checkpoint_name,
                                         commit_checkpoint, existing_checkpoint, complete_checkpoints, latest_checkpoint, manifest,
                                         plan_resume)


def fake_save(root: Path, step: int, lineage: Lineage, keep_last: int = 0, keep_every: int = 0) -> str:
    """A checkpoint of `step` (a no-op if that step exists, like save_checkpoint); returns its identity."""
    final = root / checkpoint_name(step)
    if (final / MANIFEST).is_file():
        return manifest(existing_checkpoint(final, lineage))["id"]
    tmp = root / (final.name + ".tmp")
    tmp.mkdir(parents=True)
    ident = uuid.uuid4().hex
    (tmp / "weights").write_text(ident)
    commit_checkpoint(root, tmp, {"step": step, "run_id": lineage.run_id, "parent": lineage.parent, "id": ident},
                      keep_last, keep_every, lineage)
    return ident


def steps_in(root: Path) -> list[int]:
    return [manifest(p)["step"] for p in complete_checkpoints(root)]


def test_keep_last_and_keep_every_only_prune_older_checkpoints_of_latests_lineage(tmp_path):
    lineage = Lineage()
    for step in range(2, 22, 2):
        fake_save(tmp_path, step, lineage, keep_last=2, keep_every=8)
    (tmp_path / "step_00000022.tmp").mkdir()
    assert steps_in(tmp_path) == [8, 16, 18, 20]
    assert (tmp_path / "step_00000022.tmp").is_dir() and (tmp_path / LATEST).read_text().strip() == "step_00000020"
    other = Lineage()  # another lineage's checkpoint in the folder is never pruned by this one
    fake_save(tmp_path, 3, other)
    fake_save(tmp_path, 24, lineage, keep_last=1, keep_every=8)
    assert steps_in(tmp_path) == [3, 8, 16, 24]


def test_resume_never_into_a_folder_with_checkpoints_is_refused_and_fresh_moves_them_aside(tmp_path):
    lineage = Lineage()
    fake_save(tmp_path, 30, lineage)
    with pytest.raises(CheckpointError, match=r"holds checkpoints \(newest step_00000030\).*--resume fresh"):
        plan_resume(tmp_path, "never")
    plan = plan_resume(tmp_path, "fresh")
    assert plan.target is None
    dest = apply_resume_plan(tmp_path, plan)
    assert (dest / "step_00000030" / MANIFEST).is_file() and (dest / LATEST).is_file()
    assert not complete_checkpoints(tmp_path) and latest_checkpoint(tmp_path) is None
    fresh = Lineage()
    for step in (10, 20):
        fake_save(tmp_path, step, fresh, keep_last=1)
    assert steps_in(tmp_path) == [20] and (dest / "step_00000030").is_dir()


def test_resuming_an_older_step_moves_newer_ones_aside_and_keeps_the_resume_point(tmp_path):
    lineage = Lineage()
    for step in (10, 20, 30):
        fake_save(tmp_path, step, lineage)
    plan = plan_resume(tmp_path, "auto", tmp_path / "step_00000010")
    assert plan.target.name == "step_00000010" and [p.name for p in plan.archive][:2] == ["step_00000020",
                                                                                         "step_00000030"]
    apply_resume_plan(tmp_path, plan)
    assert latest_checkpoint(tmp_path).name == "step_00000010"  # a crash before the first save resumes here
    branch = Lineage(run_id=lineage.run_id, parent="step_00000010")
    for step in (11, 12, 13):
        fake_save(tmp_path, step, branch, keep_last=1)
    assert steps_in(tmp_path) == [10, 13]  # the resume point survives keep_last=1 while this process runs
    assert latest_checkpoint(tmp_path).name == "step_00000013"
    archived = sorted(p.name for p in (tmp_path / ARCHIVE).glob("*/step_*"))
    assert archived == ["step_00000020", "step_00000030"]


def test_step_directories_without_latest_are_an_error_naming_the_newest(tmp_path):
    fake_save(tmp_path, 10, Lineage())
    fake_save(tmp_path, 20, Lineage())
    (tmp_path / LATEST).unlink()
    with pytest.raises(CheckpointError, match=r"no `latest` pointer \(newest complete: step_00000020\)"):
        plan_resume(tmp_path, "auto")


def test_a_checkpoint_from_another_folder_is_refused_where_this_one_has_checkpoints(tmp_path):
    fake_save(tmp_path / "a", 10, Lineage())
    fake_save(tmp_path / "b", 5, Lineage())
    with pytest.raises(CheckpointError, match="would mix two lineages"):
        plan_resume(tmp_path / "a", "auto", tmp_path / "b" / "step_00000005")
    assert plan_resume(tmp_path / "c", "auto", tmp_path / "b" / "step_00000005").target.name == "step_00000005"


def _random_history(rng: random.Random, root: Path, ops: int) -> None:
    """Random save / resume / resume-older / rollback / --resume never|fresh sequences with random retention;
    after every operation: `latest` names an existing complete checkpoint whenever one exists, and every
    checkpoint ever written still exists (in the folder or its archive) unless retention removed it -- and
    retention only ever removed an older checkpoint of latest's lineage, never the process's resume point."""
    keep_last, keep_every = rng.choice([0, 1, 2, 3]), rng.choice([0, 0, 4])
    lineage, step = Lineage(), 0
    written: dict = {}  # identity -> (step, run_id)

    def everywhere() -> dict:
        found = {}
        for p in list(complete_checkpoints(root)) + sorted((root / ARCHIVE).glob("*/step_*")):
            if (p / MANIFEST).is_file():
                found[manifest(p)["id"]] = p
        return found

    for _ in range(ops):
        before = everywhere()
        op = rng.choice(["save", "save", "save", "resume", "older", "rollback", "never", "copy_in"])
        if op == "save":
            step += rng.randint(1, 3)
            try:
                ident = fake_save(root, step, lineage, keep_last, keep_every)
                written.setdefault(ident, (step, lineage.run_id))
            except CheckpointError as exc:  # a step taken by a foreign checkpoint: refused, nothing lost
                assert "belongs to another run" in str(exc)
        elif op == "copy_in":  # a person copies another run's checkpoint in, leaving `latest` alone
            foreign, at = Lineage(), rng.randint(1, 60)
            if (root / LATEST).is_file() and not (root / checkpoint_name(at)).exists():
                pointer = (root / LATEST).read_text()
                written[fake_save(root, at, foreign)] = (at, foreign.run_id)
                (root / LATEST).write_text(pointer)
        elif op in ("resume", "rollback"):
            plan = plan_resume(root, "auto")
            assert not plan.archive
            if plan.target is not None:
                step = manifest(plan.target)["step"]
                if op == "resume":  # a new process: a new resume point
                    lineage = Lineage(manifest(plan.target)["run_id"], plan.target.name)
        elif op == "older":
            existing = complete_checkpoints(root)
            if existing:
                plan = plan_resume(root, "auto", rng.choice(existing))
                apply_resume_plan(root, plan)
                step = manifest(plan.target)["step"]
                lineage = Lineage(manifest(plan.target)["run_id"], plan.target.name)
        else:
            try:
                plan_resume(root, "never")
            except CheckpointError:
                plan = plan_resume(root, "fresh")
                apply_resume_plan(root, plan)
            lineage, step = Lineage(), 0
        after = everywhere()
        newest = latest_checkpoint(root)
        if complete_checkpoints(root):
            assert newest is not None and (newest / MANIFEST).is_file()
        for ident in set(before) - set(after):  # only retention removes, only during a save
            assert op == "save", f"{before[ident]} vanished during {op}"
            gone_step, gone_run = written[ident]
            assert gone_run == manifest(newest)["run_id"] and gone_step < manifest(newest)["step"]
            assert before[ident].name != lineage.parent
            assert not (keep_every and gone_step % keep_every == 0)


@pytest.mark.parametrize("seed", range(25))
def test_property_latest_is_always_valid_and_nothing_newer_than_it_is_deleted(tmp_path, seed):
    _random_history(random.Random(seed), tmp_path, ops=40)
