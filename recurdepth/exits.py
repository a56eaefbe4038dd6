"""How a `recurdepth` process ended, for the launcher that started it.

When `RECURDEPTH_EXIT_DIR` is set (`python -m recurdepth.torchrun` sets it for its ranks), `recurdepth.cli.main`
writes `<dir>/rank_<global rank>.json` atomically just before the process exits, whatever the outcome:

    {"rank": 1, "local_rank": 1, "restart": 0, "pid": 4711, "verb": "train", "code": 0,
     "stopped": "SIGTERM", "signal": "SIGTERM", "step": 85, "checkpoint": "runs/x/checkpoints/step_00000085"}

`code` is the process's exit status (1 for an uncaught exception), `stopped` the agreed stop's reason (null when
the run was not stopped), `step`/`checkpoint` the checkpoint `latest` names at exit (train only). A rank killed
by a signal it does not handle (SIGKILL, or a stop signal before the training loop) writes no record.

`RECURDEPTH_LAUNCHER_PID`: when it is this process's parent, the process asks the kernel to SIGKILL it when the
launcher dies (no rank outlives a SIGKILLed `recurdepth.torchrun`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from recurdepth.atomic import write_atomically

EXIT_DIR_ENV = "RECURDEPTH_EXIT_DIR"
LAUNCHER_PID_ENV = "RECURDEPTH_LAUNCHER_PID"
_RANK_KEYS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
_STEP = re.compile(r"step_(\d+)$")


def launcher_rank(keys=_RANK_KEYS) -> int:
    """This process's rank as any launcher (torchrun, slurm, mpirun) exported it; 0 when none did."""
    for key in keys:
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class ExitRecord:
    """What `cli.main` needs: `start()` before parsing, `prepare(args)` once parsed, `write(code)` at exit."""

    def __init__(self):
        self.verb: Optional[str] = None
        self.checkpoint_dir: Optional[Path] = None
        self.written = False

    @classmethod
    def start(cls) -> "ExitRecord":
        launcher = os.environ.get(LAUNCHER_PID_ENV, "")
        if launcher.isdigit() and int(launcher) == os.getppid():
            from recurdepth.compat.checkpoint_writer import die_with_parent

            die_with_parent(int(launcher))
        return cls()

    def prepare(self, args) -> None:
        """For `train`: the checkpoint folder (for the record). A config that does not load is left for the
        verb itself to report."""
        self.verb = getattr(args, "verb", None)
        if self.verb != "train":
            return
        try:
            from recurdepth.config import load_config

            cfg = load_config(args.config, args.overrides)
        except Exception:  # noqa: BLE001 - `train` reports it as its one error line
            return
        self.checkpoint_dir = cfg.checkpoint_dir

    def fields(self, code) -> dict:
        code = 0 if code is None else code if isinstance(code, int) else 1
        record = {"rank": launcher_rank(), "local_rank": launcher_rank(("LOCAL_RANK", "SLURM_LOCALID")),
                  "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0), "pid": os.getpid(),
                  "verb": self.verb, "code": code, "stopped": None, "signal": None, "step": None, "checkpoint": None}
        if self.verb == "train":
            from recurdepth.train import guards

            if guards.STOPPED:
                record["stopped"], record["signal"] = guards.STOPPED["reason"], guards.STOPPED["signal"]
            latest = self._latest()
            if latest is not None:
                match = _STEP.search(latest.name)
                record["step"] = int(match.group(1)) if match else None
                record["checkpoint"] = str(latest)
        return record

    def _latest(self) -> Optional[Path]:
        if self.checkpoint_dir is None:
            return None
        try:
            name = (self.checkpoint_dir / "latest").read_text().strip()
        except OSError:
            return None
        path = self.checkpoint_dir / name
        return path if name and path.is_dir() else None

    def write(self, code) -> None:
        """The record, if RECURDEPTH_EXIT_DIR is set (once; never raises: the exit status matters more)."""
        folder = os.environ.get(EXIT_DIR_ENV)
        if not folder or self.written:
            return
        self.written = True
        try:
            record = self.fields(code)
            path = Path(folder) / f"rank_{record['rank']}.json"
            write_atomically(path, json.dumps(record) + "\n")
        except Exception:  # noqa: BLE001 - a launcher without a record reports the rank as lost
            pass


def read_records(folder) -> dict:
    """{global rank: record} of the records in `folder` (the latest restart's only)."""
    records = {}
    for path in Path(folder).glob("rank_*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        records[int(record["rank"])] = record
    if records:
        last = max(r.get("restart", 0) for r in records.values())
        records = {k: r for k, r in records.items() if r.get("restart", 0) == last}
    return records
