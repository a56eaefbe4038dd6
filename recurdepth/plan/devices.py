"""What `plan` assumes about each device kind (`--gpu`), and what it measures when the device is this machine's
CPU. Peak FLOP/s and capacities come from the one accelerator table, `recurdepth/devices.py`; this module adds
the planner's own assumptions (runtime footprint, allocator slack)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from recurdepth.devices import ACCELERATORS, GiB, MiB
from recurdepth.errors import ConfigError


@dataclass(frozen=True)
class DeviceSpec:
    """What `plan` assumes about one accelerator (or a CPU process)."""

    name: str
    memory_bytes: Optional[int]  # None = this machine's RAM (cpu), shared by the processes of a node
    peak_flops: Optional[float]  # dense bf16 datasheet peak; None = measured torch.mm peak (cpu)
    runtime_bytes: Optional[int]  # None = measured (cpu)
    allocator_slack: float  # fraction of the activations
    description: str


GPU_RUNTIME_BYTES = 2 * GiB  # CUDA context, cuBLAS workspaces and NCCL buffers (assumed)
GPU_ALLOCATOR_SLACK = 0.10  # PyTorch's CUDA caching allocator (assumed)
CPU_ALLOCATOR_SLACK = 0.80  # glibc malloc keeping freed activation blocks resident (calibrated, docs/operations.md)

# Every accelerator whose capacity the table states, then this machine's CPU.
DEVICES = {acc.key: DeviceSpec(acc.key, acc.memory_bytes, acc.peak_flops, GPU_RUNTIME_BYTES, GPU_ALLOCATOR_SLACK,
                               acc.description)
           for acc in ACCELERATORS if acc.memory_bytes is not None}
DEVICES["cpu"] = DeviceSpec("cpu", None, None, None, CPU_ALLOCATOR_SLACK,
                            "CPU process (this machine's RAM, measured torch.mm peak)")
# Resident size of a fresh training process on CPU (torch 2.13.0+cpu, megatron-core 0.16.1, process groups
# built), measured on the 2-core development VM; used only when the measuring subprocess fails.
CPU_RUNTIME_FALLBACK_BYTES = 368 * MiB


def device_spec(gpu: str) -> DeviceSpec:
    key = gpu.lower()
    if key not in DEVICES:
        raise ConfigError(f"--gpu={gpu!r} is not a known device; use one of {', '.join(DEVICES)}")
    return DEVICES[key]


def runtime_of(spec: DeviceSpec, runtime_bytes: Optional[int] = None) -> tuple[int, str]:
    """(bytes, where the figure comes from) of the framework/runtime row."""
    if runtime_bytes is not None:
        return int(runtime_bytes), "given"
    if spec.runtime_bytes is not None:
        return spec.runtime_bytes, "assumed: CUDA context + cuBLAS workspaces + NCCL buffers"
    return measure_cpu_runtime_bytes()


def capacity_of(spec: DeviceSpec, gpus_per_node: int) -> int:
    """Bytes one rank may use: the device's memory, or on CPU this machine's RAM shared by the node's processes."""
    return spec.memory_bytes if spec.memory_bytes is not None else cpu_memory_bytes() // gpus_per_node


@functools.lru_cache(maxsize=1)
def measure_cpu_runtime_bytes() -> tuple[int, str]:
    """Resident size (VmRSS) of a fresh process that imported torch, megatron-core and recurdepth's trainer and
    built a one-process gloo group + megatron's parallel state: the floor of any CPU training process."""
    probe = (
        "import torch, torch.distributed as dist\n"
        "from recurdepth.compat.megatron_cpu import apply_cpu_compat\n"
        "apply_cpu_compat()\n"
        "from megatron.core import parallel_state\n"
        "import recurdepth.train.trainer\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "parallel_state.initialize_model_parallel(1, 1)\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS:')][0].split()[1]\n"
        "print('RSS', int(rss) * 1024)\n"
    )
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    root = str(Path(__file__).resolve().parents[2])  # the checkout holding recurdepth/
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RSS ")]
        if out.returncode == 0 and lines:
            return int(lines[-1].split()[1]), "measured: a fresh process with torch + megatron-core + process groups"
    except (OSError, subprocess.SubprocessError):
        pass
    return CPU_RUNTIME_FALLBACK_BYTES, "fallback constant (measuring subprocess failed)"


def cpu_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=1)
def cpu_peak_flops() -> float:
    from recurdepth.peak import cached_peak

    return cached_peak("cpu").flops  # fp32, this process's threads: measured once per machine, then cached
