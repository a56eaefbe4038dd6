"""The matmul peak that MFU divides by: measured with enough repeats, cached per machine, device, dtype and
thread count (with the date), so a figure does not swing with a busy neighbour.

A measurement is N bursts of a large square `torch.mm` (each >= `seconds`), on this process's threads, in the
dtype the training step computes in. Other load only ever slows a burst down, so the peak is the *best* burst;
the spread (best / median, best / worst) says how busy the machine was while measuring. The cache
(`$RECURDEPTH_CACHE_DIR/peak.json`, default `~/.cache/recurdepth/peak.json`) keeps one entry per key; a
later measurement that beats it replaces it (the peak only rises: a quiet moment is the truth), `recurdepth
bench peak --refresh` measures afresh. Entries older than `MAX_AGE_DAYS` or from another torch version are
measured again. Writes are atomic (tmp + rename): concurrent ranks never read a torn file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

MAX_AGE_DAYS = 30
CPU_SIZES = (1024, 2048)
GPU_SIZES = (4096, 8192)
QUICK_SIZES = (256, 512)  # --quick benches: a table check, not a peak worth keeping


@dataclass
class Peak:
    """A measured peak: `flops` (the best burst, FLOP/s) and every burst's FLOP/s, with where and when."""

    key: str
    flops: float
    samples: list
    date: str
    torch: str

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(best - worst) / best of the bursts: 0 on an idle machine, large when something else ran."""
        return (max(self.samples) - min(self.samples)) / max(self.samples)

    def describe(self) -> str:
        return (f"peak {self.flops / 1e9:,.1f} GFLOP/s ({self.key}; best of {len(self.samples)} bursts, median "
                f"{self.median / 1e9:,.1f}, worst {min(self.samples) / 1e9:,.1f}: spread {self.spread:.0%}; "
                f"measured {self.date})")


def cache_path() -> Path:
    root = os.environ.get("RECURDEPTH_CACHE_DIR") or Path.home() / ".cache" / "recurdepth"
    return Path(root) / "peak.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_key(device: str, dtype, threads: int) -> str:
    """`host | device model | dtype | threads`: what a peak holds for (a GPU's own name; on CPU the host, CPU
    model and core count, since a VM's neighbours are per host)."""
    if device.startswith("cuda"):
        where = torch.cuda.get_device_name(torch.device(device))
    else:
        where = f"{socket.gethostname()} {_cpu_model()} x{os.cpu_count()}"
    return f"{where} | {str(dtype).replace('torch.', '')} | {threads} threads"


def measure(device: str = "cpu", dtype=None, bursts: int = 10, seconds: float = 0.2,
            sizes: Optional[tuple] = None) -> Peak:
    """Measure afresh: `bursts` bursts over `sizes` (round-robin), each >= `seconds` (about 4 s on a 2-core CPU)."""
    dtype = dtype or torch.float32
    sizes = affordable_sizes(sizes or (GPU_SIZES if device.startswith("cuda") else CPU_SIZES), seconds, dtype, device)
    samples = [mm_flops_per_second(sizes[i % len(sizes)], seconds, dtype, device) for i in range(bursts)]
    return Peak(peak_key(device, dtype, torch.get_num_threads()), max(samples), samples,
                _dt.date.today().isoformat(), torch.__version__)


_PROBE_N = 256
_probed: dict = {}


def affordable_sizes(sizes: tuple, seconds: float, dtype: torch.dtype, device: str) -> tuple:
    """`sizes`, each halved (not below 256) until one `torch.mm` of it takes under 10 bursts of `seconds`, judged by
    one timed 256^3 probe (kept per dtype and device; the margin keeps a busy moment from changing the sizes). A dtype this device only emulates (bf16 on an AVX2 CPU: ~1.5
    GFLOP/s per core, where one 2048^3 mm takes ~10 s) is then measured in seconds, not minutes; the rate of
    emulated kernels barely depends on the size, so the smaller squares still read its peak."""
    key = (str(dtype), device)
    if key not in _probed:
        a = torch.randn(_PROBE_N, _PROBE_N, dtype=dtype, device=device)
        torch.mm(a, a)  # first call: allocation and kernel selection, not timed
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, a)
        _synchronize(device)
        _probed[key] = 2 * _PROBE_N**3 / max(time.perf_counter() - start, 1e-9)
    rate = _probed[key]
    fitted = []
    for n in sizes:
        while n > _PROBE_N and 2 * n**3 / rate > 10 * seconds:
            n //= 2
        fitted.append(n)
    return tuple(dict.fromkeys(fitted))


def _synchronize(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def mm_flops_per_second(n: int, seconds: float, dtype: torch.dtype, device: str) -> float:
    """FLOP/s of one burst of `n x n` `torch.mm` lasting >= `seconds` (two calls at least)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.mm(a, b)
    _synchronize(device)
    iters, start = 0, time.perf_counter()
    while iters < 2 or time.perf_counter() - start < seconds:
        torch.mm(a, b, out=out)
        iters += 1
        _synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start)


def measure_matmul_peak(sizes: tuple = CPU_SIZES, repeats: int = 3, seconds: float = 0.15,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """The best FLOP/s of square `torch.mm` over `sizes` x `repeats` bursts of >= `seconds` each (about 1 s on
    an idle 2-core CPU), on this process's threads. Best, not mean: other load only ever slows a burst down."""
    sizes = affordable_sizes(sizes, seconds, dtype, device)
    return max(mm_flops_per_second(n, seconds, dtype, device) for _ in range(repeats) for n in sizes)


def _load() -> dict:
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or unreadable: measure (and rewrite it whole)


def _fresh(entry: dict, torch_version: str) -> bool:
    try:
        age = _dt.date.today() - _dt.date.fromisoformat(entry["date"])
        return entry["torch"] == torch_version and age.days <= MAX_AGE_DAYS and entry["flops"] > 0
    except (KeyError, TypeError, ValueError):
        return False


def lookup(device: str, dtype, threads: int) -> Optional[Peak]:
    """The cached peak for this key if it is fresh, else None."""
    entry = _load().get(peak_key(device, dtype, threads))
    if not isinstance(entry, dict) or not _fresh(entry, torch.__version__):
        return None
    return Peak(**{k: entry[k] for k in ("key", "flops", "samples", "date", "torch")})


def record(peak: Peak, refresh: bool = False) -> Peak:
    """Keep `peak` in the cache if it beats the entry there (or with `refresh`, or when the entry is stale);
    returns the entry the cache holds afterwards. A cache that cannot be written is left alone."""
    from recurdepth.atomic import write_atomically

    data = _load()
    old = data.get(peak.key)
    if not refresh and isinstance(old, dict) and _fresh(old, peak.torch) and old["flops"] >= peak.flops:
        return Peak(**{k: old[k] for k in ("key", "flops", "samples", "date", "torch")})
    data[peak.key] = asdict(peak)
    try:
        cache_path().parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache_path(), json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError:
        pass
    return peak


def cached_peak(device: str = "cpu", dtype=None) -> Peak:
    """The peak for this machine, device, dtype and this process's thread count: the cache's, or measured once
    (with these threads) and cached."""
    dtype = dtype or torch.float32
    hit = lookup(device, dtype, torch.get_num_threads())
    return hit if hit is not None else record(measure(device, dtype))


def emulated(device: str, dtype) -> bool:
    """Whether `device` computes `dtype` matmuls in software: bf16 on a CPU without AVX-512 BF16 or AMX, fp16 on
    a CPU without AMX-FP16."""
    if device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return False
    from recurdepth.precision import cpu_bf16_native

    if dtype == torch.bfloat16:
        return not cpu_bf16_native()
    probe = getattr(torch.cpu, "_is_amx_fp16_supported", None)
    return not (probe and probe())


def mfu_peak(device: str, dtype) -> float:
    """The FLOP/s MFU divides by for a step computing in `dtype`: the cached `torch.mm` peak of that dtype, and
    where the device only emulates it, at least the fp32 peak. Emulated bf16 converts to fp32 and computes there
    (SDPA and the norms run near fp32 speed, only the mm is slow), so the hardware's fp32 rate bounds the step:
    MFU stays <= 1 and says how much the emulation wastes, instead of reading ~1.1 against the slow mm."""
    best = cached_peak(device, dtype).flops
    return max(best, cached_peak(device, torch.float32).flops) if emulated(device, dtype) else best


def run_peak_bench(args) -> int:
    """`recurdepth bench peak`: measure, print the bursts and the cached entry."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    start = time.perf_counter()
    peak = measure(device, dtype, bursts=3 if args.quick else args.bursts, seconds=0.05 if args.quick else 0.2,
                   sizes=QUICK_SIZES if args.quick else None)
    print(f"this measurement ({time.perf_counter() - start:.1f} s): {peak.describe()}")
    print("bursts GFLOP/s: " + " ".join(f"{s / 1e9:.1f}" for s in peak.samples))
    if args.quick:
        return 0  # tiny sizes: not a peak worth keeping
    kept = record(peak, refresh=args.refresh)
    print(f"cached ({cache_path()}): {kept.describe()}")
    return 0
