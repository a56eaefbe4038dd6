"""One optimizer step, for every engine: token counting, forward/backward of this rank's micro-batches,
injected faults, gradient reduction, the loss reduced over DP and PP, the guard's verdict and the update, all
through the engine's verbs (`recurdepth.train.engine.base`).

The loss is summed per token and divided by the global token count (after the data-parallel reduction), so
any layout gives the same update. Under pipeline parallelism the looped schedule drives the stages, or the
objective itself when it runs several passes per micro-batch (`objective.multi_pass`: `pipeline_run`,
recurdepth/parallel/passes.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from recurdepth.model.depth import BackpropWindow


@dataclass
class StepOutcome:
    loss: float  # global token-mean loss
    grad_norm: float  # NaN when the update was skipped
    bad: Optional[str] = None  # why the step was rejected (agreed over ranks), None when it was applied


def pipeline_schedule(cfg, model, dtype: torch.dtype, device: torch.device):
    """The recurrence-aware pipeline schedule driving this rank's stage, or None without PP."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() == 1:
        return None
    from recurdepth.parallel.naive import NaivePipelineSchedule
    from recurdepth.parallel.pipeline import LoopedPipelineSchedule

    m, t, p = cfg.model, cfg.train, cfg.parallel
    seq = m.seq_length // (ps.get_tensor_model_parallel_world_size() if p.sequence_parallel else 1)
    cls = NaivePipelineSchedule if p.pipeline_split == "naive" else LoopedPipelineSchedule
    return cls(model, ps.get_pipeline_model_parallel_group(), (seq, t.micro_batch_size, m.hidden_size),
               dtype, device, record_timeline=p.record_timeline, multi_pass_in_flight=p.multi_pass_in_flight)


def optimizer_step(engine, objective, guard, faults, schedule, batches: list, window: BackpropWindow,
                   collect: bool = False) -> StepOutcome:
    """Forward/backward over `batches`, the reduction and the update unless the guard rejects the step (its
    verdict is the same on every rank; the guard's history is the caller's to update)."""
    tokens = sum(objective.loss_tokens(mb) for mb in batches).float()
    engine.prepare(tokens)
    loss_sum = forward_backward(engine, objective, schedule, faults, batches, window, collect)
    if faults.loss_is_nan():
        loss_sum = loss_sum * float("nan")
    engine.reduce_gradients(tokens)  # `tokens` is the global count from here on
    reduce_loss(loss_sum)
    loss = (loss_sum / tokens.clamp_min(1)).item()
    finite = engine.grads_finite()
    grad_norm, bad = engine.step(guard.verdict(loss, finite))
    return StepOutcome(loss, grad_norm, bad)


def forward_backward(engine, objective, schedule, faults, batches: list, window: BackpropWindow,
                     collect: bool = False) -> torch.Tensor:
    """Forward and (with grad enabled) backward of this rank's micro-batches; returns the summed loss (on the
    last pipeline stage; zero on others)."""
    if schedule is not None:
        if objective.multi_pass:
            return schedule.run_multi_pass(lambda: objective.pipeline_run(engine.model, batches, window))
        scale, loss_fn = faults.loss_scale(), objective.pipeline_loss
        scaled = (lambda fn: fn) if scale == 1.0 else (lambda fn: lambda *a: fn(*a) * scale)
        read_at = objective.pipeline_readouts(window)
        readouts = None if read_at is None else (read_at, scaled(objective.pipeline_readout_loss))
        return schedule.run(batches, window, scaled(loss_fn), **({"readouts": readouts} if readouts else {}))
    loss_sum = torch.zeros((), dtype=torch.float32, device=engine.device)
    backward = torch.is_grad_enabled()
    for i, mb in enumerate(batches):
        mb_loss = objective.loss_sum(engine.model, mb, window, collect and i == 0) * faults.loss_scale()
        if backward:
            engine.backward(mb_loss, last=i == len(batches) - 1)
        loss_sum += mb_loss.detach()
    return loss_sum


def reduce_loss(loss_sum: torch.Tensor) -> None:
    """Sum the loss over data-parallel ranks, and from the last pipeline stage to all (in place)."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(loss_sum, group=parallel_state.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())


def router_balance_loss(calls_per_layer: int, dp_size: int) -> float:
    """Mean load-balancing loss of the MoE routers over this step's grad passes (megatron's tracker holds
    the per-layer sums; each core layer's router runs once per grad iteration and micro-batch)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    entry = get_moe_layer_wise_logging_tracker().get("load_balancing_loss")
    if entry is None:
        return float("nan")
    values = entry["values"]
    layers = int((values != 0).sum().clamp_min(1))
    mean = (values.sum() / (layers * max(calls_per_layer, 1))).reshape(1).float()
    torch.distributed.all_reduce(mean, group=parallel_state.get_data_parallel_group())
    clear_aux_losses_tracker()
    return float(mean) / dp_size
