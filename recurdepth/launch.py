"""`recurdepth launch slurm CONFIG --nodes N --gpus-per-node G [overrides...]`: a ready sbatch script.

The script text lives in launch/sbatch.template (one torchrun per node under srun -- `python -m recurdepth.torchrun`,
so that a clean stop exits 0 with one line --, c10d rendezvous on the first host of the allocation, USR1
`--signal` forwarded to every rank for a checkpoint before the time limit, environment and code version logged). The config and layout are validated here first, so an
impossible layout is one `error: ...` line at submission time, not a failed job hours later.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from recurdepth.atomic import write_atomically as _write_atomically
from recurdepth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "launch" / "sbatch.template"
# slurm's --time forms: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def slurm_time_seconds(time: str) -> int:
    """Seconds in a slurm --time value ('24:00:00', '2-00:00:00', '90' minutes, '30:00' = MM:SS)."""
    m = _TIME.match(str(time).strip())
    if not m:
        raise ConfigError(f"--time {time!r} is not a slurm time; use HH:MM:SS, D-HH:MM:SS or minutes")
    if m["d"] is not None:
        return ((int(m["d"]) * 24 + int(m["dh"])) * 60 + int(m["dm"] or 0)) * 60 + int(m["ds"] or 0)
    a, b, c = m["a"], m["b"], m["c"]
    if c is not None:
        return (int(a) * 60 + int(b)) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def render_sbatch(config, nodes: int, gpus_per_node: int, time: str = "24:00:00", signal_seconds: int = 300,
                  overrides: Sequence[str] = (), max_restarts: int = 0, job_name: Optional[str] = None,
                  partition: Optional[str] = None, account: Optional[str] = None, *,
                  cpus_per_task: Optional[int] = None, output: str = "%x-%j.out", rdzv_port: int = 29500,
                  requeue: bool = False, template: Optional[Path] = None) -> str:
    """The sbatch script for `recurdepth train CONFIG OVERRIDES` on NODES x GPUS_PER_NODE ranks."""
    _positive("--nodes", nodes)
    _positive("--gpus-per-node", gpus_per_node)
    _positive("--signal-seconds", signal_seconds)
    _positive("--max-restarts", max_restarts, 0)
    _positive("--rdzv-port", rdzv_port)
    if cpus_per_task is not None:
        _positive("--cpus-per-task", cpus_per_task)
    limit = slurm_time_seconds(time)
    if signal_seconds >= limit:
        raise ConfigError(f"--signal-seconds {signal_seconds} is not less than --time {time} ({limit} s); "
                          f"the checkpoint signal would come before training starts")
    config_path = Path(config).resolve()
    job_name = job_name or f"recurdepth-{config_path.stem}"
    for name, value in (("--job-name", job_name), ("--partition", partition), ("--account", account),
                        ("--output", output)):
        if value is not None and (not value or re.search(r"\s", value)):
            raise ConfigError(f"{name} {value!r} must be non-empty and contain no whitespace")
    extra = [f"#SBATCH --{key}={value}" for key, value in
             (("partition", partition), ("account", account), ("cpus-per-task", cpus_per_task)) if value is not None]
    if requeue:
        extra.append("#SBATCH --requeue")
    values = {
        "job_name": job_name, "nodes": nodes, "gpus_per_node": gpus_per_node, "time": time,
        "signal_seconds": signal_seconds, "output": output, "extra_sbatch": "\n".join(extra),
        "root": shlex.quote(str(ROOT)), "config": shlex.quote(str(config_path)),
        "overrides": " ".join(shlex.quote(str(o)) for o in overrides),
        "bin_dir": shlex.quote(str(Path(sys.executable).parent)), "python": shlex.quote(sys.executable),
        "rdzv_port": rdzv_port,
        "max_restarts": max_restarts, "requeue": int(bool(requeue)),
        # how long torchrun lets ranks finish their checkpoint after USR1 before it kills them
        "shutdown_timeout": max(30, signal_seconds - 30),
    }
    path = Path(template or TEMPLATE)
    if not path.is_file():
        raise ConfigError(f"sbatch template {path} not found; `recurdepth launch slurm` needs the source checkout "
                          f"(pip install -e .), whose launch/ folder the job runs from")
    text = path.read_text()
    if not extra:  # no blank line where no extra #SBATCH lines go
        text = text.replace("{{extra_sbatch}}\n", "")
    missing = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if missing:
        raise ConfigError(f"{path} has unknown placeholders {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


def write_atomically(path: Path, text: str) -> None:
    """The script at PATH, executable, via the one atomic write (`recurdepth.atomic`: tmp, fsync, rename, fsync
    dir): a reader never sees half a script."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, text, mode=0o755)


def _slurm(args: argparse.Namespace) -> int:
    from recurdepth.config import load_config
    from recurdepth.distributed import check_layout

    cfg = load_config(args.config, args.overrides)
    world = _positive("--nodes", args.nodes) * _positive("--gpus-per-node", args.gpus_per_node)
    dp = check_layout(cfg, world)
    script = render_sbatch(args.config, args.nodes, args.gpus_per_node, args.time, args.signal_seconds,
                           args.overrides, args.max_restarts, args.job_name, args.partition, args.account,
                           cpus_per_task=args.cpus_per_task, output=args.output, rdzv_port=args.rdzv_port,
                           requeue=args.requeue)
    if args.out:
        write_atomically(Path(args.out), script)
        print(f"wrote {args.out}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = world {world} "
              f"(dp {dp} x tp {cfg.parallel.tensor} x pp {cfg.parallel.pipeline}); submit with: sbatch {args.out}",
              file=sys.stderr)
    else:
        sys.stdout.write(script)
    return 0


class _IntermixedParser(argparse.ArgumentParser):
    """Overrides may follow the options (`slurm CONFIG --nodes 2 --gpus-per-node 8 train.steps=10`): plain
    argparse stops filling a '*' positional at the first option and rejects what comes after it."""

    _inside = False

    def parse_known_args(self, args=None, namespace=None):
        if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._inside = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inside = False


def add_launch_parser(verbs) -> None:
    """`recurdepth launch slurm ...` on the CLI's sub-command parsers."""
    launch = verbs.add_parser("launch", help="job scripts for clusters: recurdepth launch slurm CONFIG --nodes N "
                                             "--gpus-per-node G [overrides ...]")
    kinds = launch.add_subparsers(dest="launcher", required=True, parser_class=_IntermixedParser)
    slurm = kinds.add_parser(
        "slurm", help="print (or --out: write) an sbatch script: one torchrun per node, c10d rendezvous, "
                      "USR1 before the time limit for a checkpoint",
        description="Validates the config and the layout for NODES x GPUS_PER_NODE ranks, then prints a ready "
                    "sbatch script (launch/sbatch.template) or writes it with --out.")
    slurm.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    slurm.add_argument("overrides", nargs="*", help="dotted overrides passed on to `recurdepth train`")
    slurm.add_argument("--nodes", type=int, required=True, help="number of nodes (one torchrun each)")
    slurm.add_argument("--gpus-per-node", type=int, required=True, help="ranks per node (torchrun --nproc_per_node)")
    slurm.add_argument("--time", default="24:00:00", help="wall-clock limit, slurm syntax (default 24:00:00)")
    slurm.add_argument("--signal-seconds", type=int, default=300,
                       help="send USR1 this many seconds before the limit: checkpoint and exit (default 300)")
    slurm.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts (default 0)")
    slurm.add_argument("--job-name", default=None, help="default recurdepth-<config name>")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's torchrun (split over ranks)")
    slurm.add_argument("--output", default="%x-%j.out", help="sbatch --output (default %%x-%%j.out)")
    slurm.add_argument("--rdzv-port", type=int, default=29500, help="c10d rendezvous port on the head node")
    slurm.add_argument("--requeue", action="store_true", help="requeue the job after the USR1 checkpoint")
    slurm.add_argument("--out", default=None, help="write the script here (atomically) instead of printing it")
    slurm.set_defaults(func=_slurm)
