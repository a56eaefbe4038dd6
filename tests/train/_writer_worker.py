"""Run by tests/train/test_signals.py: megatron's checkpoint writer, stuck on purpose, under the compat patch.

`python _writer_worker.py FIFO READY [--no-patch]` applies the checkpoint-writer patch (unless --no-patch) and
runs megatron's `write_preloaded_data_multiproc` the way a synchronous save does: it takes the results queue,
forks one writer per bucket and waits for them; the one writer here blocks opening FIFO (nobody reads it yet).
Once the writer exists it writes READY: {"pid", "writers": [pids], "helpers": [cmdlines of the other child
processes], "queue": the results queue's type}.
"""

import json
import os
import sys
import threading
import time

import psutil


def report(ready: str, results) -> None:
    me = psutil.Process()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = me.children(recursive=True)
        writers = [c for c in children if c.cmdline() == me.cmdline()]  # forked: the same command line
        if writers:
            helpers = [" ".join(c.cmdline()) for c in children if c not in writers]
            with open(ready + ".tmp", "w") as f:
                json.dump({"pid": os.getpid(), "writers": [w.pid for w in writers], "helpers": helpers,
                           "queue": type(results).__name__}, f)
            os.replace(ready + ".tmp", ready)
            return
        time.sleep(0.05)


def main() -> None:
    fifo, ready = sys.argv[1], sys.argv[2]
    if "--no-patch" not in sys.argv:
        from recurdepth.compat.checkpoint_writer import apply_checkpoint_writer_compat

        apply_checkpoint_writer_compat()
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    results = fa._get_write_results_queue()  # what prepare_write_data takes at every save
    threading.Thread(target=report, args=(ready, results), daemon=True).start()
    bucket = (fifo, "shard", ([], []))  # a file with nothing to write: only opening the FIFO blocks
    fa.FileSystemWriterAsync.write_preloaded_data_multiproc([], False, 0, [bucket], results)
    print("save finished", flush=True)


if __name__ == "__main__":
    main()
