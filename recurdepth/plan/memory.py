"""The per-rank memory of a training step, stage by stage.

Bytes per rank (Φ = parameters held by the rank, after TP/PP/EP sharding; d = bytes of the training dtype,
`recurdepth.precision.dtype_bytes`: 2 for bf16, 4 for fp32):
    parameters   d · Φ                            weights in the training dtype
    gradients    4 · Φ                            megatron DDP's fp32 main-grad buffer (grad_reduce_in_fp32)
    optimizer    (4 [fp32 master copy, bf16 only] + 8 [Adam m, v]) · Φ / DP_opt
                 DP_opt = data-parallel size with optimizer.distributed (expert weights: DP / EP), else 1
    activations  what autograd keeps for backward, for the micro-batches in flight on the worst stage;
                 only the min(r_max, k) grad iterations of the core count (no-grad iterations keep
                 nothing), never r. Per layer and token, in elements of the training dtype
                 (the local megatron spec with SDPA attention, counted tensor by tensor on CPU):
                     (n_norm + 2) h / TP_sp              norm inputs, QKV and MLP-in inputs
                   + (4 h + 3 kv + mlp) / TP             q, k, v, roped q/k, attention out; MLP
                   (+ a s / TP with model.attention=megatron: the softmax probabilities)
                 mlp = 5 f (swiglu) or 2 f (gelu); n_norm = 4 (sandwich) or 2 (pre); kv = groups ·
                 head dim; TP_sp = TP with sequence parallelism, else 1. Plus per grad iteration the
                 adapter (concat 2h, gate 5h, add 0), the final norm (h) and the fp32 logits of the
                 loss (4 V / TP bytes, plus d V / TP for a bf16 copy). With
                 recurrence.checkpoint_iterations (counted at PP=1 only; the pipeline's checkpointed chunks are not)
                 each grad iteration keeps its input state (h) and one iteration is recomputed at a time.
                 Pipeline (looped split): stage s holds up to the schedule's cap of grad chunks
                 (`recurdepth.parallel.schedule.default_cap`: p·g − s; R/p layers + adapter on stage 0)
                 and stage 0 the prelude of up to min(m, 2p) micro-batches (two of the schedule's groups
                 of p). The naive split is the same schedule with one trip per micro-batch.
    allocator    slack of the memory allocator on top of the activations (`DeviceSpec.allocator_slack`)
    framework/   what the process holds before the model exists (`recurdepth.plan.devices.runtime_of`)
    runtime
"""

from __future__ import annotations

from dataclasses import dataclass

from recurdepth.config import Config
from recurdepth.model.depth import BackpropWindow
from recurdepth.plan.shape import is_moe, dims, stage_params
from recurdepth.parallel import schedule


@dataclass
class StageMemory:
    """Per-rank bytes of one pipeline stage."""

    stage: int
    param_count: int
    params: int
    grads: int
    optimizer: int
    activations: int
    allocator: int
    runtime: int
    detail: str = ""  # what the activations hold

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.allocator + self.runtime


# ---------------------------------------------------------------------------------------------- activations


def layer_activation_bytes(cfg: Config, dtype_bytes: int, tp: int, sp: bool, moe: bool) -> float:
    """Bytes one transformer block keeps for backward, per token of a micro-batch (see the module docstring)."""
    m, d = cfg.model, dims(cfg)
    h, kv, f = d["h"], d["kv"], d["f"]
    rep_div = tp if sp else 1
    n_norm = 4 if m.block_norm == "sandwich" else 2
    # each norm keeps its input (+ a per-token statistic): layers.RMSNorm on CPU, torch's fused CUDA and TE norms
    replicated = (n_norm + 2) * h  # norms; QKV and MLP-in inputs
    attention = 4 * d["q"] + 3 * kv  # qkv output, roped q and k, attention output (q = h unless model.head_dim)
    if m.attention == "megatron":
        attention += d["a"] * m.seq_length  # softmax probabilities [b, a, s, s]
    if moe:  # top-k copies of each token through an expert MLP, plus router logits/probs (approximate)
        per = 5 * d["f_moe"] if m.activation == "swiglu" else 2 * d["f_moe"]
        mlp = m.moe_top_k * (2 * h + per) + 2 * m.num_experts
    else:
        mlp = 5 * f if m.activation == "swiglu" else 2 * f
    return dtype_bytes * (replicated / rep_div + (attention + mlp) / tp)


def adapter_activation_bytes(cfg: Config, dtype_bytes: int, tp: int, sp: bool) -> float:
    elems = {"concat": 2, "gate": 5, "add": 0}[cfg.model.adapter] * cfg.model.hidden_size
    return dtype_bytes * elems / (tp if sp else 1)


def head_activation_bytes(cfg: Config, vocab: int, dtype_bytes: int, tp: int, sp: bool) -> float:
    """Final norm + logits of the loss (fp32 softmax kept by the vocab-parallel cross entropy)."""
    h = cfg.model.hidden_size
    logits = 4 * vocab / tp + (dtype_bytes * vocab / tp if dtype_bytes != 4 else 0)
    return dtype_bytes * h / (tp if sp else 1) + logits


def looped_pipeline_in_flight(p: int, m: int, g: int) -> tuple[list[int], int]:
    """(grad chunks holding activations per stage, micro-batches whose prelude stage 0 holds) of the looped
    schedule with g grad iterations: the schedule's own cap (`recurdepth.parallel.schedule.default_cap`), never
    more than the m·g grad chunks a step has, and two of its groups of p micro-batches (checked against
    `build_order` in the tests). The naive split is this with g = 1 (one trip through the whole core)."""
    window = BackpropWindow.of(g, g)  # the cap counts grad chunks only: no-grad trips keep nothing
    return [min(schedule.default_cap(p, s, window), m * g) for s in range(p)], min(m, 2 * p)


def stage_activations(cfg: Config, vocab: int, dtype_bytes: int, tp: int, pp: int, m: int, g: int,
                      checkpointing: bool) -> list[tuple[int, str]]:
    """(bytes, description) of the activations each pipeline stage holds at its peak."""
    mc, t = cfg.model, cfg.train
    sp = cfg.parallel.sequence_parallel and tp > 1
    tokens = t.micro_batch_size * mc.seq_length
    outer = layer_activation_bytes(cfg, dtype_bytes, tp, sp, is_moe(cfg, "outer")) * tokens
    core_layer = layer_activation_bytes(cfg, dtype_bytes, tp, sp, is_moe(cfg, "core")) * tokens
    adapter = adapter_activation_bytes(cfg, dtype_bytes, tp, sp) * tokens
    head = head_activation_bytes(cfg, vocab, dtype_bytes, tp, sp) * tokens
    state = dtype_bytes * mc.hidden_size / (tp if sp else 1) * tokens
    P, R, C = mc.prelude_layers, mc.core_layers, mc.coda_layers
    if pp == 1:
        iteration = R * core_layer + adapter
        if checkpointing:  # each grad iteration keeps its input state (+ e once); one is recomputed at a time
            kept = (g + 1) * state
            peak = max((P + C) * outer + kept + head, P * outer + kept + iteration)  # end of forward | backward
            what = f"{g} checkpointed grad iterations + 1 recomputed"
        else:
            peak, what = (P + C) * outer + g * iteration + head, f"{g} grad iterations"
        return [(int(peak), f"1 micro-batch: prelude, {what} of the core, coda, head")]
    if cfg.parallel.pipeline_split == "naive":  # stage 0 loops the whole core per trip: one trip, g grad iterations
        trips, embedded = looped_pipeline_in_flight(pp, m, 1)
        out = []
        for s in range(pp):
            if s == 0:
                b = trips[0] * g * (R * core_layer + adapter) + embedded * P * outer
                what = f"{trips[0]} micro-batches x {g} grad iterations of the whole core, {embedded} preludes"
            elif s == pp - 1:
                b, what = C * outer + head, "coda + head of 1 micro-batch"
            else:
                b, what = 0, "nothing (pass-through)"
            out.append((int(b), what))
        return out
    chunks, embedded = looped_pipeline_in_flight(pp, m, g)
    per_chunk = (R // pp) * core_layer
    out = []
    for s in range(pp):
        b = chunks[s] * (per_chunk + (adapter if s == 0 else 0))
        what = f"{chunks[s]} core chunks of {R // pp} layer(s)"
        if s == 0:
            b += embedded * (P * outer + 2 * state)  # prelude graph + the detached e and its gradient
            what += f", {embedded} micro-batches' prelude"
        if s == pp - 1:
            b += C * outer + head  # head forward and backward run back to back (op H)
            what += ", coda + head of 1 micro-batch"
        out.append((int(b), what))
    return out


# ---------------------------------------------------------------------------------------------- per stage


def optimizer_bytes_per_param(bf16: bool) -> int:
    """fp32 master copy (bf16 training only) + Adam m and v."""
    return (4 if bf16 else 0) + 8


def stage_memory(cfg: Config, vocab: int, *, dp: int, m: int, g: int, dtype_bytes: int, bf16: bool,
                 checkpointing: bool, allocator_slack: float, runtime: int) -> list[StageMemory]:
    """Every row of the memory model for one rank of each pipeline stage."""
    p = cfg.parallel
    tp, pp, ep = p.tensor, p.pipeline, p.expert
    dp_opt = dp if cfg.optimizer.distributed else 1
    edp_opt = max(1.0, dp / ep) if cfg.optimizer.distributed else 1.0
    opt_bytes = optimizer_bytes_per_param(bf16)
    params_by_stage = stage_params(cfg, vocab, tp, pp, ep)
    acts_by_stage = stage_activations(cfg, vocab, dtype_bytes, tp, pp, m, g, checkpointing)
    stages = []
    for s, ((dense, expert), (acts, what)) in enumerate(zip(params_by_stage, acts_by_stage)):
        count = dense + expert
        stages.append(StageMemory(
            stage=s, param_count=count, params=dtype_bytes * count, grads=4 * count,
            optimizer=int(opt_bytes * (dense / dp_opt + expert / edp_opt)), activations=acts,
            allocator=int(allocator_slack * acts), runtime=runtime, detail=what))
    return stages
