"""One writer per run directory: a lock file naming its owner (pid, host, job), with stale-lock detection.

`train` (global rank 0, for the whole run) and `import` take it before they write anything. A second writer
gets one line naming the owner. A lock left by a process that is gone -- on this host, its pid is dead or
belongs to another process; on any host, an earlier attempt of the same torchrun/slurm job (a restart) -- is
stale and taken over with a note. A lock of a live process on another host can only be cleared by a person.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from recurdepth.errors import CheckpointError

LOCK_NAME = ".recurdepth.lock"


def _job() -> tuple[Optional[str], int]:
    """(the launcher job this process belongs to, its restart count): torchrun's run id, else slurm's job id."""
    for job, restarts in (("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"), ("SLURM_JOB_ID", "SLURM_RESTART_COUNT")):
        if os.environ.get(job):
            return f"{job}={os.environ[job]}", int(os.environ.get(restarts, "0") or 0)
    return None, 0


def _process_start(pid: int) -> Optional[float]:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - gone, or not ours to read
        return None


def _owner(purpose: str) -> dict:
    job, restarts = _job()
    return {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "job": job, "restart": restarts,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "process_start": _process_start(os.getpid()),
            "command": " ".join(sys.argv[:3])}


def _describe(owner: dict) -> str:
    return (f"pid {owner.get('pid')} on {owner.get('host')} ({owner.get('purpose')}, since {owner.get('started')}"
            + (f", {owner['job']}" if owner.get("job") else "") + ")")


def _is_me(owner: dict) -> bool:
    """Whether the lock names this very process (not an earlier one that had the same pid)."""
    if owner.get("pid") != os.getpid() or owner.get("host") != socket.gethostname():
        return False
    mine, theirs = _process_start(os.getpid()), owner.get("process_start")
    return theirs is None or mine is None or abs(mine - float(theirs)) <= 1.0


def _in_use(directory: Path, owner: dict, path: Path) -> str:
    return (f"{directory} is in use by {_describe(owner)}; two writers would corrupt it: wait for it to finish or "
            f"use another directory (if that process is gone, remove {path})")


def stale_reason(owner: dict) -> Optional[str]:
    """Why the lock's owner can no longer be writing (a reason to take the lock over), or None if it may be."""
    job, restarts = _job()
    if job is not None and owner.get("job") == job and restarts > int(owner.get("restart") or 0):
        return f"an earlier attempt of this job ({job}, restart {owner.get('restart')})"
    if owner.get("host") != socket.gethostname():
        return None  # another host's process: cannot be checked from here
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return "it names no process"
    started = _process_start(pid)
    if started is None:
        return f"pid {pid} is no longer running"
    if owner.get("process_start") is not None and abs(started - float(owner["process_start"])) > 1.0:
        return f"pid {pid} is now another process"
    return None


def _writable_dir(path: Path) -> None:
    """Create `path` (and parents) or say in one line why it cannot be."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"cannot create {path}: {parent} is a regular file, not a directory; "
                                  f"choose another train.run_dir / output path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise CheckpointError(f"cannot create {path}: permission denied; choose a writable location") from None
    except OSError as exc:
        raise CheckpointError(f"cannot create {path}: {exc.strerror}; choose another location") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CheckpointError(f"{path} is not writable (permission denied); make it writable or choose another "
                              f"location")


class RunDirLock:
    """The lock file `<dir>/.recurdepth.lock`; `acquire()` creates `dir` if needed, `release()` removes the file."""

    def __init__(self, directory: Path, purpose: str = "train"):
        self.directory, self.purpose = Path(directory), purpose
        self.path = self.directory / LOCK_NAME
        self.held = False
        self.took_over: Optional[str] = None

    def acquire(self) -> "RunDirLock":
        _writable_dir(self.directory)
        owner = _owner(self.purpose)
        for _ in range(3):
            tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(owner, indent=1) + "\n")
            try:
                os.link(tmp, self.path)  # atomic: fails if a lock exists, never leaves a half-written one
                self.held = True
                return self
            except FileExistsError:
                current = self.read()
                if current is not None and _is_me(current):
                    self.held = True  # this process holds it already
                    return self
                reason = "it is unreadable" if current is None else stale_reason(current)
                if reason is None:
                    raise CheckpointError(_in_use(self.directory, current, self.path)) from None
                self.took_over = f"took over the stale lock of {self.directory} ({reason})"
                self.path.unlink(missing_ok=True)
            finally:
                tmp.unlink(missing_ok=True)
        raise CheckpointError(f"could not take the lock {self.path} (contended); retry")

    def check(self) -> None:
        """Raise as `acquire` would if another live process holds the lock, writing nothing."""
        current = self.read() if self.path.is_file() else None
        if current is None or _is_me(current):
            return
        if stale_reason(current) is None:
            raise CheckpointError(_in_use(self.directory, current, self.path))

    def read(self) -> Optional[dict]:
        try:
            value = json.loads(self.path.read_text())
            return value if isinstance(value, dict) else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if not self.held:
            return
        current = self.read()
        if current is not None and current.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


@contextmanager
def run_dir_lock(directory: Path, purpose: str):
    """Hold the run-directory lock for the `with` block (see RunDirLock)."""
    lock = RunDirLock(directory, purpose).acquire()
    try:
        yield lock
    finally:
        lock.release()
