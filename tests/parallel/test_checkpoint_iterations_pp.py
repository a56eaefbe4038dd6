"""`recurrence.checkpoint_iterations` under pipeline parallelism: the looped schedule checkpoints each grad chunk
on every stage (the model's `iteration`), so autograd keeps fewer bytes, and the step is the same step (PP=2)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, cli_command


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt-iterations")
    _, env = cli_command([], nproc=2)
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "parallel", "_checkpoint_iterations_worker.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_checkpointed_chunks_save_fewer_bytes_with_the_same_step(results, stage):
    plain, ckpt = results[stage][False], results[stage][True]
    assert ckpt["saved_bytes"] < 0.6 * plain["saved_bytes"], (stage, ckpt["saved_bytes"], plain["saved_bytes"])
    assert torch.equal(ckpt["loss"], plain["loss"])
    assert plain["grads"].keys() == ckpt["grads"].keys() and plain["grads"]
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][name], grad, rtol=0, atol=0, msg=name)
