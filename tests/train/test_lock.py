"""The run-directory lock: one live owner, stale locks taken over, other hosts' locks left to a person."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from recurdepth.errors import CheckpointError
from recurdepth.train.lock import LOCK_NAME, RunDirLock, run_dir_lock


def write_lock(directory, **owner) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    base = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": "train", "job": None, "restart": 0,
            "started": "2026-12-01T00:00:00+0000", "process_start": None}
    (directory / LOCK_NAME).write_text(json.dumps({**base, **owner}))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_owner_refuses_a_second_writer_and_release_frees_it(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import psutil

        write_lock(tmp_path, pid=sleeper.pid, process_start=psutil.Process(sleeper.pid).create_time())
        with pytest.raises(CheckpointError, match=rf"in use by pid {sleeper.pid} on {socket.gethostname()} \(train"):
            RunDirLock(tmp_path).acquire()
        with pytest.raises(CheckpointError, match="in use by"):
            RunDirLock(tmp_path).check()  # the read-only check says the same
    finally:
        sleeper.kill()
        sleeper.wait()
    with run_dir_lock(tmp_path, "import") as lock:  # its owner is gone now: stale, taken over
        assert "no longer running" in lock.took_over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["purpose"] == "import"
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    write_lock(tmp_path / "dead", pid=dead_pid())
    assert "no longer running" in RunDirLock(tmp_path / "dead").acquire().took_over
    write_lock(tmp_path / "reused", process_start=1.0)  # this pid, but another process's start time
    assert "is now another process" in RunDirLock(tmp_path / "reused").acquire().took_over
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / LOCK_NAME).write_text("{half")
    assert "unreadable" in RunDirLock(tmp_path / "corrupt").acquire().took_over
    # a torchrun restart of the same job on another host: the earlier attempt's lock is stale
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    write_lock(tmp_path / "restart", host="node-b", pid=1, job="TORCHELASTIC_RUN_ID=job-7", restart=0)
    assert "earlier attempt of this job" in RunDirLock(tmp_path / "restart").acquire().took_over


def test_another_hosts_lock_is_refused(tmp_path):
    write_lock(tmp_path, host="node-b", pid=4242)
    before = (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(CheckpointError, match=r"in use by pid 4242 on node-b .*remove .*\.recurdepth\.lock"):
        RunDirLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == before


def test_unwritable_places_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a regular file"):
        RunDirLock(tmp_path / "file" / "run").acquire()
