"""The sweep's results table `<out>/results.jsonl`: which runs are finished, and one row appended per run.

The row format is the one `recurdepth compare` reads (`recurdepth.compare.results`, checked with its
`check_row` before it is written). A run is finished when its variant has a row; a row whose config hash is not
the one the sweep now makes for that variant is refused (the sweep file changed under a finished run). Rows
are appended under an exclusive `flock` of `results.jsonl.lock`, each as one `write` of a whole line followed
by an fsync, so concurrent array tasks never interleave and a crash leaves whole lines only.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from recurdepth.compare.results import check_row
from recurdepth.errors import ConfigError, DataError


def finished_runs(path: Path) -> dict:
    """{variant: (config_hash, line number)} of the rows in `path` (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return {}
    done = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number} is not JSON ({exc.msg}); remove or fix it, then re-run") from None
        if isinstance(row, dict) and isinstance(row.get("variant"), str):
            done[row["variant"]] = (row.get("config_hash"), number)
    return done


def check_unchanged(runs: list, done: dict, path: Path) -> None:
    """Refuse a finished variant whose row was made from another config than the sweep now makes for it."""
    for run in runs:
        if run.variant in done and done[run.variant][0] != run.config_hash:
            old, number = done[run.variant]
            raise ConfigError(f"{path} line {number} has {run.variant} with config hash {old}, but the sweep now "
                              f"makes {run.config_hash}; restore the sweep file, or give it a new out: directory")


def append_row(path: Path, row: dict) -> None:
    """Check `row` as `recurdepth compare` will, then append it as one line under the table's lock."""
    check_row(row, f"the row of {row.get('variant')}")
    data = (json.dumps(row, sort_keys=False) + "\n").encode()
    path = Path(path)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
