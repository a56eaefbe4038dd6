"""`recurdepth sweep SWEEP --slurm`: the sweep as one slurm job array, `<out>/sweep.sbatch`.

The script is `sweep.sbatch.template` (beside this file) rendered by the `launch slurm` machinery
(`recurdepth.launch.render_sbatch`: the time limit, signal, names and the python that renders it are checked
and filled in the same way), then given its array range: task i of `--array=0-(N-1)%parallel` runs
`recurdepth sweep SWEEP --task i` on one node with `nproc` GPUs, in the directory the script was rendered
from. USR1 before the time limit reaches the training run through the task (checkpoint, exit); with
slurm.requeue the task requeues itself and resumes.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from recurdepth.sweep.spec import Sweep

TEMPLATE = Path(__file__).with_name("sweep.sbatch.template")


def render_array(sweep: Sweep) -> str:
    """The job-array script of `sweep` (module docstring); ConfigError for a bad slurm: section."""
    from recurdepth.launch import render_sbatch

    s = sweep.slurm
    text = render_sbatch(sweep.path, 1, sweep.nproc, str(s.get("time", "04:00:00")), s.get("signal_seconds", 300),
                         (), 0, s.get("job_name") or f"recurdepth-sweep-{sweep.path.stem}", s.get("partition"),
                         s.get("account"), cpus_per_task=s.get("cpus_per_task"), output="%x-%A_%a.out",
                         requeue=bool(s.get("requeue", False)), template=TEMPLATE)
    last = len(sweep.runs) - 1
    array = f"0-{last}" + (f"%{sweep.parallel}" if sweep.parallel < len(sweep.runs) else "")
    return text.replace("@ARRAY@", array).replace("@WORKDIR@", shlex.quote(str(Path.cwd())))
