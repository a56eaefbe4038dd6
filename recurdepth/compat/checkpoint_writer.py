"""Keep megatron-core's checkpoint writer alive through a stop signal, and never alive after its parent.

Launchers deliver stop signals to a whole process group: torchrun (`os.killpg` of each worker), `timeout`,
a terminal's Ctrl-C, slurm's `--signal` / `scancel --signal` (every process of the step). The trainer
handles SIGTERM/SIGUSR1/SIGINT by checkpointing and exiting (recurdepth.train.guards.StopRequest); the
processes megatron's checkpoint saver starts must neither die of those signals nor outlive the trainer.

Call :func:`apply_checkpoint_writer_compat` once per process before the first checkpoint save (on CPU and
GPU alike: nothing here is CPU specific; `recurdepth.distributed.init_distributed` calls it). Idempotent.

  patch                                    what megatron assumes -> what breaks without the patch -> the fix
  ---------------------------------------  ------------------------------------------------------------------
  filesystem_async._get_write_results_     the write results may come from another process (async save), so
    queue -> one in-process queue.Queue      the first save starts a persistent spawn-context
                                             `Manager().Queue()`: a helper *process* in the trainer's process
                                             group with default signal handlers -> a group-delivered SIGTERM/
                                             SIGUSR1/SIGINT kills it, the stop-save then dies with
                                             BrokenPipeError (exit 1, traceback, step_N.tmp left, the steps
                                             since the last checkpoint lost), and after SIGKILL of the trainer
                                             it stays alive as an orphan -> recurdepth saves synchronously
                                             (`dist_checkpointing.save`, never `async_sharded_save`): the
                                             results are put and got in the trainer process, so a plain
                                             `queue.Queue` does it with no helper process at all
  FileSystemWriterAsync.write_preloaded_   its forked writer workers (`write_preloaded_data_multiproc`, one
    data -> the same, run in a worker        per file, fork context) inherit the trainer's signal handlers
    that first sets PR_SET_PDEATHSIG=        and nothing ties their life to it -> a stop signal that the
    SIGKILL and ignores stop signals         trainer's handler does not cover kills a writer (megatron then
                                             waits for it forever in `count_queue.join()`), and a writer
                                             outlives a SIGKILLed trainer -> each worker dies with the
                                             thread that forked it (the trainer's main thread) and ignores
                                             the group's SIGTERM/SIGINT/SIGUSR1/SIGUSR2/SIGHUP: the trainer
                                             decides, the writer finishes its file. The wrapper keeps the
                                             signature (functools.wraps; megatron inspects it)

Version check: megatron-core's version must be in TESTED_MEGATRON_VERSIONS (the CPU layer's list), else
CompatError; RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1 downgrades that to a warning and patches what exists.
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

from recurdepth.compat.megatron_cpu import TESTED_MEGATRON_VERSIONS, CompatError, _megatron_version

__all__ = ["apply_checkpoint_writer_compat", "is_applied", "die_with_parent", "WRITER_IGNORED_SIGNALS"]

_ALLOW_UNTESTED_ENV = "RECURDEPTH_ALLOW_UNTESTED_MEGATRON"
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
    if _APPLIED:
        return True
    untested = _check_version()
    module = importlib.import_module(_MODULE)
    writer = getattr(module, "FileSystemWriterAsync", None)
    missing = [name for name, ok in (("_get_write_results_queue", hasattr(module, "_get_write_results_queue")),
                                     ("FileSystemWriterAsync.write_preloaded_data",
                                      hasattr(writer, "write_preloaded_data"))) if not ok]
    if missing:
        msg = (f"megatron-core {untested} has no {', '.join(missing)}: the checkpoint-writer patch does not apply, "
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


def _check_version() -> str:
    """The installed version; raises CompatError when untested (unless opted out, then warns)."""
    version = _megatron_version()
    if version.split("+")[0] in TESTED_MEGATRON_VERSIONS:
        return version
    msg = (f"megatron-core {version} is untested with recurdepth's checkpoint-writer patch (tested: "
           f"{', '.join(TESTED_MEGATRON_VERSIONS)}); install megatron-core=={TESTED_MEGATRON_VERSIONS[-1]}, "
           f"or set {_ALLOW_UNTESTED_ENV}=1 to try anyway")
    if os.environ.get(_ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return version
    raise CompatError(msg)


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
