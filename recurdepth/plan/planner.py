"""`plan()`: the layout, the memory of every pipeline stage of one rank, the step time, and a suggestion when the
worst stage does not fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from recurdepth import precision
from recurdepth.config import Config
from recurdepth.errors import ConfigError
from recurdepth.plan.devices import DeviceSpec, capacity_of, device_spec, runtime_of
from recurdepth.plan.memory import StageMemory, stage_memory
from recurdepth.plan.report import format_plan
from recurdepth.plan.shape import grad_iterations, resolve_vocab_size, total_params
from recurdepth.plan.speed import DEFAULT_ASSUMED_MFU, Speed, estimate_speed
from recurdepth.plan.suggest import suggest_fix


@dataclass
class Plan:
    """The answer of `plan()`: layout, per-rank memory of the worst stage, step time, and a suggestion."""

    config_name: str
    device: str
    device_description: str
    nodes: int
    gpus_per_node: int
    world: int
    dp: int
    tp: int
    pp: int
    ep: int
    sequence_parallel: bool
    pipeline_split: str
    dtype: str
    micro_batch_size: int
    micro_batches: int  # per data-parallel rank per step
    global_batch_size: int
    seq_length: int
    vocab_size: int  # padded
    total_params: int
    r: float  # the configured mean (or depth) used for FLOPs
    k: int
    grad_iterations: int  # g = min(largest r the sampler can draw, k): what activations are sized for
    checkpoint_iterations: bool  # counted (at PP=1 only)
    stages: list
    worst_stage: int
    capacity: int
    fits: bool
    # speed
    model_flops_per_token: float
    hardware_flops_per_token: float
    peak_flops: float
    peak_source: str
    assumed_mfu: float
    bubble: float
    imbalance: float
    step_time: float
    tokens_per_step: int
    tokens_per_s: float
    mfu: float
    runtime_source: str
    optimizer_sharding: int = 1  # data-parallel ranks the optimizer state is sharded over
    notes: list = field(default_factory=list)
    suggestion: Optional[list] = None  # overrides that make it fit
    suggestion_plan: Optional["Plan"] = None

    @property
    def worst(self) -> StageMemory:
        """Per-rank memory of the pipeline stage that needs the most (the one that must fit)."""
        return self.stages[self.worst_stage]

    params = property(lambda self: self.worst.params)
    grads = property(lambda self: self.worst.grads)
    optimizer = property(lambda self: self.worst.optimizer)
    activations = property(lambda self: self.worst.activations)
    allocator = property(lambda self: self.worst.allocator)
    runtime = property(lambda self: self.worst.runtime)
    total = property(lambda self: self.worst.total)

    @property
    def per_rank_params(self) -> int:
        return self.stages[self.worst_stage].param_count

    @property
    def shortfall(self) -> int:
        return max(0, self.total - self.capacity)

    def format(self) -> str:
        return format_plan(self)


class Layout(NamedTuple):
    world: int
    dp: int
    micro_batches: int  # per data-parallel rank per step


def layout_of(cfg: Config, nodes: int, gpus_per_node: int) -> Layout:
    """The layout on nodes x gpus_per_node ranks; ConfigError for one that cannot run at all (`check_layout`)."""
    from recurdepth.distributed import check_layout

    world = nodes * gpus_per_node
    dp = check_layout(cfg, world)
    tp = cfg.parallel.tensor
    if tp > gpus_per_node:
        raise ConfigError(f"parallel.tensor={tp} is larger than --gpus-per-node={gpus_per_node}; tensor parallelism "
                          f"must stay within a node")
    t = cfg.train
    return Layout(world, dp, t.global_batch_size // (t.micro_batch_size * dp))


def assumed_mfu_of(assumed_mfu: Optional[float]) -> float:
    value = DEFAULT_ASSUMED_MFU if assumed_mfu is None else float(assumed_mfu)
    if not 0 < value <= 1:
        raise ConfigError(f"--assumed-mfu={assumed_mfu} must be in (0, 1]")
    return value


def plan_notes(cfg: Config, layout: Layout) -> list[str]:
    """What the plan leaves out or warns about."""
    r, p, t = cfg.recurrence, cfg.parallel, cfg.train
    notes = []
    if r.checkpoint_iterations and p.pipeline > 1:
        notes.append("recurrence.checkpoint_iterations under pipeline parallelism (each grad chunk checkpointed) "
                     "is not modelled: memory and FLOPs are counted without it (memory an upper bound)")
    if cfg.model.num_experts:
        notes.append("MoE: FLOPs count the dense MLP (recurdepth.train.flops); expert activations are approximate")
    if layout.micro_batches < p.pipeline and p.pipeline > 1:
        notes.append(f"only {layout.micro_batches} micro-batch(es) per data-parallel rank for {p.pipeline} pipeline "
                     f"stages: the ring is not full; use train.global_batch_size >= "
                     f"{p.pipeline * t.micro_batch_size * layout.dp}")
    return notes


def estimate(cfg: Config, nodes: int, gpus_per_node: int, spec: DeviceSpec, vocab_size: Optional[int],
             assumed_mfu: float, runtime_bytes: Optional[int], config_name: str = "") -> Plan:
    """The plan of `cfg` as it is (no suggestion)."""
    layout = layout_of(cfg, nodes, gpus_per_node)
    p, m, t = cfg.parallel, cfg.model, cfg.train
    vocab = resolve_vocab_size(cfg, vocab_size)
    on_gpu = spec.name != "cpu"
    bf16 = precision.uses_bf16(t.precision, on_gpu)
    checkpointing = cfg.recurrence.checkpoint_iterations and p.pipeline == 1
    runtime, runtime_source = runtime_of(spec, runtime_bytes)
    capacity = capacity_of(spec, gpus_per_node)
    g = grad_iterations(cfg)
    stages = stage_memory(cfg, vocab, dp=layout.dp, m=layout.micro_batches, g=g,
                          dtype_bytes=precision.dtype_bytes(t.precision, on_gpu), bf16=bf16,
                          checkpointing=checkpointing, allocator_slack=spec.allocator_slack, runtime=runtime)
    worst = max(range(p.pipeline), key=lambda s: stages[s].total)
    speed: Speed = estimate_speed(cfg, vocab, layout.world, layout.micro_batches, spec, checkpointing, assumed_mfu)
    return Plan(
        config_name=config_name, device=spec.name, device_description=spec.description, nodes=nodes,
        gpus_per_node=gpus_per_node, world=layout.world, dp=layout.dp, tp=p.tensor, pp=p.pipeline, ep=p.expert,
        sequence_parallel=p.sequence_parallel and p.tensor > 1, pipeline_split=p.pipeline_split,
        dtype="bf16" if bf16 else "fp32", micro_batch_size=t.micro_batch_size, micro_batches=layout.micro_batches,
        global_batch_size=t.global_batch_size, seq_length=m.seq_length, vocab_size=vocab,
        total_params=total_params(cfg, vocab), r=speed.r, k=speed.k, grad_iterations=g,
        checkpoint_iterations=checkpointing, stages=stages, worst_stage=worst, capacity=capacity,
        fits=stages[worst].total <= capacity, model_flops_per_token=speed.model_flops_per_token,
        hardware_flops_per_token=speed.hardware_flops_per_token, peak_flops=speed.peak_flops,
        peak_source=speed.peak_source, assumed_mfu=assumed_mfu, bubble=speed.bubble, imbalance=speed.imbalance,
        step_time=speed.step_time, tokens_per_step=speed.tokens_per_step, tokens_per_s=speed.tokens_per_s,
        mfu=speed.mfu, runtime_source=runtime_source,
        optimizer_sharding=layout.dp if cfg.optimizer.distributed else 1, notes=plan_notes(cfg, layout))


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu: str, vocab_size: Optional[int] = None, *,
         assumed_mfu: Optional[float] = None, runtime_bytes: Optional[int] = None, suggest: bool = True,
         config_name: str = "") -> Plan:
    """Per-rank memory, fit and estimated speed of `cfg` on `nodes` x `gpus_per_node` devices of kind `gpu`.

    Raises ConfigError for a layout that cannot run at all (`check_layout`). `runtime_bytes` overrides the
    framework/runtime term (on CPU it is otherwise measured once per process in a subprocess). `vocab_size` is
    the tokenizer's vocabulary size, given instead of reading data.tokenizer (`resolve_vocab_size`)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    spec = device_spec(gpu)
    mfu = assumed_mfu_of(assumed_mfu)
    result = estimate(cfg, nodes, gpus_per_node, spec, vocab_size, mfu, runtime_bytes, config_name)
    if suggest and not result.fits:
        runtime = result.runtime  # measured once: the alternatives are planned under the same assumptions
        found = suggest_fix(cfg, result.world, gpus_per_node,
                            lambda alt: estimate(alt, nodes, gpus_per_node, spec, vocab_size, mfu, runtime))
        if found is not None:
            result.suggestion, result.suggestion_plan = found
    return result
