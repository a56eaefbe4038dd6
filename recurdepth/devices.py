"""The accelerators recurdepth knows, stated once (torch-free): datasheet dense bf16 peak FLOP/s and the memory
the driver reports. `recurdepth.train.flops` measures MFU against these peaks (`GPU_PEAK_FLOPS`, matched by
the name `torch.cuda.get_device_name` reports); `recurdepth plan` sizes memory and speed with them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Accelerator:
    """One accelerator kind."""

    key: str  # `recurdepth plan --gpu KEY`
    match: str  # substring of the CUDA device name (checked in table order: "A100" before "A10")
    peak_flops: float  # dense bf16 datasheet peak, without sparsity
    memory_bytes: Optional[int]  # total as the CUDA driver reports it ("80 GB" H100: ~79.1 GiB); None = not tabulated
    description: str


ACCELERATORS = (
    Accelerator("h100", "H100", 989e12, int(79.1 * GiB), "H100 SXM 80 GB, 989 TFLOP/s bf16"),
    Accelerator("h200", "H200", 989e12, int(139.8 * GiB), "H200 141 GB, 989 TFLOP/s bf16"),
    Accelerator("a100", "A100", 312e12, int(79.2 * GiB), "A100 80 GB, 312 TFLOP/s bf16"),
    Accelerator("l40s", "L40S", 362e12, None, "L40S, 362 TFLOP/s bf16"),
    Accelerator("a10", "A10", 125e12, None, "A10, 125 TFLOP/s bf16"),
)


def datasheet_peak_flops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the first accelerator whose `match` is in `device_name`, else None."""
    for acc in ACCELERATORS:
        if acc.match in device_name:
            return acc.peak_flops
    return None
