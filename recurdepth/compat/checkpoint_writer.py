"""Keep megatron-core's checkpoint writer alive through a stop signal, and never alive after its parent.

Launchers deliver stop signals to a whole process group: torchrun (`os.killpg` of each worker), `timeout`,
a terminal's Ctrl-C, slurm's `--signal` / `scancel --signal` (every process of the step). The trainer
handles SIGTERM/SIGUSR1/SIGINT by checkpointing and exiting (recurdepth.train.guards.StopRequest); the
processes megatron's checkpoint saver starts must neither die of those signals nor outlive the trainer.

Call :func:`apply_checkpoint_writer_compat` once per process before the first checkpoint save (on CPU and
GPU alike: nothing here is CPU specific; `recurdepth.distributed.init_distributed` calls it). Idempotent.

The two patches (`_get_write_results_queue` -> one in-process queue; `write_preloaded_data` -> the same, run in
a worker that dies with its parent and ignores stop signals), each with what megatron assumes and what breaks
without it, are rows of the one table of megatron patches in `recurdepth/compat/__init__.py` (`PATCHES`,
module "checkpoint_writer"). Version check: the one gate, `recurdepth.compat.version.check_megatron_version`
(RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1 downgrades a refusal to a warning and patches what exists).
Not covered: megatron's async checkpoint save (its results cross processes; recurdepth never uses it).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import multiprocessing
import os
import queue
import signal
import sys
import warnings

from recurdepth.compat.version import check_megatron_version, megatron_version

__all__ = ["apply_checkpoint_writer_compat", "is_applied", "die_with_parent", "WRITER_IGNORED_SIGNALS"]

_WHAT = "recurdepth's checkpoint-writer patch"
_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_MARK = "_recurdepth_writer_compat"
_PR_SET_PDEATHSIG = 1
_APPLIED = False
# signals a launcher sends to the whole group to ask for a stop: the trainer answers them, its writers ignore them
WRITER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)

_RESULTS_QUEUE: "queue.Queue | None" = None


def is_applied() -> bool:
    """Whether :func:`apply_checkpoint_writer_compat` has patched this process."""
    return _APPLIED


def apply_checkpoint_writer_compat() -> bool:
    """Patch megatron-core's checkpoint writer (see the module docstring). Returns True once patched;
    idempotent. Raises CompatError for an untested megatron-core (unless the opt-out variable is set)."""
    global _APPLIED
    check_megatron_version(_WHAT)
    if _APPLIED:
        return True
    version = megatron_version()
    module = importlib.import_module(_MODULE)
    writer = getattr(module, "FileSystemWriterAsync", None)
    missing = [name for name, ok in (("_get_write_results_queue", hasattr(module, "_get_write_results_queue")),
                                     ("FileSystemWriterAsync.write_preloaded_data",
                                      hasattr(writer, "write_preloaded_data"))) if not ok]
    if missing:
        msg = (f"megatron-core {version} has no {', '.join(missing)}: the checkpoint-writer patch does not apply, "
               f"so a stop signal to the process group may break the stop checkpoint")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    # megatron: the results may cross processes (async save) -> a Manager process; ours never do.
    if hasattr(module, "_get_write_results_queue"):
        module._get_write_results_queue = _in_process_results_queue
    # megatron: forked writers inherit the trainer's handlers and outlive it -> die with it, ignore stops.
    if writer is not None and hasattr(writer, "write_preloaded_data"):
        original = writer.write_preloaded_data  # a staticmethod: the plain function through the class
        if not getattr(original, _MARK, False):
            wrapper = functools.wraps(original)(_writer_worker(original))
            setattr(wrapper, _MARK, True)
            writer.write_preloaded_data = staticmethod(wrapper)
    _APPLIED = True
    return True


def _in_process_results_queue() -> "queue.Queue":
    global _RESULTS_QUEUE
    if _RESULTS_QUEUE is None:
        _RESULTS_QUEUE = queue.Queue()
    return _RESULTS_QUEUE


def die_with_parent(expected_parent: "int | None" = None) -> None:
    """Have the kernel SIGKILL this process when the thread that forked it ends (Linux; elsewhere a no-op).
    If the parent (`expected_parent`, else multiprocessing's parent process) is already gone, exit now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: nothing to tie to
        return
    if expected_parent is None:
        parent = multiprocessing.parent_process()
        expected_parent = parent.pid if parent is not None else None
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)  # the parent died between fork and prctl: nobody waits for this worker


def _writer_worker(write_preloaded_data):
    def worker(*args, **kwargs):
        die_with_parent()
        for sig in WRITER_IGNORED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return write_preloaded_data(*args, **kwargs)

    return worker
