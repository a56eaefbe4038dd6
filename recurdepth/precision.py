"""The precision rule, stated once (torch-free): `train.precision` bf16, fp32, or auto = bf16 on GPUs and fp32
on CPU. The trainer turns it into a dtype; plan sizes memory and speed with it."""

from __future__ import annotations


def uses_bf16(precision: str, on_gpu: bool) -> bool:
    """Whether a run with `train.precision=precision` trains in bf16 on a GPU (`on_gpu`) or a CPU."""
    return precision == "bf16" or (precision == "auto" and on_gpu)


def dtype_bytes(precision: str, on_gpu: bool) -> int:
    """Bytes per parameter / activation element of the training dtype."""
    return 2 if uses_bf16(precision, on_gpu) else 4
