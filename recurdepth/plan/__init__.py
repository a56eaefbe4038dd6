"""`recurdepth plan CONFIG --nodes N --gpus-per-node G --gpu h100`: will this run fit, and how fast is it?

Without any accelerator: validates the layout (`check_layout`), then models, per rank, the memory of a
training step and an estimated step time / MFU, for any cluster size (a 3.5B looped model on 4096 GPUs
plans in milliseconds). When the worst rank does not fit it says by how much and suggests the first
change (as `section.key=value` overrides) that does, found by re-planning the alternatives.

One module per concern; the rules the trainer also follows are imported, never restated:
    devices   what each `--gpu` kind is assumed to be (peaks and capacities: recurdepth/devices.py), the CPU probe
    shape     vocabulary (training's model.vocab_size rule), depth (recurdepth.model.depth), parameters per stage
    memory    the per-rank memory model (its docstring states it); pipeline in-flight counts from
              recurdepth.parallel.schedule
    speed     step time, tokens/s, MFU (FLOPs: recurdepth.train.flops; bubble: recurdepth.parallel.schedule)
    suggest   the search for the fewest changes that fit (overrides applied by recurdepth.config)
    report    the text
    planner   `plan()` and its `Plan`
    cli       the `recurdepth plan` verb
The precision rule is recurdepth.precision's. Importing this package does not import torch (the functions
that need torch or megatron-core import them when called).
"""

from recurdepth.devices import GiB, MiB
from recurdepth.plan.cli import add_plan_parser, run_plan
from recurdepth.plan.devices import (CPU_RUNTIME_FALLBACK_BYTES, DEVICES, DeviceSpec, device_spec,
                                     measure_cpu_runtime_bytes)
from recurdepth.plan.memory import (StageMemory, adapter_activation_bytes, head_activation_bytes,
                                    layer_activation_bytes, looped_pipeline_in_flight, stage_activations,
                                    stage_memory)
from recurdepth.plan.planner import Plan, plan
from recurdepth.plan.report import format_plan
from recurdepth.plan.shape import (layer_params, max_recurrence, mean_recurrence,
                                   resolve_vocab_size, stage_params, total_params)
from recurdepth.plan.speed import DEFAULT_ASSUMED_MFU, estimate_speed, pipeline_bubble
from recurdepth.plan.suggest import MAX_SUGGESTION_CHANGES, apply_overrides, candidate_moves, suggest_fix

__all__ = [
    "CPU_RUNTIME_FALLBACK_BYTES", "DEFAULT_ASSUMED_MFU", "DEVICES", "DeviceSpec", "GiB", "MAX_SUGGESTION_CHANGES",
    "MiB", "Plan", "StageMemory", "adapter_activation_bytes", "add_plan_parser", "apply_overrides",
    "candidate_moves", "device_spec", "estimate_speed", "format_plan", "head_activation_bytes",
    "layer_activation_bytes", "layer_params", "looped_pipeline_in_flight", "max_recurrence",
    "mean_recurrence", "measure_cpu_runtime_bytes", "pipeline_bubble", "plan",
    "resolve_vocab_size", "run_plan", "stage_activations", "stage_memory", "stage_params", "suggest_fix",
    "total_params",
]
