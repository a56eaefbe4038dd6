"""megatron's torch.compile fusions are dropped on CPU as megatron is imported (recurdepth/compat/megatron_jit.py):
importing megatron after recurdepth leaves dynamo/inductor unimported and jit_fuser megatron's no-op decorator;
RECURDEPTH_MEGATRON_JIT=1 keeps megatron's own behaviour (the check can fail)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CODE = ("import sys, recurdepth, megatron.core; from megatron.core.models.gpt import GPTModel; "
        "from recurdepth.compat.megatron_jit import is_applied; "
        "print(is_applied(), 'torch._dynamo' in sys.modules, 'torch._inductor' in sys.modules)")


def imported(env_extra: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RECURDEPTH_MEGATRON_JIT"} | env_extra
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the fusions stay")
def test_on_cpu_megatron_imports_without_dynamo_and_without_fusions():
    assert imported({}) == "True False False"


def test_the_switch_keeps_megatrons_fusions():
    assert imported({"RECURDEPTH_MEGATRON_JIT": "1"}) == "False True True"


def test_the_in_process_suite_runs_without_them_too():
    from recurdepth.compat.megatron_jit import is_applied

    import megatron.core  # noqa: F401 - imported by the suite anyway

    assert is_applied() == (not torch.cuda.is_available())
