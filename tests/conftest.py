"""Shared fixtures: a one-process gloo group with megatron's parallel state, a shared data cache, and a
helper that runs the CLI (optionally under torchrun) and returns its per-step metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the measured matmul peak is cached per machine (recurdepth/peak.py): tests keep theirs apart from the user's
os.environ.setdefault("RECURDEPTH_CACHE_DIR", tempfile.mkdtemp(prefix="recurdepth-test-cache-"))
TINY = ROOT / "configs" / "tiny.yaml"
# Small shapes that still exercise every part of the model; a CLI run with them takes ~10 s on 2 cores.
SMALL = ["model.hidden_size=64", "model.num_heads=4", "model.seq_length=64", "train.global_batch_size=8",
         "train.micro_batch_size=2", "logging.log_interval=1", "train.eval_interval=0",
         "optimizer.warmup_steps=2", "logging.peak_tflops=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One builtin-corpus cache for the whole session (harvesting it takes a few seconds)."""
    return str(tmp_path_factory.mktemp("data-cache"))


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, world 1) + megatron parallel_state (TP=PP=1), for in-process model tests."""
    import torch

    from recurdepth.compat.checkpoint_writer import apply_checkpoint_writer_compat
    from recurdepth.compat.megatron_cpu import apply_cpu_compat

    apply_cpu_compat()
    apply_checkpoint_writer_compat()
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield


def cli_command(args: list, nproc: int = 1, env_extra: dict | None = None, torchrun_args: tuple = ()):
    """The command line and environment of `recurdepth ARGS` (under torchrun when nproc > 1)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)), PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    if nproc > 1 or torchrun_args:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *torchrun_args, "-m", "recurdepth", *args]
    else:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        cmd = [sys.executable, "-m", "recurdepth", *args]
    return cmd, env


def run_cli(args: list, nproc: int = 1, timeout: int = 600, check: bool = True, env_extra: dict | None = None,
            torchrun_args: tuple = ()) -> subprocess.CompletedProcess:
    """`recurdepth ARGS` in a subprocess (under torchrun when nproc > 1); OMP threads split over ranks."""
    cmd, env = cli_command(args, nproc, env_extra, torchrun_args)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_same_losses(reference: list, rows: list, steps: int, rel: float = 1e-5, atol: float | None = None,
                       grad_rel: float = 1e-4) -> None:
    """Two runs' metrics agree step for step: the same r, the loss within `rel` (relative) or `atol` (absolute),
    the grad norm within `grad_rel`; a step whose loss is NaN (an injected bad step) must be NaN in both."""
    import math

    import pytest

    assert len(rows) == len(reference) == steps
    for a, b in zip(reference, rows):
        assert a["depth"] == b["depth"], (a["step"], a["depth"], b["depth"])
        if math.isnan(a["loss"]):
            assert math.isnan(b["loss"]), (a["step"], b["loss"])
            continue
        tol = atol if atol is not None else rel * abs(a["loss"])
        assert abs(a["loss"] - b["loss"]) <= tol, (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=grad_rel)


def assert_one_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    """A refused command: exit 2, no traceback, and stderr (less Python's warnings) exactly one `error:` line
    containing every needle; returns that line."""
    lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warnings.warn" not in ln]
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def pytest_runtest_logreport(report):
    """With RECURDEPTH_TEST_TIMES=FILE, append `seconds phase nodeid` for every test phase as it ends: the slow
    tests of a run that is cut short (a CI timeout) are still known."""
    path = os.environ.get("RECURDEPTH_TEST_TIMES")
    if path:
        with open(path, "a") as out:
            out.write(f"{report.duration:.2f} {report.when} {report.nodeid}\n")

