"""Estimated step time, tokens/s and MFU of a training step.

Step time = tokens per step × hardware FLOPs per token (`recurdepth.train.flops`, r = the mean depth of
`recurdepth.model.depth.mean_depth`, recompute included) / (world × peak × assumed achievable MFU, default
40%), times the pipeline's stage imbalance (p × the busiest stage's share of the FLOPs) and (1 + bubble), the
bubble being the schedule's own formula (`recurdepth.parallel.schedule.expected_bubble_window`:
3(p−1)/(m(r+2g)) for the looped split; the naive split is one trip, (p−1)/m). Communication is not
modelled. MFU = model FLOPs (no recompute) / (step time × world × peak). Peak: logging.peak_tflops, else the
datasheet figure of `recurdepth/devices.py`, else on cpu a measured fp32 torch.mm.
"""

from __future__ import annotations

from dataclasses import dataclass

from recurdepth.config import Config
from recurdepth.model.depth import BackpropWindow
from recurdepth.plan.devices import DeviceSpec, cpu_peak_flops
from recurdepth.plan.shape import core_layers_on, mean_recurrence
from recurdepth.parallel import schedule

DEFAULT_ASSUMED_MFU = 0.40


@dataclass
class Speed:
    """The speed half of a plan."""

    r: float  # the mean depth FLOPs are counted at
    k: int
    model_flops_per_token: float
    hardware_flops_per_token: float
    peak_flops: float
    peak_source: str
    bubble: float  # idle / ideal compute of the pipeline (0 without one)
    imbalance: float
    step_time: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float


def peak_of(cfg: Config, spec: DeviceSpec) -> tuple[float, str]:
    """(peak FLOP/s per rank, where it comes from)."""
    if cfg.logging.peak_tflops:
        return cfg.logging.peak_tflops * 1e12, "logging.peak_tflops"
    if spec.peak_flops is not None:
        return spec.peak_flops, "datasheet dense bf16"
    return cpu_peak_flops(), "measured fp32 torch.mm on this machine (cached: recurdepth bench peak)"


def pipeline_window(cfg: Config, r: float) -> BackpropWindow:
    """The window the pipeline's chunks walk per micro-batch at depth r: the looped split's r iterations with
    gradients through min(r, k), or the naive split's single trip through the whole core."""
    if cfg.parallel.pipeline_split == "naive":
        return BackpropWindow(1, 1)
    return BackpropWindow.of(r, cfg.recurrence.backprop_depth)


def pipeline_bubble(cfg: Config, r: float, micro_batches: int) -> float:
    """Idle / ideal compute of the schedule (`recurdepth.parallel.schedule.expected_bubble_window`) at the mean
    depth r (0 without a pipeline)."""
    pp = cfg.parallel.pipeline
    if pp == 1:
        return 0.0
    return schedule.expected_bubble_window(pp, pipeline_window(cfg, r), micro_batches)


def stage_flops(cfg: Config, fl, r: float) -> list[float]:
    """Training FLOPs per token of each pipeline stage at depth r (`fl`: the whole model's
    `recurdepth.train.flops.LoopedFlops`, split by what each stage holds and counted by its `per_token`)."""
    from recurdepth.train.flops import LoopedFlops, layer_flops

    m, pp = cfg.model, cfg.parallel.pipeline
    layer = layer_flops(cfg)
    adapter = fl.core - m.core_layers * layer
    out = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        here = LoopedFlops(prelude=fl.prelude if first else 0.0,
                           core=core_layers_on(cfg, s, pp) * layer + (adapter if first else 0.0),
                           coda=fl.coda if last else 0.0, head=fl.head if last else 0.0)
        out.append(here.per_token(r, cfg.recurrence.backprop_depth))
    return out


def estimate_speed(cfg: Config, vocab: int, world: int, micro_batches: int, spec: DeviceSpec, checkpointing: bool,
                   assumed_mfu: float) -> Speed:
    from recurdepth.train.flops import looped_flops

    fl = looped_flops(cfg, vocab)
    r, k = mean_recurrence(cfg), cfg.recurrence.backprop_depth
    model_fpt = fl.per_token(r, k)
    hw_fpt = fl.per_token(r, k, recompute=checkpointing)
    peak, peak_source = peak_of(cfg, spec)
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    imbalance = 1.0
    if cfg.parallel.pipeline > 1:
        per_stage = stage_flops(cfg, fl, r)
        imbalance = len(per_stage) * max(per_stage) / sum(per_stage)
    bubble = pipeline_bubble(cfg, r, micro_batches)
    step_time = tokens * hw_fpt / (world * peak * assumed_mfu) * imbalance * (1 + bubble)
    return Speed(r=r, k=k, model_flops_per_token=model_fpt, hardware_flops_per_token=hw_fpt, peak_flops=peak,
                 peak_source=peak_source, bubble=bubble, imbalance=imbalance, step_time=step_time,
                 tokens_per_step=tokens, tokens_per_s=tokens / step_time,
                 mfu=tokens * model_fpt / (step_time * world * peak))
