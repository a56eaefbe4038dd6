"""tests/gpu: what only a CUDA device can check (bf16 kernels, TransformerEngine). Every test here is skipped
without CUDA, and the TE ones without transformer_engine, each with the reason. On a GPU machine:
`pytest tests/gpu` (a few minutes); `bash launch/gpu-check.sh` runs the same checks at ~1B size as one table."""

from __future__ import annotations

import math

import pytest
import torch

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False): tests/gpu runs on a GPU machine"
NO_TE = "transformer_engine not installed: the TE-spec checks need it (pip install transformer_engine[pytorch])"
# small shapes, fast on any GPU; gpu-check's full run has the ~1B ones
SMALL = ["model.hidden_size=256", "model.num_heads=4", "model.prelude_layers=1", "model.core_layers=2",
         "model.coda_layers=1", "model.seq_length=128", "recurrence.sampler=fixed", "recurrence.depth=4",
         "recurrence.backprop_depth=2", "train.global_batch_size=4", "train.micro_batch_size=2"]


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)


@pytest.fixture
def te():
    from recurdepth.bench.gpu_check import te_available

    if not te_available():
        pytest.skip(NO_TE)


@pytest.fixture
def run():
    """A gpu-check run at SMALL shapes, no time budget (the spec is te when transformer_engine imports)."""
    from recurdepth.bench.gpu_check import Mode, Run

    return Run(Mode(SMALL, SMALL, [], steps=2, warmup=1, decode=(2, 8, 8)), math.inf)
