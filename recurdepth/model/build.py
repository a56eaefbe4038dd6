"""From a recurdepth `Config` to a megatron `TransformerConfig` and an initialised `LoopedGPTModel`.

Initialisation is layout-independent: each parameter's *full* (unsharded) tensor is drawn from a
generator seeded by (seed, parameter name) and the local shard is cut from it, so TP/PP/DP layouts
start from identical weights and a checkpoint means the same thing under every layout.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig

from recurdepth.config import Config
from recurdepth.errors import ConfigError
from recurdepth.model.depth import dense_layers, mean_depth
from recurdepth.model.layers import default_ffn_hidden_size
from recurdepth.model.looped_gpt import LoopedGPTModel
from recurdepth.model.vocab import model_vocab_size, padded_vocab_size  # noqa: F401 - re-exported
from recurdepth.seeding import derive_seed

_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")
_GLU_INPUT = "linear_fc1.weight"


def _global_name_and_shard(name: str, cfg: Config) -> tuple[str, int, int]:
    """A parameter's layout-independent name (local expert i -> global expert index; the last pipeline stage's
    copy of tied embeddings -> the embedding) and the TP group it is sharded over (expert weights: megatron's
    expert-tensor-parallel group)."""
    if name == "output_layer.weight" and cfg.model.tie_embeddings:
        name = "embedding.word_embeddings.weight"
    if ".local_experts." not in name:
        return (name, parallel_state.get_tensor_model_parallel_rank(),
                parallel_state.get_tensor_model_parallel_world_size())
    head, tail = name.split(".local_experts.", 1)
    local, rest = tail.split(".", 1)
    per_rank = cfg.model.num_experts // parallel_state.get_expert_model_parallel_world_size()
    expert = parallel_state.get_expert_model_parallel_rank() * per_rank + int(local)
    return (f"{head}.local_experts.{expert}.{rest}", parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size())


def init_std(cfg: Config) -> float:
    return cfg.model.init_std or (2.0 / (5.0 * cfg.model.hidden_size)) ** 0.5


def effective_depth(cfg: Config) -> float:
    """Layers a token passes through at the mean recurrence: P + R * mean(r) + C (model.kind=dense: its layers)."""
    m = cfg.model
    if m.kind == "dense":
        return dense_layers(cfg)
    return m.prelude_layers + m.core_layers * mean_depth(cfg.recurrence) + m.coda_layers


def transformer_config(cfg: Config, params_dtype: torch.dtype = torch.float32, on_cpu: bool = True) -> TransformerConfig:
    """The megatron-core TransformerConfig for the blocks of the looped model."""
    m, p = cfg.model, cfg.parallel
    ffn = m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation)
    return TransformerConfig(
        num_layers=m.prelude_layers + m.core_layers + m.coda_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=ffn,
        kv_channels=m.head_width,
        qk_layernorm=m.qk_norm,
        normalization=m.normalization,
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=m.activation == "swiglu",
        activation_func=F.silu if m.activation == "swiglu" else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias != "none",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        expert_model_parallel_size=p.expert,
        sequence_parallel=p.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,  # `initialize_parameters` draws every weight itself
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=True,  # losses are token sums; finalize_model_grads divides by the global count
        init_method=torch.nn.init.zeros_,
        output_layer_init_method=torch.nn.init.zeros_,
        **moe_config(cfg),
    )


def moe_config(cfg: Config) -> dict:
    """megatron MoE settings (dropless top-k routing with an auxiliary load-balancing loss)."""
    m = cfg.model
    if not m.num_experts:
        return {}
    return dict(num_moe_experts=m.num_experts, moe_router_topk=m.moe_top_k,
                moe_token_dispatcher_type=m.moe_dispatcher, moe_aux_loss_coeff=m.moe_aux_loss_coeff,
                moe_router_load_balancing_type="aux_loss", moe_grouped_gemm=False,
                moe_ffn_hidden_size=m.moe_ffn_hidden_size or m.ffn_hidden_size
                or default_ffn_hidden_size(m.hidden_size, m.activation))


def use_transformer_engine(cfg: Config, device: torch.device | str) -> bool:
    """`model.spec`: te, local, or auto (TransformerEngine when on GPU and importable)."""
    if cfg.model.spec == "local" or (cfg.model.spec == "auto" and torch.device(device).type != "cuda"):
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        if cfg.model.spec == "te":
            raise ConfigError("model.spec=te but transformer_engine is not installed; install it or use "
                              "model.spec=local") from None
        return False
    return True


def build_model(cfg: Config, vocab_size: int, params_dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", extra_modules=None) -> LoopedGPTModel:
    """Build and initialise the looped model for this rank (parallel_state must be initialised). `vocab_size` is
    the tokenizer's (`model_vocab_size` gives the rows); `extra_modules(cfg, first_stage, last_stage)` (default:
    the configured objective's `extra_modules`) names the submodules registered on the model before its
    initialisation, so DDP, the optimizer and checkpoints see them."""
    use_te = use_transformer_engine(cfg, device)
    tconfig = transformer_config(cfg, params_dtype, on_cpu=torch.device(device).type in ("cpu", "meta"))
    if cfg.model.kind == "dense":  # megatron's GPTModel, the baseline (recurdepth/model/dense.py)
        return _build_dense(cfg, vocab_size, params_dtype, device, tconfig, use_te)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    per_stage = cfg.model.core_layers // pp_size
    if cfg.parallel.pipeline_split == "naive":  # baseline: the whole core on the first stage
        core_range = (0, cfg.model.core_layers) if pp_rank == 0 else (cfg.model.core_layers,) * 2
    else:
        core_range = (pp_rank * per_stage, (pp_rank + 1) * per_stage)
    on_meta = torch.device(device).type == "meta"  # `recurdepth plan --dry-run`: shapes only, no memory, no init
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = LoopedGPTModel(tconfig, cfg.model, cfg.recurrence, model_vocab_size(cfg, vocab_size),
                               seed=cfg.train.seed, use_te=use_te, pre_process=pp_rank == 0,
                               post_process=pp_rank == pp_size - 1,
                               core_range=core_range)
        from recurdepth.objectives.registry import objective_class

        if extra_modules is None:
            extra_modules = objective_class(cfg.objective.kind).extra_modules
        for name, module in extra_modules(cfg, model.pre_process, model.post_process).items():
            model.add_module(name, module)  # construction: the objective's weights live in the model
        trainable = objective_class(cfg.objective.kind).trainable
        for local_name, param in model.named_parameters():
            if not trainable(cfg, _global_name_and_shard(local_name, cfg)[0]):
                param.requires_grad_(False)  # before DDP and the optimizer see it
    model.to(device=device, dtype=params_dtype)  # torch norms are built in the default dtype
    mark_tensor_parallel_params(model)
    if not on_meta:
        initialize_parameters(model, cfg)
    if cfg.model.qkv_bias == "qk":
        hold_value_bias_at_zero(model, cfg)
    if cfg.train.compile:
        compile_blocks(model)
    return model


def _build_dense(cfg: Config, vocab_size: int, params_dtype: torch.dtype, device, tconfig, use_te: bool):
    from recurdepth.model.dense import build_dense_model

    on_meta = torch.device(device).type == "meta"
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = build_dense_model(cfg, vocab_size, params_dtype, "meta" if on_meta else device, tconfig, use_te)
    mark_tensor_parallel_params(model)
    if not on_meta:
        initialize_parameters(model, cfg)
    if cfg.train.compile:
        compile_blocks(model)  # megatron's TransformerLayer blocks
    return model


def compile_blocks(model: torch.nn.Module) -> None:
    """`torch.compile` every transformer block in place (`train.compile`): inductor fuses the norms, RoPE, SwiGLU
    and residual adds around the matmuls, one graph per block; the workarounds that keep each block one graph are
    megatron patches, so they live (under the version gate) in `recurdepth.compat.compile`."""
    from recurdepth.compat.compile import compile_blocks as compile_transformer_blocks
    from recurdepth.model.layers import LoopedTransformerLayer

    compile_transformer_blocks(model, (LoopedTransformerLayer,))


def value_bias_mask(rows: int, cfg: Config) -> torch.Tensor:
    """1 on the query and key rows of this rank's fused q/k/v bias, 0 on the value rows. megatron's layout is
    grouped by key/value head, `[g0: q (heads/groups of them) k v | g1: ...]`, each rank holding whole groups."""
    m = cfg.model
    groups = m.num_query_groups or m.num_heads
    d = m.head_width
    per_group = (m.num_heads // groups + 2) * d
    mask = torch.ones(rows // per_group, per_group)
    mask[:, -d:] = 0.0
    return mask.reshape(rows)


def hold_value_bias_at_zero(model: torch.nn.Module, cfg: Config) -> None:
    """model.qkv_bias=qk (Huginn's q/k bias): the value part of every fused q/k/v bias starts at zero and its
    gradient is zeroed (a hook on the parameter, before DDP and the optimizer see the gradient), so no step
    moves it: AdamW with a zero gradient from a zero moment leaves it where it is, and biases get no weight decay."""
    for name, param in model.named_parameters():
        if name.endswith("self_attention.linear_qkv.bias"):
            mask = value_bias_mask(param.shape[0], cfg).to(param)
            with torch.no_grad():
                param.mul_(mask)
            param.register_hook(lambda grad, mask=mask: grad * mask)


def mark_tensor_parallel_params(model: torch.nn.Module) -> None:
    """Set megatron's `tensor_model_parallel` / `partition_dim` attributes on every TP-sharded parameter.

    megatron sets them only inside its own weight initialisation, which we skip (`perform_initialization=False`
    with CPU init); without them the gradient norm counts sharded weights on one TP rank only, and our own
    initialisation could not find the full shapes."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            sharded = {"weight": 0, "bias": 0}
        elif isinstance(module, RowParallelLinear):
            sharded = {"weight": 1}
        else:
            continue
        for name, dim in sharded.items():
            param = getattr(module, name, None)
            if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


@torch.no_grad()
def initialize_parameters(model: torch.nn.Module, cfg: Config) -> None:
    """Draw every parameter from TruncNormal(0, std^2, +-3 std) seeded by (seed, name); norms = 1.

    std = init_std (default sqrt(2/(5h)), Nguyen & Salazar small init as in Huginn); output projections of
    attention and MLP use std / sqrt(2 * effective depth) when `depth_scaled_init` (Huginn's "scaled" init).
    """
    std = init_std(cfg)
    out_std = std / math.sqrt(2 * effective_depth(cfg)) if cfg.model.depth_scaled_init else std
    for local_name, param in model.named_parameters():
        name, tp_rank, tp_size = _global_name_and_shard(local_name, cfg)
        if param.dim() == 1:  # norm scales and biases
            param.fill_(1.0 if "norm" in name else 0.0)
            continue
        sigma = out_std if name.endswith(_OUTPUT_PROJECTIONS) else std
        full_shape = list(param.shape)
        split = getattr(param, "tensor_model_parallel", False) and tp_size > 1
        dim = getattr(param, "partition_dim", 0)
        if split:
            full_shape[dim] *= tp_size
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, zlib.crc32(name.encode())))
        full = torch.nn.init.trunc_normal_(torch.empty(full_shape, dtype=torch.float32), 0.0, sigma,
                                           -3 * sigma, 3 * sigma, generator=gen)
        if split:
            if name.endswith(_GLU_INPUT) and cfg.model.activation == "swiglu":
                # megatron keeps [gate_shard; up_shard] per TP rank of the global [gate; up]
                full = torch.cat([half.chunk(tp_size, dim)[tp_rank] for half in full.chunk(2, dim)], dim)
            else:
                full = full.chunk(tp_size, dim)[tp_rank]
        param.copy_(full.to(param.dtype))
