"""The run directory at start: the directories a run writes (each locked while it runs, `lock.py`), the moves a
resume plan implies (`checkpoint.apply_resume_plan`, with the old run's logs on a fresh start), and the files
written before the first step (config.yaml, the engine's own), each atomically."""

from __future__ import annotations

import os
from pathlib import Path

from recurdepth.atomic import write_atomically
from recurdepth.train.checkpoint import LATEST, ResumePlan, apply_resume_plan
from recurdepth.train.lock import RunDirLock

RUN_LOGS = ("metrics.jsonl", "bad_steps.jsonl", "tensorboard", "config.yaml")  # moved aside with a fresh start


def written_dirs(cfg) -> list[Path]:
    """The directories a run writes to: the checkpoint folder, and the run directory when the checkpoints live
    elsewhere."""
    root, run_dir = cfg.checkpoint_dir.resolve(), Path(cfg.train.run_dir).resolve()
    return [root] + ([run_dir] if run_dir != root and run_dir not in root.parents else [])


def check_unlocked(cfg) -> None:
    """Raise CheckpointError, writing nothing, if another live run holds one of the run's directories."""
    for directory in written_dirs(cfg):
        RunDirLock(directory, "train").check()


def open_run_dir(cfg, plan: ResumePlan | None, files: dict[str, str]) -> list[RunDirLock]:
    """Take the locks, carry out `plan`'s moves, write `files` ({name: text}) into the run directory (rank 0).
    Returns the locks held; on an error (RecurdepthError, OSError) releases them and raises it."""
    locks: list[RunDirLock] = []
    run_dir = Path(cfg.train.run_dir)
    try:
        for d in written_dirs(cfg):
            locks.append(RunDirLock(d, "train").acquire())
            if locks[-1].took_over:
                print(f"note: {locks[-1].took_over}", flush=True)
        if plan is not None:
            dest = apply_resume_plan(cfg.checkpoint_dir, plan)
            if dest is not None and plan.target is None:  # a fresh start: the old run's logs too
                for name in RUN_LOGS:
                    if (run_dir / name).exists():
                        os.rename(run_dir / name, dest / name)
            if dest is not None:
                moved = sum(1 for p in plan.archive if p.name != LATEST)
                print(f"moved {moved} checkpoint(s) aside into {dest} ({plan.why})", flush=True)
        for name, text in files.items():
            write_atomically(run_dir / name, text)
    except BaseException:
        release(locks)
        raise
    return locks


def release(locks: list[RunDirLock]) -> None:
    for lock in reversed(locks):
        lock.release()
