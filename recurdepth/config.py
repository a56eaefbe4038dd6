"""Typed run configuration: YAML file + dotted command-line overrides -> validated `Config`.

Every section is a dataclass; unknown keys are rejected with the closest valid key suggested, values
are checked against the field types, and cross-field constraints are checked in `Config.validate`.
The resolved config is written into the run directory and into every checkpoint (`to_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from recurdepth.errors import ConfigError
from recurdepth.objectives.base import ObjectiveSection


@dataclass
class ModelConfig:
    """Shape of the looped model: embedding -> prelude -> core x r -> coda -> head."""

    hidden_size: int = 256
    num_heads: int = 4
    num_query_groups: Optional[int] = None  # grouped-query attention; None = num_heads
    head_dim: Optional[int] = None  # per-head width; None = hidden_size / num_heads (Qwen3 sets its own)
    ffn_hidden_size: Optional[int] = None  # None = 4h (gelu) or 8h/3 rounded to 64 (swiglu)
    kind: Literal["looped", "dense"] = "looped"  # dense: megatron-core's GPTModel, the baseline `recurdepth compare` needs
    num_layers: Optional[int] = None  # kind=dense only: its layers; None = P + round(mean r) R + C (dense equivalent)
    prelude_layers: int = 1
    core_layers: int = 2
    coda_layers: int = 1
    seq_length: int = 256
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int = 128  # padded vocab is layout-independent (must divide by TP)
    adapter: Literal["concat", "add", "gate"] = "concat"
    block_norm: Literal["sandwich", "pre"] = "sandwich"
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_eps: float = 1e-6
    activation: Literal["swiglu", "gelu"] = "swiglu"
    attention: Literal["sdpa", "megatron"] = "sdpa"  # core attention kernel of the local spec
    spec: Literal["auto", "local", "te"] = "auto"  # megatron layer spec; auto = TransformerEngine on GPU if installed
    tie_embeddings: bool = True
    embedding_scale: float = 1.0  # Huginn uses sqrt(hidden_size)
    norm_before_coda: bool = False  # Huginn: the final norm (same weights) also normalises s_r before the coda
    init_std: Optional[float] = None  # None = sqrt(2 / (5 h)) (small init, as Huginn)
    depth_scaled_init: bool = True  # output projections / sqrt(2 * effective depth)
    initial_state: Literal["trunc_normal", "zeros"] = "trunc_normal"
    initial_state_std: Optional[float] = None  # None = init_std; the state is also scaled by embedding_scale
    rotary_base: float = 10000.0
    # RoPE frequency scaling as Hugging Face names it (imported Llama 3.x / long-context models): none, linear
    # (all frequencies / factor) or llama3 (low frequencies / factor, high kept, a smooth ramp between)
    rope_scaling: Literal["none", "linear", "llama3"] = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 8192  # llama3 only: the context the unscaled frequencies were trained for
    # a bias on the attention's input projection: none, qkv (Qwen2) or qk (Huginn: queries and keys only, the
    # value part held at zero through training)
    qkv_bias: Literal["none", "qkv", "qk"] = "none"
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before RoPE (Qwen3; megatron's qk_layernorm)
    num_experts: Optional[int] = None  # MoE feed-forward (megatron MoELayer) with this many experts; None = dense
    moe_layers: Literal["core", "all"] = "core"  # which blocks get experts
    moe_top_k: int = 2
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    moe_aux_loss_coeff: float = 1e-2  # router load-balancing loss weight
    moe_ffn_hidden_size: Optional[int] = None  # None = ffn_hidden_size

    @property
    def head_width(self) -> int:
        """The per-head width of queries, keys and values: model.head_dim, else hidden_size / num_heads."""
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class RecurrenceConfig:
    """How many times the core runs (sampled per optimizer step) and how far back gradients flow."""

    sampler: Literal["lognormal_poisson", "fixed", "uniform", "curriculum"] = "lognormal_poisson"
    mean: float = 4.0  # lognormal_poisson / curriculum: mean recurrence
    sigma: float = 0.5  # lognormal_poisson / curriculum: log-normal spread
    depth: int = 4  # fixed
    low: int = 1  # uniform: inclusive bounds
    high: int = 8
    curriculum_start: float = 1.0  # curriculum: mean at step 0, ramped to `mean`
    curriculum_steps: int = 0
    curriculum_shape: Literal["linear", "sqrt"] = "linear"
    max_depth: Optional[int] = None  # cap on sampled r; None = uncapped
    backprop_depth: int = 4  # k: gradients flow through the last min(r, k) iterations
    checkpoint_iterations: bool = False  # activation checkpointing of each grad iteration
    eval_depth: Optional[int] = None  # r for validation; None = round(mean) or depth


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallel is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    sequence_parallel: bool = False
    # looped: the core's layers split over stages, one iteration per trip around the ring (recurdepth's schedule);
    # naive: the whole core on the first stage, all r iterations in one trip (a baseline for comparisons)
    pipeline_split: Literal["looped", "naive"] = "looped"
    record_timeline: bool = False  # keep the pipeline schedule's timeline of every step (costs one gather per step)
    # multi-pass objectives (quiet_star, coconut) under PP: micro-batches interleaved over the stages at once, their
    # activations all held until their backward; 0 = the whole step's (least bubble), 1 = one after another
    multi_pass_in_flight: int = 0


@dataclass
class DataConfig:
    """Training data: a weighted blend of sources, each one of
    `{builtin: stdlib-docs}` (offline corpus harvested from Python's standard library),
    `{path: PREFIX}` (a megatron indexed dataset written by `recurdepth data preprocess`), or
    `{procedural: TASK, n: N, difficulty: {...}}` (verified generated tasks, answer-only loss; `pad: true`
    pads each sample to the sequence length so no window cuts one in two), with an optional `weight` (default 1)."""

    sources: list = field(default_factory=lambda: [{"builtin": "stdlib-docs"}])
    # a data schedule: [{from_step: N, sources: [...]}, ...]; from optimizer step N on, training reads that
    # blend instead (a retrofit's corpus phase, then corpus + procedural mix); validation stays on `sources`
    phases: list = field(default_factory=list)
    tokenizer: Literal["byte", "sentencepiece", "hf"] = "byte"
    tokenizer_model: Optional[str] = None  # sentencepiece: the .model file; hf: the tokenizer.json or its folder
    builtin_max_mb: float = 4.0  # how much stdlib text to harvest for the builtin corpus
    cache_dir: str = "data/prepared"  # prepared corpora and index caches (data/README.md); relative to the cwd
    split: str = "98,2,0"  # train, validation, test documents per 100


SOURCE_KEYS = {"builtin", "path", "procedural", "weight", "n", "difficulty", "seed", "pad"}


@dataclass
class OptimizerConfig:
    """AdamW through megatron-core's (distributed) optimizer, with warmup then a decay schedule."""

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    schedule: Literal["cosine", "constant", "wsd", "linear"] = "cosine"
    decay_steps: Optional[int] = None  # None = train.steps
    wsd_decay_steps: Optional[int] = None  # wsd: length of the final decay; None = 20% of decay_steps
    distributed: bool = True  # shard optimizer state over data-parallel ranks


@dataclass
class TrainConfig:
    """The optimisation loop."""

    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 4
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    run_dir: str = "runs/default"
    eval_interval: int = 0  # 0 = no periodic validation
    eval_batches: int = 2
    overlap_grad_reduce: bool = False
    compile: bool = False  # torch.compile each transformer block (inductor); the loop itself stays eager
    engine: Literal["megatron", "deepspeed"] = "megatron"  # megatron: DDP + distributed optimizer; deepspeed: ZeRO
    exit_after_minutes: Optional[float] = None  # time budget: checkpoint and exit 0 once it is spent
    on_bad_step: Literal["halt", "skip", "rollback"] = "halt"  # non-finite loss/gradient or a loss spike
    spike_sigma: float = 0.0  # a loss above mean + sigma * std of the last spike_window steps is bad; 0 = off
    spike_window: int = 50
    # these signals stop gracefully: checkpoint after the current step, exit 0 (operations.md); [] = none
    stop_signals: list = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])


@dataclass
class CheckpointConfig:
    """megatron-core dist_checkpointing, written atomically (tmp dir, rename, then `latest`)."""

    dir: Optional[str] = None  # None = <run_dir>/checkpoints
    interval: int = 50  # steps between saves; 0 = only at the end
    save_final: bool = True
    # auto = resume from latest if one exists; never = start afresh, refused where checkpoints exist;
    # fresh = move existing checkpoints aside (checkpoints/archive/<time>/) and start afresh
    resume: Literal["auto", "never", "required", "fresh"] = "auto"
    keep_last: int = 0  # 0 = keep all; otherwise keep the newest N of latest's lineage ...
    keep_every: int = 0  # ... plus every checkpoint whose step is a multiple of this, permanently
    verify: bool = True  # check every file's sha256 (written at save) before loading; --no-verify skips it
    allow_changes: list = field(default_factory=list)  # model/objective keys resume may change, e.g. [model.rotary_base]
    # a checkpoint (step_* dir, checkpoints folder or run dir) whose model weights start a fresh run: no optimizer
    # state, step 0; tensors it lacks (an objective's new modules) keep their initialisation. Ignored on resume.
    init_from: Optional[str] = None


@dataclass
class LoggingConfig:
    """Progress line, metrics file and TensorBoard."""

    log_interval: int = 10
    tensorboard: bool = True
    health_interval: int = 50  # recurrence-health metrics every N steps; 0 = never
    peak_tflops: Optional[float] = None  # None = measured torch.mm peak on CPU, datasheet bf16 on GPU


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (`train.engine: deepspeed`): ZeRO data parallelism; this section maps onto the
    DeepSpeed config written into the run directory (`deepspeed_config.json`)."""

    zero_stage: Literal[1, 2, 3] = 1
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters on the CPU between uses
    reduce_bucket_size: int = 50_000_000  # elements per gradient-reduction bucket
    overlap_comm: bool = False  # overlap gradient reduction with backward
    contiguous_gradients: bool = True


SECTIONS = {
    "model": ModelConfig,
    "recurrence": RecurrenceConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "objective": ObjectiveSection,
    "deepspeed": DeepSpeedConfig,
}


@dataclass
class Config:
    """The whole run: one dataclass per section (see SECTIONS)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)  # its class is the kind's (registry)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.train.run_dir) / "checkpoints"

    def _validate_kind(self) -> None:
        """model.kind=dense trains megatron's GPTModel with the same data, tokenizer, optimizer and engines; what
        only a looped model has is refused, not ignored."""
        m = self.model
        if m.kind == "looped":
            _require(m.num_layers is None, "model.num_layers", m.num_layers,
                     "it sizes model.kind=dense only; a looped model's depth is prelude/core/coda_layers and r")
            return
        _require(m.num_layers is None or m.num_layers >= 1, "model.num_layers", m.num_layers, "use 1 or more")
        for ok, key, value, why in (
                (self.parallel.pipeline == 1, "parallel.pipeline", self.parallel.pipeline,
                 "model.kind=dense runs without pipeline parallelism (the recurrence-aware schedule drives looped "
                 "stages); use parallel.pipeline=1"),
                (self.objective.kind == "lm", "objective.kind", self.objective.kind,
                 "model.kind=dense trains the plain LM objective; the other objectives need the looped model (model.kind=looped)"),
                (m.num_experts is None, "model.num_experts", m.num_experts,
                 "model.kind=dense builds dense MLPs; use null or model.kind=looped"),
                (not self.recurrence.checkpoint_iterations, "recurrence.checkpoint_iterations", True,
                 "model.kind=dense has no iterations to checkpoint; set it false")):
            _require(ok, key, value, why)

    def validate(self) -> "Config":
        """Cross-field constraints that need no process group; layout checks against the world size
        live in `recurdepth.distributed.check_layout`."""
        m, r, t, p = self.model, self.recurrence, self.train, self.parallel
        _require(m.hidden_size >= 1, "model.hidden_size", m.hidden_size, "use a positive size")
        self._validate_kind()
        _require(m.core_layers >= 1, "model.core_layers", m.core_layers, "a looped model needs at least 1 core layer")
        for name in ("prelude_layers", "coda_layers"):
            _require(getattr(m, name) >= 0, f"model.{name}", getattr(m, name), "use 0 or more")
        if m.head_dim is None:
            _require(m.num_heads >= 1 and m.hidden_size % m.num_heads == 0, "model.num_heads", m.num_heads,
                     f"use a divisor of model.hidden_size={m.hidden_size}, or set model.head_dim")
        else:
            _require(m.num_heads >= 1, "model.num_heads", m.num_heads, "use 1 or more heads")
            _require(m.head_dim >= 2 and m.head_dim % 2 == 0, "model.head_dim", m.head_dim,
                     "use an even width >= 2 (RoPE rotates pairs) or null (= hidden_size / num_heads)")
        if m.num_query_groups is not None:
            _require(m.num_query_groups >= 1 and m.num_heads % m.num_query_groups == 0, "model.num_query_groups",
                     m.num_query_groups, f"use a divisor of model.num_heads={m.num_heads}")
        _require(m.seq_length >= 2, "model.seq_length", m.seq_length, "use at least 2")
        if m.rope_scaling != "none":
            _require(m.rope_scaling_factor >= 1, "model.rope_scaling_factor", m.rope_scaling_factor,
                     "use a factor >= 1 (1 = unscaled)")
        if m.rope_scaling == "llama3":
            _require(0 < m.rope_low_freq_factor < m.rope_high_freq_factor, "model.rope_low_freq_factor",
                     m.rope_low_freq_factor, f"use 0 < low < model.rope_high_freq_factor={m.rope_high_freq_factor}")
            _require(m.rope_original_max_positions >= 1, "model.rope_original_max_positions",
                     m.rope_original_max_positions, "use the context length the unscaled RoPE was trained for")
        if m.num_experts is not None:
            _require(m.num_experts >= 1, "model.num_experts", m.num_experts, "use >= 1 experts or null for a dense MLP")
            _require(1 <= m.moe_top_k <= m.num_experts, "model.moe_top_k", m.moe_top_k,
                     f"use 1 <= top_k <= num_experts={m.num_experts}")
            if p.tensor > 1:
                _require(p.sequence_parallel, "parallel.sequence_parallel", p.sequence_parallel,
                         "megatron's MoE layer needs sequence parallelism when parallel.tensor > 1; set it to true")
        _require(r.backprop_depth >= 1, "recurrence.backprop_depth", r.backprop_depth,
                 "k must be >= 1 (gradients flow through the last k iterations)")
        _require(r.depth >= 1, "recurrence.depth", r.depth, "use r >= 1")
        _require(r.mean >= 1, "recurrence.mean", r.mean, "the mean recurrence must be >= 1")
        _require(r.sigma >= 0, "recurrence.sigma", r.sigma, "use sigma >= 0")
        _require(1 <= r.low <= r.high, "recurrence.low", r.low, f"use 1 <= low <= high (high={r.high})")
        if r.max_depth is not None:
            _require(r.max_depth >= 1, "recurrence.max_depth", r.max_depth, "use a cap >= 1 or null")
        for name in ("tensor", "pipeline", "expert"):
            _require(getattr(p, name) >= 1, f"parallel.{name}", getattr(p, name), "use a size >= 1")
        _require(p.multi_pass_in_flight >= 0, "parallel.multi_pass_in_flight", p.multi_pass_in_flight,
                 "use 0 (all of a step's micro-batches) or a count >= 1")
        _require(t.steps >= 1, "train.steps", t.steps, "use at least 1 step")
        _require(t.micro_batch_size >= 1, "train.micro_batch_size", t.micro_batch_size, "use at least 1")
        _require(t.global_batch_size >= t.micro_batch_size and t.global_batch_size % t.micro_batch_size == 0,
                 "train.global_batch_size", t.global_batch_size,
                 f"use a multiple of train.micro_batch_size={t.micro_batch_size}")
        _require(all(_is_stop_signal(s) for s in t.stop_signals), "train.stop_signals", t.stop_signals,
                 "list signals a process can handle, e.g. [SIGTERM, SIGUSR1, SIGINT] ([] = none)")
        _require(self.optimizer.lr > 0, "optimizer.lr", self.optimizer.lr, "use a positive learning rate")
        _require(0 <= self.optimizer.min_lr <= self.optimizer.lr, "optimizer.min_lr", self.optimizer.min_lr,
                 f"use 0 <= min_lr <= lr={self.optimizer.lr}")
        _require(self.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", self.optimizer.warmup_steps, "use >= 0")
        _require(self.logging.log_interval >= 1, "logging.log_interval", self.logging.log_interval, "use >= 1")
        _require(self.checkpoint.interval >= 0, "checkpoint.interval", self.checkpoint.interval, "use >= 0")
        for key in self.checkpoint.allow_changes:
            section, _, name = str(key).partition(".")
            section_fields = fields(self.objective if section == "objective" else SECTIONS.get(section, ModelConfig))
            _require(section in ("model", "objective") and name in {f.name for f in section_fields},
                     "checkpoint.allow_changes", key, "name keys of the model or objective section, e.g. "
                     "[model.rotary_base]")
        if t.engine == "deepspeed":
            self._validate_deepspeed()
        self._validate_sources()
        self.objective.validate(self)  # the objective's own rules (recurdepth/objectives)
        return self

    def _validate_deepspeed(self) -> None:
        p, d = self.parallel, self.deepspeed
        if p.tensor > 1 or p.pipeline > 1 or p.expert > 1:
            raise ConfigError(f"train.engine=deepspeed runs data parallelism only (got parallel.tensor={p.tensor}, "
                              f"pipeline={p.pipeline}, expert={p.expert}); set them to 1 or use train.engine=megatron")
        _require(not d.offload_params or d.zero_stage == 3, "deepspeed.offload_params", d.offload_params,
                 f"parameter offload needs ZeRO stage 3 (deepspeed.zero_stage={d.zero_stage}); set zero_stage=3")
        _require(not self.train.overlap_grad_reduce, "train.overlap_grad_reduce", True,
                 "it is the megatron engine's option; with train.engine=deepspeed use deepspeed.overlap_comm")
        _require(d.reduce_bucket_size >= 1, "deepspeed.reduce_bucket_size", d.reduce_bucket_size, "use >= 1")
        _require(not self.checkpoint.init_from, "checkpoint.init_from", self.checkpoint.init_from,
                 "starting from another checkpoint's weights works with train.engine=megatron only yet")

    def _validate_sources(self) -> None:
        d = self.data
        _check_sources(d.sources, "data.sources")
        last = 0
        for i, phase in enumerate(d.phases):
            key = f"data.phases[{i}]"
            if not isinstance(phase, dict) or set(phase) != {"from_step", "sources"}:
                raise ConfigError(f"{key}={phase!r} must be a mapping with exactly from_step and sources, e.g. "
                                  f"{{from_step: 500, sources: [{{builtin: stdlib-docs}}, {{procedural: addition}}]}}")
            start = phase["from_step"]
            _require(isinstance(start, int) and not isinstance(start, bool) and last < start < self.train.steps,
                     f"{key}.from_step", start, f"use a step after the previous phase's ({last}) and before "
                                                f"train.steps={self.train.steps}")
            _check_sources(phase["sources"], f"{key}.sources")
            last = start
        if d.tokenizer == "sentencepiece":
            _require(bool(d.tokenizer_model), "data.tokenizer_model", d.tokenizer_model,
                     "tokenizer=sentencepiece needs the .model file written by `recurdepth data tokenizer`")
        if d.tokenizer == "hf":
            _require(bool(d.tokenizer_model), "data.tokenizer_model", d.tokenizer_model,
                     "tokenizer=hf needs a Hugging Face tokenizer.json or the folder holding it")


def _check_sources(sources, name: str) -> None:
    """A blend of data sources (data.sources, or a phase's): each a mapping with exactly one kind."""
    _require(isinstance(sources, list) and len(sources) > 0, name, sources, "list at least one source")
    for i, src in enumerate(sources):
        key = f"{name}[{i}]"
        if not isinstance(src, dict):
            raise ConfigError(f"{key}={src!r} must be a mapping such as {{path: data/corpus, weight: 1.0}}")
        unknown = set(src) - SOURCE_KEYS
        if unknown:
            bad = sorted(unknown)[0]
            raise ConfigError(f"unknown key {key}.{bad}{_suggest(bad, SOURCE_KEYS, prefix=key + '.')}")
        kinds = [k for k in ("builtin", "path", "procedural") if k in src]
        _require(len(kinds) == 1, key, src, "give exactly one of builtin, path or procedural")
        if "builtin" in src:
            _require(src["builtin"] == "stdlib-docs", f"{key}.builtin", src["builtin"], "the builtin corpus is stdlib-docs")
        weight = src.get("weight", 1.0)
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        _require(ok and weight >= 0, f"{key}.weight", weight, "use a number >= 0")
        if "procedural" in src:
            n = src.get("n", 10000)
            _require(isinstance(n, int) and n >= 1, f"{key}.n", n, "use a positive number of samples")
        if "pad" in src:
            _require("procedural" in src, f"{key}.pad", src["pad"], "pad applies to procedural sources only")
            _require(isinstance(src["pad"], bool), f"{key}.pad", src["pad"], "use true or false")
    total = sum(float(s.get("weight", 1.0)) for s in sources)
    _require(total > 0, name, [s.get("weight", 1.0) for s in sources],
             "blend weights sum to zero; give at least one source a positive weight")


def stop_signal(name) -> "signal.Signals":
    """`SIGTERM`, `TERM`, `sigterm` or 15 -> signal.SIGTERM; ValueError naming the valid ones otherwise (not
    SIGKILL/SIGSTOP: no process can handle them)."""
    import signal

    if isinstance(name, signal.Signals):
        return name
    if isinstance(name, int) and not isinstance(name, bool):
        try:
            return signal.Signals(name)
        except ValueError:
            pass
    text = str(name).strip().upper()
    text = text if text.startswith("SIG") else "SIG" + text
    if text in signal.Signals.__members__ and text not in ("SIGKILL", "SIGSTOP"):
        return signal.Signals[text]
    raise ValueError(f"{name!r} is not a signal a process can handle; use names such as SIGTERM, SIGUSR1, SIGINT")


def _is_stop_signal(name: Any) -> bool:
    """A signal *name* in a config (`stop_signal` accepts numbers too; a config names its signals)."""
    try:
        return isinstance(name, str) and stop_signal(name) is not None
    except ValueError:
        return False


def require(ok: bool, key: str, value: Any, fix: str) -> None:
    """The config's one error line for a bad value: `key=value is invalid; fix` (sections' and plug-ins' rules)."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; {fix}")


_require = require


# ---------------------------------------------------------------- loading


def load_config(path: Optional[Union[str, Path]] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `section.key=value` overrides,
    type-check and validate. Raises ConfigError with one line naming the problem and its fix."""
    raw = {} if path is None else read_yaml_mapping(Path(path), "config file", "configs/tiny.yaml",
                                                     "a mapping of sections (model:, train:, ...)")
    return config_from_dict(set_overrides(raw, overrides))


def read_yaml_mapping(path: Path, what: str, example: str, shape: str) -> dict:
    """The YAML mapping in `path` (a config, a sweep file), or one ConfigError line naming `what` is wrong with
    it: missing (pass a file such as `example`), not YAML (the line), or not `shape`."""
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} not found; pass a YAML file such as {example}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {str(path)!r}{where} is not valid YAML; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r} must be {shape}")
    return raw


def config_from_dict(raw: dict) -> Config:
    """Build a validated Config from a nested dict (as stored in checkpoints)."""
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {name!r}{_suggest(name, SECTIONS)}")
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
        if name == "objective":
            sections[name] = _build_objective_section(value)
        else:
            sections[name] = _build_section(name, SECTIONS[name], value)
    return Config(**sections).validate()


def _build_objective_section(values: dict):
    """The `objective` section as the dataclass of its kind (each objective owns its options). A key of another
    kind's section is refused with the kind it belongs to, unless it holds that kind's default (configs saved
    before sections were per kind list every objective's options)."""
    from recurdepth.objectives.registry import OBJECTIVES, section_class

    kind = values.get("kind", "lm")
    if not isinstance(kind, str):
        raise ConfigError(f"objective.kind={kind!r} must be a name, e.g. lm")
    cls = section_class(kind)
    own = {f.name for f in dataclasses.fields(cls)}
    kept = {}
    for key, value in values.items():
        if key in own:
            kept[key] = value
            continue
        for other in sorted(OBJECTIVES):
            if other == kind:
                continue
            try:
                other_cls = section_class(other)
            except Exception:  # noqa: BLE001 - a broken plug-in must not hide this key's error
                continue
            defaults = {f.name: f.default for f in dataclasses.fields(other_cls)}
            if key in defaults:
                if value == defaults[key]:
                    break
                raise ConfigError(f"objective.{key} is an option of objective.kind={other}, not of {kind}; set "
                                  f"objective.kind={other} or remove objective.{key}")
        else:
            kept[key] = value  # unknown everywhere: _build_section names it with a suggestion
    return _build_section("objective", cls, kept)


def _build_section(section: str, cls: type, values: dict):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {section}.{key}{_suggest(key, names, prefix=section + '.')}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type hint; ints are accepted for floats. Returns the (converted) value."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}"
                              + (f"; did you mean {close[0]}?" if close else ""))
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (str, int, float)):
            return [value]
    else:  # pragma: no cover - a field type this loader does not know
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, "a list")
    raise ConfigError(f"{key}={value!r} has the wrong type; expected {expected}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.steps=20)")
    key, text = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key (e.g. model.hidden_size=128)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    section, name = key.split(".")
    node = raw.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"config section {section!r} must be a mapping")
    node[name] = value


def _suggest(word: str, options: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(sorted(options))}"


def set_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply `section.key=value` overrides to a raw config mapping in place (what `load_config` does to a
    file's) and return it; `config_from_dict` then types and validates it."""
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    return raw
