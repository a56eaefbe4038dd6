"""`launch/gpu-check.sh --quick` keeps working on CPU: one table with every check, none FAIL (the TE checks skip
with their reason); a check that raises is a FAIL row and a non-zero exit, the other checks still run."""

from __future__ import annotations

import os
import subprocess
import sys

from recurdepth.bench import gpu_check
from tests.conftest import ROOT


def table_rows(stdout: str) -> dict:
    """check name -> (result, figure, status) of the table's body rows."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) == 4 and cells[0] in gpu_check.CHECKS:
            rows[cells[0]] = tuple(cells[1:])
    return rows


def test_gpu_check_quick_prints_every_row_and_no_failure():
    env = dict(os.environ, PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    out = subprocess.run(["bash", str(ROOT / "launch" / "gpu-check.sh"), "--quick"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-5000:])
    rows = table_rows(out.stdout)
    assert sorted(rows) == sorted(gpu_check.CHECKS), out.stdout
    assert all(status in ("ok", "skip") for _, _, status in rows.values()), out.stdout
    if not gpu_check.te_available():
        for name in ("te-vs-local", "ckpt-te-local"):  # skipped, but their stand-in ran and agreed
            result, figure, status = rows[name]
            assert status == "skip" and gpu_check.NO_TE in result and figure, rows[name]
    for name in ("train-step", "decode", "compile", "quiet-star"):
        assert rows[name][2] == "ok" and "tok/s" in rows[name][1], rows[name]


def test_a_raising_check_is_a_fail_row_and_the_rest_still_run(monkeypatch):
    def broken(run):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(gpu_check, "RUNNERS", {**{name: lambda run: gpu_check.Row("x", "fine", "1", "ok")
                                                  for name in gpu_check.CHECKS}, "decode": broken})
    monkeypatch.setattr(gpu_check, "te_available", lambda: False)
    rows = gpu_check.run_checks(gpu_check.QUICK, budget=1e9)
    assert [r.status for r in rows] == ["FAIL" if n == "decode" else "ok" for n in gpu_check.CHECKS]
    assert rows[gpu_check.CHECKS.index("decode")].result == "RuntimeError: boom"
    table = gpu_check.format_table(rows)
    assert len(table.splitlines()) == len(gpu_check.CHECKS) + 2 and "FAIL" in table


def test_the_full_run_refuses_a_machine_without_cuda():
    import argparse

    import pytest
    import torch

    from recurdepth.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the full run would start")
    with pytest.raises(ConfigError, match="--quick"):
        gpu_check.run_gpu_check(argparse.Namespace(quick=False, only=None, budget=None))
