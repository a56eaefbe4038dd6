"""`recurdepth plan CONFIG --nodes N --gpus-per-node G --gpu h100`: will this run fit, and how fast is it?

Without any accelerator: validates the layout (`check_layout`), then models, per rank, the memory of a
training step and an estimated step time / MFU, for any cluster size (a 3.5B looped model on 4096 GPUs
plans in milliseconds). When the worst rank does not fit it says by how much and suggests the first
change (as `section.key=value` overrides) that does, found by re-planning the alternatives.

Memory per rank (bytes; Φ = parameters held by the rank, after TP/PP/EP sharding; d = bytes of the
training dtype: 2 for bf16, 4 for fp32):
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
                 recurrence.checkpoint_iterations (PP=1 only: the pipeline schedule does not checkpoint)
                 each grad iteration keeps its input state (h) and one iteration is recomputed at a time.
                 Pipeline (looped split): stage s holds up to p·g − s core chunks (R/p layers + adapter
                 on stage 0) and stage 0 the prelude of up to min(m, 2p) micro-batches (the
                 schedule's cap; `recurdepth.parallel.pipeline.default_cap`).
    allocator    slack of the memory allocator on top of the activations: PyTorch's CUDA caching
                 allocator (assumed 10%) or, on CPU, glibc malloc keeping freed activation blocks
                 resident (80%, calibrated against `recurdepth bench memory`; see docs/operations.md)
    framework/   what the process holds before the model exists: on GPU the CUDA context, cuBLAS
    runtime      workspaces and NCCL buffers (assumed 2 GiB); on CPU the resident size of a process
                 that imported torch, megatron-core and recurdepth's trainer and built the process
                 groups, measured once in a subprocess (fallback: the constant measured here)

Step time: tokens per step × hardware FLOPs per token (`recurdepth.train.flops`, r = the configured
mean/depth, recompute included) / (world × peak × assumed achievable MFU, default 40%), times the
pipeline's stage imbalance and bubble (3(p−1)/(m(r+2g)) for the looped split). Communication is not
modelled. MFU = model FLOPs (no recompute) / (step time × world × peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from recurdepth.config import Config, _parse_override, _set_dotted, config_from_dict, load_config
from recurdepth.errors import ConfigError

# torch / megatron-core are imported inside the functions that need them, so that building the CLI's parser
# (`add_plan_parser`) stays cheap.

GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class DeviceSpec:
    """What `plan` assumes about one accelerator (or a CPU process)."""

    name: str
    memory_bytes: Optional[int]  # None = this machine's RAM (cpu), shared by the processes of a node
    peak_flops: Optional[float]  # dense bf16 datasheet peak; None = measured torch.mm peak (cpu)
    runtime_bytes: Optional[int]  # None = measured (cpu)
    allocator_slack: float  # fraction of the activations
    description: str


# Capacities are what the CUDA driver reports as total memory for the card (an "80 GB" H100 shows ~79 GiB).
DEVICES = {
    "h100": DeviceSpec("h100", int(79.1 * GiB), 989e12, 2 * GiB, 0.10, "H100 SXM 80 GB, 989 TFLOP/s bf16"),
    "h200": DeviceSpec("h200", int(139.8 * GiB), 989e12, 2 * GiB, 0.10, "H200 141 GB, 989 TFLOP/s bf16"),
    "a100": DeviceSpec("a100", int(79.2 * GiB), 312e12, 2 * GiB, 0.10, "A100 80 GB, 312 TFLOP/s bf16"),
    "cpu": DeviceSpec("cpu", None, None, None, 0.80, "CPU process (this machine's RAM, measured torch.mm peak)"),
}
DEFAULT_ASSUMED_MFU = 0.40
# Resident size of a fresh training process on CPU (torch 2.13.0+cpu, megatron-core 0.16.1, process groups
# built), measured on the 2-core development VM; used only when the measuring subprocess fails.
CPU_RUNTIME_FALLBACK_BYTES = 368 * MiB
MAX_SUGGESTION_CHANGES = 3


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
    checkpoint_iterations: bool  # effective (PP=1 only)
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


# ---------------------------------------------------------------------------------------------- model


def resolve_vocab_size(cfg: Config, vocab_size: Optional[int] = None) -> int:
    """Unpadded vocabulary: the argument, else model.vocab_size, else the configured tokenizer's."""
    if vocab_size is not None:
        return int(vocab_size)
    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size)
    from recurdepth.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model).vocab_size
    except Exception as exc:  # noqa: BLE001 - a missing/unreadable tokenizer model
        raise ConfigError(f"cannot read the vocabulary size of data.tokenizer={cfg.data.tokenizer} ({exc}); set "
                          f"model.vocab_size or pass --vocab-size") from None


def max_recurrence(cfg: Config) -> float:
    """The largest r the sampler can draw (inf when unbounded)."""
    r = cfg.recurrence
    top = {"fixed": r.depth, "uniform": r.high}.get(r.sampler, math.inf)
    return min(top, r.max_depth) if r.max_depth is not None else top


def mean_recurrence(cfg: Config) -> float:
    """r used for FLOPs: the configured mean (lognormal_poisson, curriculum), depth (fixed) or (low+high)/2."""
    r = cfg.recurrence
    value = r.depth if r.sampler == "fixed" else (r.low + r.high) / 2 if r.sampler == "uniform" else r.mean
    return min(value, r.max_depth) if r.max_depth is not None else value


def _dims(cfg: Config) -> dict:
    from recurdepth.model.layers import default_ffn_hidden_size

    m = cfg.model
    h = m.hidden_size
    head_dim = h // m.num_heads
    f = m.ffn_hidden_size or default_ffn_hidden_size(h, m.activation)
    return dict(h=h, kv=(m.num_query_groups or m.num_heads) * head_dim, f=f, a=m.num_heads,
                f_moe=m.moe_ffn_hidden_size or f, norm=2 if m.normalization == "LayerNorm" else 1)


def layer_params(cfg: Config, tp: int, ep: int, moe: bool) -> tuple[int, int]:
    """(dense, expert) parameters of one transformer block on one rank (TP-sharded; experts E/EP per rank)."""
    m, d = cfg.model, _dims(cfg)
    h, kv, f = d["h"], d["kv"], d["f"]
    norms = (4 if m.block_norm == "sandwich" else 2) * d["norm"] * h
    attention = h * (h + 2 * kv) // tp + h * h // tp
    mlp_per = (3 if m.activation == "swiglu" else 2) * h
    if not moe:
        return norms + attention + mlp_per * f // tp, 0
    router = m.num_experts * h
    experts = (m.num_experts // ep) * (mlp_per * d["f_moe"] // tp)
    return norms + attention + router, experts


def _moe(cfg: Config, block: str) -> bool:
    return bool(cfg.model.num_experts) and (block == "core" or cfg.model.moe_layers == "all")


def stage_params(cfg: Config, vocab: int, tp: int, pp: int, ep: int) -> list[tuple[int, int]]:
    """(dense, expert) parameters held by one rank of each pipeline stage."""
    m, d = cfg.model, _dims(cfg)
    h = d["h"]
    per_stage_core = m.core_layers // pp
    naive = cfg.parallel.pipeline_split == "naive" and pp > 1
    out = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        core_here = (m.core_layers if first else 0) if naive else per_stage_core
        dense = expert = 0
        for count, block in ((m.prelude_layers if first else 0, "outer"), (core_here, "core"),
                             (m.coda_layers if last else 0, "outer")):
            dl, el = layer_params(cfg, tp, ep, _moe(cfg, block))
            dense, expert = dense + count * dl, expert + count * el
        if first:
            dense += vocab * h // tp  # word embeddings (vocab-parallel); rope has no parameters
            dense += 2 * h * h if m.adapter in ("concat", "gate") else 0
        if last:
            dense += d["norm"] * h  # final norm
            if not m.tie_embeddings or pp > 1:  # untied head, or the last stage's copy of tied embeddings
                dense += vocab * h // tp
        out.append((dense, expert))
    return out


def total_params(cfg: Config, vocab: int) -> int:
    """Parameters of the whole model (unsharded, tied embeddings once)."""
    return sum(stage_params(dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, pipeline=1)),
                            vocab, 1, 1, 1)[0])


def layer_activation_bytes(cfg: Config, dtype_bytes: int, tp: int, sp: bool, moe: bool) -> float:
    """Bytes one transformer block keeps for backward, per token of a micro-batch (see module docstring)."""
    m, d = cfg.model, _dims(cfg)
    h, kv, f = d["h"], d["kv"], d["f"]
    rep_div = tp if sp else 1
    n_norm = 4 if m.block_norm == "sandwich" else 2
    # each norm keeps its input (+ a per-token statistic): layers.RMSNorm on CPU, torch's fused CUDA and TE norms
    replicated = (n_norm + 2) * h  # norms; QKV and MLP-in inputs
    attention = 4 * h + 3 * kv  # qkv output, roped q and k, attention output
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
    schedule: its cap p·g − s per stage (never more than the m·g chunks a step has) and up to 2p embedded
    micro-batches (checked against `build_order` in the tests)."""
    return [min(max(1, p * g - s), m * g) for s in range(p)], min(m, 2 * p)


def stage_activations(cfg: Config, vocab: int, dtype_bytes: int, tp: int, pp: int, m: int, g: int,
                      checkpointing: bool) -> list[tuple[int, str]]:
    """(bytes, description) of the activations each pipeline stage holds at its peak."""
    mc, t = cfg.model, cfg.train
    sp = cfg.parallel.sequence_parallel and tp > 1
    tokens = t.micro_batch_size * mc.seq_length
    outer = layer_activation_bytes(cfg, dtype_bytes, tp, sp, _moe(cfg, "outer")) * tokens
    core_layer = layer_activation_bytes(cfg, dtype_bytes, tp, sp, _moe(cfg, "core")) * tokens
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
    out = []
    if cfg.parallel.pipeline_split == "naive":  # stage 0 loops the whole core per trip, cap p trips
        trips, embedded = min(pp, m), min(m, 2 * pp)
        for s in range(pp):
            if s == 0:
                b = trips * g * (R * core_layer + adapter) + embedded * P * outer
                what = f"{trips} micro-batches x {g} grad iterations of the whole core, {embedded} preludes"
            elif s == pp - 1:
                b, what = C * outer + head, "coda + head of 1 micro-batch"
            else:
                b, what = 0, "nothing (pass-through)"
            out.append((int(b), what))
        return out
    chunks, embedded = looped_pipeline_in_flight(pp, m, g)
    per_chunk = (R // pp) * core_layer
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


# ---------------------------------------------------------------------------------------------- devices


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
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=env)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RSS ")]
        if out.returncode == 0 and lines:
            return int(lines[-1].split()[1]), "measured: a fresh process with torch + megatron-core + process groups"
    except (OSError, subprocess.SubprocessError):
        pass
    return CPU_RUNTIME_FALLBACK_BYTES, "fallback constant (measuring subprocess failed)"


def _cpu_memory_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.lru_cache(maxsize=1)
def _cpu_peak_flops() -> float:
    from recurdepth.train.flops import measure_matmul_peak

    return measure_matmul_peak()


def device_spec(gpu: str) -> DeviceSpec:
    key = gpu.lower()
    if key not in DEVICES:
        raise ConfigError(f"--gpu={gpu!r} is not a known device; use one of {', '.join(DEVICES)}")
    return DEVICES[key]


# ---------------------------------------------------------------------------------------------- plan


def plan(cfg: Config, nodes: int, gpus_per_node: int, gpu: str, vocab_size: Optional[int] = None, *,
         assumed_mfu: Optional[float] = None, runtime_bytes: Optional[int] = None, suggest: bool = True,
         config_name: str = "") -> Plan:
    """Per-rank memory, fit and estimated speed of `cfg` on `nodes` x `gpus_per_node` devices of kind `gpu`.

    Raises ConfigError for a layout that cannot run at all (`check_layout`). `runtime_bytes` overrides the
    framework/runtime term (on CPU it is otherwise measured once per process in a subprocess)."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes={nodes} and --gpus-per-node={gpus_per_node} must both be >= 1")
    spec = device_spec(gpu)
    mfu_assumed = DEFAULT_ASSUMED_MFU if assumed_mfu is None else float(assumed_mfu)
    if not 0 < mfu_assumed <= 1:
        raise ConfigError(f"--assumed-mfu={assumed_mfu} must be in (0, 1]")
    from recurdepth.distributed import check_layout

    world = nodes * gpus_per_node
    dp = check_layout(cfg, world)
    p, m_cfg, t, r_cfg = cfg.parallel, cfg.model, cfg.train, cfg.recurrence
    tp, pp, ep = p.tensor, p.pipeline, p.expert
    if tp > gpus_per_node:
        raise ConfigError(f"parallel.tensor={tp} is larger than --gpus-per-node={gpus_per_node}; tensor parallelism "
                          f"must stay within a node")
    from recurdepth.model.build import padded_vocab_size

    vocab = padded_vocab_size(resolve_vocab_size(cfg, vocab_size), m_cfg.make_vocab_size_divisible_by)
    on_cpu = spec.name == "cpu"
    bf16 = t.precision == "bf16" or (t.precision == "auto" and not on_cpu)
    d = 2 if bf16 else 4
    micro_batches = t.global_batch_size // (t.micro_batch_size * dp)
    g = int(min(max_recurrence(cfg), r_cfg.backprop_depth))
    checkpointing = r_cfg.checkpoint_iterations and pp == 1
    notes = []
    if r_cfg.checkpoint_iterations and pp > 1:
        notes.append("recurrence.checkpoint_iterations has no effect under pipeline parallelism (the looped "
                     "schedule does not checkpoint its chunks); not counted")

    # ---- memory
    if runtime_bytes is not None:
        runtime, runtime_source = int(runtime_bytes), "given"
    elif spec.runtime_bytes is not None:
        runtime, runtime_source = spec.runtime_bytes, "assumed: CUDA context + cuBLAS workspaces + NCCL buffers"
    else:
        runtime, runtime_source = measure_cpu_runtime_bytes()
    capacity = spec.memory_bytes if spec.memory_bytes is not None else _cpu_memory_bytes() // gpus_per_node
    dp_opt = dp if cfg.optimizer.distributed else 1
    edp_opt = max(1.0, dp / ep) if cfg.optimizer.distributed else 1.0
    opt_bytes = (4 if bf16 else 0) + 8
    params_by_stage = stage_params(cfg, vocab, tp, pp, ep)
    acts_by_stage = stage_activations(cfg, vocab, d, tp, pp, micro_batches, g, checkpointing)
    stages = []
    for s, ((dense, expert), (acts, what)) in enumerate(zip(params_by_stage, acts_by_stage)):
        count = dense + expert
        stages.append(StageMemory(
            stage=s, param_count=count, params=d * count, grads=4 * count,
            optimizer=int(opt_bytes * (dense / dp_opt + expert / edp_opt)), activations=acts,
            allocator=int(spec.allocator_slack * acts), runtime=runtime, detail=what))
    worst = max(range(pp), key=lambda s: stages[s].total)
    w = stages[worst]

    # ---- speed
    from recurdepth.train.flops import looped_flops

    fl = looped_flops(cfg, vocab)
    r_mean = mean_recurrence(cfg)
    k = r_cfg.backprop_depth
    model_fpt = fl.per_token(r_mean, k)
    hw_fpt = fl.per_token(r_mean, k, recompute=checkpointing)
    if cfg.logging.peak_tflops:
        peak, peak_source = cfg.logging.peak_tflops * 1e12, "logging.peak_tflops"
    elif spec.peak_flops is not None:
        peak, peak_source = spec.peak_flops, "datasheet dense bf16"
    else:
        peak, peak_source = _cpu_peak_flops(), "measured fp32 torch.mm on this machine"
    tokens = t.global_batch_size * m_cfg.seq_length
    imbalance, bubble = 1.0, 0.0
    if pp > 1:
        g_mean = min(r_mean, k)
        passes = r_mean + 2 * g_mean
        layer = (fl.core - (4 * m_cfg.hidden_size**2 if m_cfg.adapter in ("concat", "gate") else 0)) / m_cfg.core_layers
        adapter_f = fl.core - layer * m_cfg.core_layers
        per_stage = []
        naive = p.pipeline_split == "naive"
        for s in range(pp):
            core_layers_here = (m_cfg.core_layers if s == 0 else 0) if naive else m_cfg.core_layers // pp
            f = passes * layer * core_layers_here
            if s == 0:
                f += 3 * fl.prelude + passes * adapter_f
            if s == pp - 1:
                f += 3 * (fl.coda + fl.head)
            per_stage.append(f)
        imbalance = pp * max(per_stage) / sum(per_stage)
        bubble = (pp - 1) / micro_batches if naive else 3 * (pp - 1) / (micro_batches * passes)
    step_time = tokens * hw_fpt / (world * peak * mfu_assumed) * imbalance * (1 + bubble)
    mfu = tokens * model_fpt / (step_time * world * peak)
    if m_cfg.num_experts:
        notes.append("MoE: FLOPs count the dense MLP (recurdepth.train.flops); expert activations are approximate")
    if micro_batches < pp and pp > 1:
        notes.append(f"only {micro_batches} micro-batch(es) per data-parallel rank for {pp} pipeline stages: the ring "
                     f"is not full; use train.global_batch_size >= {pp * t.micro_batch_size * dp}")

    result = Plan(
        config_name=config_name, device=spec.name, device_description=spec.description, nodes=nodes,
        gpus_per_node=gpus_per_node, world=world, dp=dp, tp=tp, pp=pp, ep=ep,
        sequence_parallel=p.sequence_parallel and tp > 1, pipeline_split=p.pipeline_split,
        dtype="bf16" if bf16 else "fp32", micro_batch_size=t.micro_batch_size, micro_batches=micro_batches,
        global_batch_size=t.global_batch_size, seq_length=m_cfg.seq_length, vocab_size=vocab,
        total_params=total_params(cfg, vocab), r=r_mean, k=k, grad_iterations=g, checkpoint_iterations=checkpointing,
        stages=stages, worst_stage=worst, capacity=capacity,
        fits=w.total <= capacity, model_flops_per_token=model_fpt, hardware_flops_per_token=hw_fpt, peak_flops=peak,
        peak_source=peak_source, assumed_mfu=mfu_assumed, bubble=bubble, imbalance=imbalance, step_time=step_time,
        tokens_per_step=tokens, tokens_per_s=tokens / step_time, mfu=mfu, runtime_source=runtime_source,
        optimizer_sharding=dp_opt, notes=notes)
    if suggest and not result.fits:
        found = suggest_fix(cfg, nodes, gpus_per_node, gpu, vocab_size=vocab_size, assumed_mfu=assumed_mfu,
                            runtime_bytes=runtime)
        if found is not None:
            result.suggestion, result.suggestion_plan = found
    return result


# ---------------------------------------------------------------------------------------------- suggestions


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new validated Config: `cfg` with `section.key=value` overrides applied (as on the command line)."""
    raw = cfg.to_dict()
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]


def candidate_moves(cfg: Config, world: int, gpus_per_node: int) -> list[list[list[str]]]:
    """Memory-saving knobs, each a list of alternative override sets (most preferred first)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dp = world // (p.tensor * p.pipeline)
    knobs = []
    if not cfg.optimizer.distributed and dp > 1:
        knobs.append([["optimizer.distributed=true"]])
    if not cfg.recurrence.checkpoint_iterations:
        knobs.append([["recurrence.checkpoint_iterations=true"]])
    smaller = [b for b in sorted(_divisors(t.micro_batch_size), reverse=True) if b < t.micro_batch_size]
    if smaller:
        knobs.append([[f"train.micro_batch_size={b}"] for b in smaller])
    groups = m.num_query_groups or m.num_heads
    tps = [x for x in range(p.tensor + 1, gpus_per_node + 1) if x % p.tensor == 0 and gpus_per_node % x == 0
           and m.num_heads % x == 0 and groups % x == 0]
    if tps:
        knobs.append([[f"parallel.tensor={x}", "parallel.sequence_parallel=true"] for x in tps])
    elif p.tensor > 1 and not p.sequence_parallel:
        knobs.append([["parallel.sequence_parallel=true"]])
    pps = [x for x in range(p.pipeline + 1, m.core_layers + 1) if x % p.pipeline == 0 and m.core_layers % x == 0]
    if pps:
        knobs.append([[f"parallel.pipeline={x}"] for x in pps])
    if m.num_experts:
        eps = [x for x in range(p.expert + 1, m.num_experts + 1) if x % p.expert == 0 and m.num_experts % x == 0]
        if eps:
            knobs.append([[f"parallel.expert={x}"] for x in eps])
    return knobs


def suggest_fix(cfg: Config, nodes: int, gpus_per_node: int, gpu: str, **kwargs) -> Optional[tuple[list, Plan]]:
    """The fewest changes (up to MAX_SUGGESTION_CHANGES knobs) that make the plan fit; among those, the fastest.
    Returns (overrides, plan with them) or None."""
    knobs = candidate_moves(cfg, nodes * gpus_per_node, gpus_per_node)
    for size in range(1, MAX_SUGGESTION_CHANGES + 1):
        best = None
        for chosen in itertools.combinations(knobs, size):
            for values in itertools.product(*chosen):
                overrides = [o for v in values for o in v]
                try:
                    alt_cfg = apply_overrides(cfg, overrides)
                    alt = plan(alt_cfg, nodes, gpus_per_node, gpu, suggest=False, **kwargs)
                except ConfigError:
                    continue
                if alt.fits and (best is None or alt.tokens_per_s > best[1].tokens_per_s):
                    best = (overrides, alt)
        if best is not None:
            return best
    return None


# ---------------------------------------------------------------------------------------------- output


def _gib(b: float) -> str:
    return f"{b / GiB:9.3f}"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _duration(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_plan(pl: Plan) -> str:
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


# ---------------------------------------------------------------------------------------------- CLI


def add_plan_parser(verbs) -> None:
    """`recurdepth plan CONFIG [overrides] --nodes N --gpus-per-node G --gpu h100 [--strict]`."""
    p = verbs.add_parser("plan", help="per-rank memory, fit and estimated step time of a config on a cluster, "
                                      "without GPUs: recurdepth plan CONFIG --nodes N --gpus-per-node G --gpu h100")
    p.add_argument("config", help="YAML config, e.g. configs/huginn-3.5b.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.pipeline=2")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="devices (processes) per node (default 8; 1 with --gpu cpu)")
    p.add_argument("--gpu", default="h100", type=str.lower, choices=sorted(DEVICES),
                   help="device kind (default h100); cpu = this machine's RAM and measured matmul peak")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary size (default: model.vocab_size, else the configured tokenizer's)")
    p.add_argument("--assumed-mfu", type=float, default=None,
                   help=f"achievable fraction of the peak FLOP/s for the step time (default {DEFAULT_ASSUMED_MFU})")
    p.add_argument("--strict", action="store_true", help="exit 3 when the plan does not fit")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (1 if args.gpu == "cpu" else 8)
    result = plan(cfg, args.nodes, gpus, args.gpu, vocab_size=args.vocab_size, assumed_mfu=args.assumed_mfu,
                  config_name=str(args.config))
    print(result.format(), flush=True)
    return 3 if args.strict and not result.fits else 0
