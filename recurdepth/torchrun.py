"""`python -m recurdepth.torchrun [torchrun options] -m recurdepth train CONFIG [overrides]`: torchrun, with an
exit status and one line that say what happened to the ranks.

Bare torchrun (torch.distributed.run), on SIGTERM/SIGINT/SIGUSR1..., forwards the signal to every worker's
process group, waits `--shutdown-timeout` seconds for them (then SIGKILLs them), and re-raises the signal as
an exception: exit status 1 and a traceback, even when every rank checkpointed and exited 0. This wrapper runs
the same launcher in-process (`torch.distributed.run.run`, so every torchrun option works) and:

- gives each rank `RECURDEPTH_EXIT_DIR` (a temporary folder): `recurdepth` writes `rank_<N>.json` there as it
  exits (recurdepth/exits.py), and `RECURDEPTH_LAUNCHER_PID`, so the ranks die with this launcher (no orphans
  after a SIGKILL);
- after a stop signal, if every local rank (`--nproc_per_node` of them) recorded exit code 0, prints
  `stopped on SIGTERM after step N; every rank checkpointed and exited 0; resume with the same command` and
  exits 0; otherwise (and when a rank fails) prints one line naming the ranks and how each ended, and exits
  with torchrun's status (1); torchrun's traceback and its "closing signal" log lines are not shown;
- a repeated signal (a second Ctrl-C, slurm signalling again) does not abort the wait for the ranks' stop
  checkpoint (bare torchrun stops waiting and leaves the ranks running); it prints how to abandon them;
- defaults differ from torchrun's in two places, both only when not given: `--signals-to-handle` also
  handles SIGUSR1 (slurm's `--signal`; unhandled, it would kill the launcher and orphan the ranks), and
  `--shutdown-timeout` is 300 s (torchrun: 30 s, often too short for a large model's stop checkpoint).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Optional, Sequence

from recurdepth.exits import EXIT_DIR_ENV, LAUNCHER_PID_ENV, read_records

PROG = "recurdepth.torchrun"
TORCH_DEFAULT_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"
DEFAULT_SHUTDOWN_TIMEOUT = 300
# log lines of a signal torchrun forwards as asked: noise on a clean stop (what went wrong is still logged)
_EXPECTED_ON_SIGNAL = ("death signal, shutting down workers", "closing signal")


class _State:
    signal: Optional[signal.Signals] = None
    shutdown_timeout: int = DEFAULT_SHUTDOWN_TIMEOUT


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _State.signal is None or not any(text in record.getMessage() for text in _EXPECTED_ON_SIGNAL)


def _terminate_once(signum, frame) -> None:
    """torchrun's handler raises SignalException on every signal, so a second one aborts its wait for the
    ranks; here only the first does, and later ones say what is going on."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    sigval = signal.Signals(signum)
    if _State.signal is None:
        _State.signal = sigval
        _start_watchdog()
        raise SignalException(f"Process {os.getpid()} got signal: {sigval}", sigval=sigval)
    print(f"{PROG}: {sigval.name} again: still waiting (up to {_State.shutdown_timeout} s) for the ranks to write "
          f"their stop checkpoint; `kill -KILL {os.getpid()}` abandons it", file=sys.stderr, flush=True)


def _start_watchdog() -> None:
    """After the stop signal torchrun waits for its ranks one by one, up to --shutdown-timeout each round. A rank
    whose stop failed (exit record with a non-zero code, or gone without a record) leaves the others blocked in
    a collective for all that time: end them at once, so the failure is reported in seconds."""
    import threading

    import psutil

    exit_dir = os.environ.get(EXIT_DIR_ENV)
    try:
        workers = {p.pid: p for p in psutil.Process().children()}
    except psutil.Error:
        return
    if not exit_dir or not workers:
        return

    def failed(pid: int, proc, records: dict) -> bool:
        if pid in records:
            return records[pid]["code"] != 0
        try:
            gone = not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            gone = True
        if not gone:
            return False
        record = {r.get("pid"): r for r in read_records(exit_dir).values()}.get(pid)  # written before it exited
        return record is None or record["code"] != 0

    def watch() -> None:
        while any(p.is_running() for p in workers.values()):
            records = {r.get("pid"): r for r in read_records(exit_dir).values()}
            if any(failed(pid, p, records) for pid, p in workers.items()):
                for pid in workers:
                    try:
                        os.killpg(pid, signal.SIGKILL)  # torchrun starts each rank in a session of its own
                    except OSError:
                        pass
                return
            time.sleep(0.2)

    threading.Thread(target=watch, name="recurdepth-stop-watchdog", daemon=True).start()


def _exit_of(record: Optional[dict], failure=None) -> str:
    if record is not None:
        how = f"exited {record['code']}"
        return how + (f" after stopping on {record['stopped']}" if record.get("stopped") else "")
    if failure is not None and failure.exitcode is not None and failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return f"killed by {name}"
    if failure is not None and failure.exitcode is not None:
        return f"exited {failure.exitcode} without an exit record"
    return "left no exit record (killed, e.g. by SIGKILL after --shutdown-timeout)"


def summarize(records: dict, nproc: int, got: Optional[signal.Signals], failures: Optional[dict] = None):
    """(exit status, the one line) from the ranks' exit records; `failures`: torchrun's {rank: ProcessFailure}."""
    failures = failures or {}
    by_local = {r.get("local_rank"): (rank, r) for rank, r in records.items()}
    clean = len(records) == nproc and all(r["code"] == 0 for r in records.values()) and not failures
    if got is not None and clean:
        stopped = [r for r in records.values() if r.get("stopped")]
        if len(stopped) == nproc:
            steps = sorted({r["step"] for r in stopped if r.get("step") is not None})
            after = f" after step {steps[-1]}" if steps else ""
            return 0, (f"stopped on {got.name}{after}; every rank checkpointed and exited 0; "
                       f"resume with the same command")
        return 0, f"{got.name} arrived as training ended: every rank finished and exited 0"
    failing = []
    failed_by_local = {f.local_rank: (rank, f) for rank, f in failures.items()}
    for local in range(nproc):
        rank, record = by_local.get(local, (None, None))
        failure = failed_by_local.get(local, (None, None))[1]
        if rank is None and failure is not None:
            rank = failed_by_local[local][0]
        if record is not None and record["code"] == 0 and failure is None:
            continue
        name = f"rank {rank}" if rank is not None else f"local rank {local}"
        failing.append(f"{name} {_exit_of(record, failure)}")
    what = f"after {got.name}: " if got is not None else ""
    if not failing:
        failing = ["torchrun reported a failure but every rank exited 0"]
    return 1, f"{PROG}: {what}{'; '.join(failing)} (their output is above); exit status 1"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing import api as mp_api
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser, run

    parser = get_args_parser()
    parser.prog = f"python -m {PROG}"
    args = parser.parse_args(argv)
    if args.signals_to_handle == TORCH_DEFAULT_SIGNALS:
        args.signals_to_handle += ",SIGUSR1"
    if args.shutdown_timeout is None and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" not in os.environ:
        args.shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT
    _State.shutdown_timeout = args.shutdown_timeout or int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", 30))
    nproc = determine_local_world_size(args.nproc_per_node)
    mp_api._terminate_process_handler = _terminate_once  # looked up when the workers start
    for name in ("torch.distributed.elastic", "torch.distributed.elastic.agent.server.api",
                 "torch.distributed.elastic.multiprocessing.api"):
        logging.getLogger(name).addFilter(_DropExpected())
    exit_dir = tempfile.mkdtemp(prefix="recurdepth-exits-")
    os.environ[EXIT_DIR_ENV] = exit_dir
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    failures = None
    try:
        try:
            run(args)
            return 0
        except mp_api.SignalException as exc:
            _State.signal = exc.sigval
        except ChildFailedError as exc:
            failures = exc.failures
        status, line = summarize(read_records(exit_dir), nproc, _State.signal, failures)
        print(line, file=sys.stdout if status == 0 else sys.stderr, flush=True)
        return status
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
