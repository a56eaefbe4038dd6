"""The precision rule, stated once (torch-free): `train.precision` bf16, fp32, or auto = bf16 on GPUs and fp32
on CPU. The trainer turns it into a dtype; plan sizes memory and speed with it. bf16 on a CPU is a supported mode
(fp32 main parameters and gradient reduction, as on GPU); `cpu_bf16_native` says whether this CPU makes it fast.
Importing this module does not import torch."""

from __future__ import annotations


def uses_bf16(precision: str, on_gpu: bool) -> bool:
    """Whether a run with `train.precision=precision` trains in bf16 on a GPU (`on_gpu`) or a CPU."""
    return precision == "bf16" or (precision == "auto" and on_gpu)


def dtype_bytes(precision: str, on_gpu: bool) -> int:
    """Bytes per parameter / activation element of the training dtype."""
    return 2 if uses_bf16(precision, on_gpu) else 4


def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matrix work in hardware (AVX-512 BF16 or AMX tiles), as torch's own dispatch
    tests it. Without it (AVX2-only x86, e.g. most EPYC before Zen 4) oneDNN emulates bf16 matmuls, measured
    ~40x slower than fp32 on a 2-core AVX2 EPYC (docs/performance.md, "bf16 on CPU")."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def cpu_bf16_warning() -> str:
    """The line a CPU run in bf16 prints when this CPU has no bf16 hardware; "" when it has."""
    if cpu_bf16_native():
        return ""
    import torch

    return (f"warning: train.precision=bf16 on a CPU without AVX-512 BF16 or AMX (torch's CPU capability here: "
            f"{torch.backends.cpu.get_cpu_capability()}): bf16 matmuls run emulated, tens of times slower than "
            f"fp32 (`recurdepth bench peak --dtype bf16` measures it); train.precision=fp32 is the fast choice on "
            f"this machine")
