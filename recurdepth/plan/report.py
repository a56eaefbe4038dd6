"""The plan as text: layout, the memory rows of the worst rank, fit (or the shortfall and the suggestion), step
time, tokens/s and MFU."""

from __future__ import annotations

from recurdepth.devices import GiB, MiB
from recurdepth.plan.devices import DEVICES
from recurdepth.plan.suggest import MAX_SUGGESTION_CHANGES


def _gib(b: float) -> str:
    return f"{b / GiB:9.3f}"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_plan(pl) -> str:
    """The report of a `recurdepth.plan.planner.Plan`."""
    w = pl.worst
    cap_what = ("RAM / processes per node" if pl.device == "cpu" else "device memory")
    lines = [
        f"plan: {pl.config_name or 'config'} on {pl.nodes} node(s) x {pl.gpus_per_node} {pl.device} = {pl.world} "
        f"rank(s) ({pl.device_description})",
        f"layout: DP {pl.dp} x TP {pl.tp} x PP {pl.pp} x EP {pl.ep}"
        f"{' (sequence parallel)' if pl.sequence_parallel else ''}"
        f"{f', pipeline split {pl.pipeline_split}' if pl.pp > 1 else ''}; {pl.micro_batches} micro-batch(es) of "
        f"{pl.micro_batch_size} per DP rank per step, global batch {pl.global_batch_size} x {pl.seq_length} tokens",
        f"model: {_count(pl.total_params)} parameters ({_count(pl.per_rank_params)} on the worst rank), padded vocab "
        f"{pl.vocab_size}, {pl.dtype}; r = {pl.r:g} (mean), k = {pl.k}: activations for {pl.grad_iterations} grad "
        f"iteration(s){', checkpointed' if pl.checkpoint_iterations else ''}",
        "",
        f"memory per rank, GiB{f' (worst: pipeline stage {pl.worst_stage} of {pl.pp})' if pl.pp > 1 else ''}",
        f"  {'parameters':<18}{_gib(pl.params)}   {pl.dtype} weights",
        f"  {'gradients':<18}{_gib(pl.grads)}   fp32 main grads (DDP grad buffer)",
        f"  {'optimizer':<18}{_gib(pl.optimizer)}   {'fp32 master + ' if pl.dtype == 'bf16' else ''}Adam m, v"
        f"{f', sharded over DP {pl.optimizer_sharding}' if pl.optimizer_sharding > 1 else ', not sharded'}",
        f"  {'activations':<18}{_gib(pl.activations)}   {w.detail}",
        f"  {'allocator slack':<18}{_gib(pl.allocator)}   {DEVICES[pl.device].allocator_slack:.0%} of activations "
        f"({'glibc malloc, calibrated' if pl.device == 'cpu' else 'caching allocator, assumed'})",
        f"  {'framework/runtime':<18}{_gib(pl.runtime)}   {pl.runtime_source}",
        f"  {'total':<18}{_gib(pl.total)}   of {pl.capacity / GiB:.2f} GiB ({cap_what})"
        f"{f'; {pl.total / MiB:,.0f} MiB' if pl.total < 8 * GiB else ''}",
    ]
    if pl.pp > 1:
        lines.append("  per stage total: " + ", ".join(f"{s.stage}: {s.total / GiB:.2f}" for s in pl.stages))
    lines.append("")
    if pl.fits:
        lines.append(f"fits: {pl.total / GiB:.2f} of {pl.capacity / GiB:.2f} GiB per rank "
                     f"({(pl.capacity - pl.total) / GiB:.2f} GiB headroom)")
    else:
        lines.append(f"does not fit: needs {pl.total / GiB:.2f} GiB per rank, {pl.shortfall / GiB:.2f} GiB "
                     f"({pl.shortfall / pl.capacity:.0%}) more than the {pl.capacity / GiB:.2f} GiB per "
                     f"{pl.device} rank")
        if pl.suggestion:
            alt = pl.suggestion_plan
            lines.append(f"suggestion: {' '.join(pl.suggestion)}  -> {alt.total / GiB:.2f} GiB per rank, fits "
                         f"(DP {alt.dp} x TP {alt.tp} x PP {alt.pp}, ~{alt.tokens_per_s:,.0f} tokens/s, "
                         f"MFU {alt.mfu:.0%})")
        else:
            lines.append(f"suggestion: none of up to {MAX_SUGGESTION_CHANGES} changes (optimizer.distributed, "
                         f"recurrence.checkpoint_iterations, train.micro_batch_size, parallel.tensor/pipeline) fits; "
                         f"use more or larger devices, or a smaller model")
    extra = []
    if pl.pp > 1:
        extra.append(f"pipeline bubble {pl.bubble:.1%}, stage imbalance x{pl.imbalance:.2f}")
    if pl.checkpoint_iterations:
        extra.append("recompute included")
    lines += [
        f"step time: ~{_duration(pl.step_time)} for {pl.tokens_per_step:,} tokens at an assumed {pl.assumed_mfu:.0%} "
        f"of {pl.peak_flops / 1e12:,.1f} TFLOP/s per rank ({pl.peak_source}){'; ' + ', '.join(extra) if extra else ''}",
        f"tokens/s: ~{pl.tokens_per_s:,.0f} ({pl.tokens_per_s / pl.world:,.0f} per rank); "
        f"{pl.model_flops_per_token / 1e9:,.2f} GFLOPs per token",
        f"MFU: ~{pl.mfu:.1%} (communication not modelled)",
    ]
    lines += [f"note: {n}" for n in pl.notes]
    return "\n".join(lines)
