"""Building blocks of the looped model, each built from megatron-core submodule specs.

- `LoopedTransformerLayer`: one transformer block with a `sandwich` norm (Huginn, arXiv 2502.05171:
  `x = n2(x + attn(n1(x))); x = n4(x + mlp(n3(x)))`) or the usual `pre` norm.
- `SDPACoreAttention`: megatron's core-attention protocol on top of torch's fused
  `scaled_dot_product_attention` (flash / memory-efficient kernels where available).
- `RotarySelfAttention`: megatron's `SelfAttention` with RoPE applied by one autograd function (two
  passes over q and k instead of megatron's six; the same arithmetic), for the local spec.
- `InjectionAdapter`: combines the recurrent state with the prelude's output before every core pass.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules


class SDPACoreAttention(MegatronModule):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`.

    Inputs `query [sq, b, np, hn]`, `key`/`value [sk, b, ng, hn]` (ng divides np: grouped-query attention);
    returns `[sq, b, np * hn]`. `attention_mask` follows megatron's convention (True = masked out), or
    None for plain causal attention.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, softmax_scale: Optional[float] = None, **_unused):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None, "SDPACoreAttention: unsupported input"
        sq, b, nq, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, hn]
        if q.device.type == "cpu":  # the CPU flash kernel runs forward + backward ~20% faster on contiguous inputs than
            # on views of megatron's [s, b, n, hn], copies included (b=2, n=8, s=512, hn=64); GPUs: not measured
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if attention_mask is None else ~attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != nq,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, nq * hn)


def _rotate(t: torch.Tensor, cos1, cos2, sin1, sin2) -> torch.Tensor:
    """`[t1 cos1 - t2 sin1, t2 cos2 + t1 sin2]` of `t = [t1, t2]` (halves of the last dim), written in place into
    one output (no `addcmul`: its fused multiply-add would round differently from megatron's formula)."""
    t1, t2 = t.chunk(2, dim=-1)
    if torch.compiler.is_compiling():  # dynamo cannot trace `out=` into a strided half; inductor fuses this anyway
        return torch.cat([t1 * cos1 - t2 * sin1, t2 * cos2 + t1 * sin2], dim=-1)
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(t1, cos1, out=o1).sub_(t2 * sin1)
    torch.mul(t2, cos2, out=o2).add_(t1 * sin2)
    return out


class _ApplyRotary(torch.autograd.Function):
    """RoPE `t * cos + rotate_half(t) * sin` (megatron's non-interleaved form, RoFormer eq. 34) on `[s, b, n, d]`;
    the gradient is the inverse rotation. Saves only cos/sin."""

    @staticmethod
    def forward(ctx, t, cos, sin):
        c1, c2 = cos.chunk(2, dim=-1)
        s1, s2 = sin.chunk(2, dim=-1)
        ctx.save_for_backward(c1, c2, s1, s2)
        return _rotate(t, c1, c2, s1, s2)

    @staticmethod
    def backward(ctx, grad):
        c1, c2, s1, s2 = ctx.saved_tensors
        return _rotate(grad, c1, c2, -s2, -s1), None, None


_ROPE_CACHE: list = []  # [(freqs, dtype, cos, sin)] of the last frequency table seen


def rope_cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple:
    """(cos, sin) `[s, 1, 1, d]` of a (float64) RoPE frequency table in the activations' dtype, reused while the
    table is. Compiled blocks get them ready-made (`compile_blocks`): computed inside a graph, inductor would fuse
    the cos/sin into the rotation and evaluate them once per element of q and k instead of once per position."""
    if torch.compiler.is_compiling():
        return freqs.cos().to(dtype), freqs.sin().to(dtype)
    if not _ROPE_CACHE or _ROPE_CACHE[0][0] is not freqs or _ROPE_CACHE[0][1] != dtype:
        _ROPE_CACHE[:] = [(freqs, dtype, freqs.cos().to(dtype), freqs.sin().to(dtype))]
    return _ROPE_CACHE[0][2], _ROPE_CACHE[0][3]


def apply_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of `t [s, b, n, d]` at the frequencies `freqs [s, 1, 1, d]` (float64 angles), as the model's attention
    applies it (`_ApplyRotary`, megatron's non-interleaved formula)."""
    cos, sin = rope_cos_sin(freqs, t.dtype)
    return _ApplyRotary.apply(t, cos, sin)


def hook_unsupported(config) -> Optional[str]:
    """Why an attention hook (`attend_for`: the decoder's cache, Coconut's prefix cache, Quiet-STaR's streams) cannot
    stand for the layer's own attention, an option of megatron's TransformerConfig the hooks would ignore, or
    None. The hooks run the layer's own `get_query_key_value_tensors` (q/k-norm, GQA, this TP rank's heads), so
    those need no check."""
    for key, off in (("multi_latent_attention", False), ("attention_output_gate", False),
                     ("rotary_interleaved", False), ("no_rope_freq", None), ("window_size", None),
                     ("softmax_type", "vanilla"), ("experimental_attention_variant", None),
                     ("sequence_parallel", False)):
        value = getattr(config, key, off)
        if value != off:
            return f"{key}={value!r}"
    return None


def hook_qkv(attn, x: torch.Tensor, freqs: torch.Tensor) -> tuple:
    """An attention hook's q, k, v `[s, b, n | g, d]` of `x [s, b, h]` (normed): the layer's own projection, RoPE
    at `freqs [s, 1, 1, d]` on q and k."""
    q, k, v = attn.get_query_key_value_tensors(x)
    return apply_rope(q, freqs), apply_rope(k, freqs), v


def hook_output(attn, out: torch.Tensor) -> torch.Tensor:
    """An attention hook's result: the layer's own output projection of `out [s, b, n d]`, its bias added."""
    out, bias = attn.linear_proj(out)
    return out if bias is None else out + bias


_FAST_PATH_UNSUPPORTED = ("key_value_states", "inference_context", "rotary_pos_cos_sin", "packed_seq_params",
                          "sequence_len_offset", "inference_params")


class RotarySelfAttention(SelfAttention):
    """megatron-core `SelfAttention` whose training/eval forward (no KV cache, no packed sequences, full-width
    non-interleaved RoPE) applies RoPE with `_ApplyRotary` and cos/sin computed once per frequency table (or
    given as `rotary_pos_cos`/`rotary_pos_sin` `[s, 1, 1, d]` instead of `rotary_pos_emb`); every other case is
    megatron's own forward. `[s, b, h] -> ([s, b, h], bias)`."""

    def forward(self, hidden_states, attention_mask, *args, **kwargs):
        """Our fast path for the keyword calls the looped layer makes (`rotary_pos_emb=`, or `rotary_pos_cos=` and
        `rotary_pos_sin=`); anything else (positional extras, KV cache, packed sequences, other RoPE variants)
        is megatron's own forward with the arguments untouched, so its signature is never restated here."""
        c = self.config
        emb, cos, sin = (kwargs.get(k) for k in ("rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin"))
        given = cos is not None and sin is not None and emb is None
        table = cos if given else emb
        if (args or any(kwargs.get(k) is not None for k in _FAST_PATH_UNSUPPORTED)
                or set(kwargs) - {"rotary_pos_emb", "rotary_pos_cos", "rotary_pos_sin", "attention_bias",
                                  *_FAST_PATH_UNSUPPORTED}
                or not torch.is_tensor(table) or c.rotary_interleaved
                or (not given and (cos is not None or sin is not None))
                or c.multi_latent_attention or c.attention_output_gate or c.no_rope_freq or c.apply_rope_fusion
                or self.checkpoint_core_attention or getattr(c, "yarn_rotary_scaling_factor", None) is not None
                or table.shape[-1] != self.hidden_size_per_attention_head):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        query, key, value = self.get_query_key_value_tensors(hidden_states)
        if not given:
            cos, sin = rope_cos_sin(emb, query.dtype)
        query, key = _ApplyRotary.apply(query, cos, sin), _ApplyRotary.apply(key, cos, sin)
        out = self.core_attention(query, key, value, attention_mask, attn_mask_type=self.attn_mask_type,
                                  attention_bias=kwargs.get("attention_bias"))
        return self.linear_proj(out)


class LoopedTransformerLayer(MegatronModule):
    """A transformer block `[s, b, h] -> [s, b, h]` whose attention, MLP and norms come from a megatron
    `TransformerLayerSubmodules` spec; `block_norm` selects sandwich (Huginn) or pre-norm residuals."""

    def __init__(self, config: TransformerConfig, submodules: TransformerLayerSubmodules, layer_number: int,
                 block_norm: str = "sandwich", post_norm=None, mlp_kwargs: Optional[dict] = None):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.sandwich = block_norm == "sandwich"
        h, eps = config.hidden_size, config.layernorm_epsilon
        norm = submodules.input_layernorm
        self.input_layernorm = build_module(norm, config=config, hidden_size=h, eps=eps)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.pre_mlp_layernorm = build_module(submodules.pre_mlp_layernorm, config=config, hidden_size=h, eps=eps)
        self.mlp = build_module(submodules.mlp, config=config, **(mlp_kwargs or {}))
        if hasattr(self.mlp, "set_layer_number"):
            self.mlp.set_layer_number(layer_number)
        if self.sandwich:  # norms applied to the residual sums (a real norm even where the spec fuses n1/n3)
            post_norm = post_norm or norm
            self.post_attention_layernorm = build_module(post_norm, config=config, hidden_size=h, eps=eps)
            self.post_mlp_layernorm = build_module(post_norm, config=config, hidden_size=h, eps=eps)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's sharded state dict in the local spec's names whatever the spec (`recurdepth.model.names`):
        TE's fused norms saved as `input_layernorm` / `pre_mlp_layernorm`, TE's (FP8) extra state left out, so
        a checkpoint loads under either spec."""
        from megatron.core.dist_checkpointing.utils import apply_prefix_mapping

        from recurdepth.model.names import EXTRA_STATE, TE_TO_LOCAL

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for key in [k for k in sd if k.rsplit(".", 1)[-1] == EXTRA_STATE]:
            del sd[key]
        apply_prefix_mapping(sd, {f"{prefix}{te}": f"{prefix}{local}" for te, local in TE_TO_LOCAL.items()})
        return sd

    def forward(self, x: torch.Tensor, rotary_pos_emb=None,
                attention_mask: Optional[torch.Tensor] = None, attend=None) -> torch.Tensor:
        """`rotary_pos_emb`: RoPE frequencies `[s, 1, 1, d]`, or their (cos, sin). `attend(normed_x) -> attention
        output` replaces the self-attention call (the KV-cached decoder)."""
        if attend is None:
            rope = {"rotary_pos_emb": rotary_pos_emb} if not isinstance(rotary_pos_emb, tuple) else \
                dict(zip(("rotary_pos_cos", "rotary_pos_sin"), rotary_pos_emb))
            attn, attn_bias = self.self_attention(self.input_layernorm(x), attention_mask=attention_mask, **rope)
        else:
            attn, attn_bias = attend(self.input_layernorm(x)), None
        x = x + (attn if attn_bias is None else attn + attn_bias)
        if self.sandwich:
            x = self.post_attention_layernorm(x)
        mlp, mlp_bias = self.mlp(self.pre_mlp_layernorm(x))
        x = x + (mlp if mlp_bias is None else mlp + mlp_bias)
        if self.sandwich:
            x = self.post_mlp_layernorm(x)
        return x


class _RMSNormFunction(torch.autograd.Function):
    """`x * rsqrt(mean(x^2) + eps) * w` over the last dim, saving x and the per-token rstd only. torch's CPU
    `rms_norm` is a composite whose autograd graph saves x^2 and more and runs ~12 passes backward; forward and
    backward here take 0.6-0.9 ms against torch's 1.2 ms on `[128, 16, 128]` fp32 (2 threads; same values to
    1e-15 in fp64, tests/model/test_forward_options.py)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return torch.mul(x, rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        x_hat = torch.mul(x, rstd)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * x_hat).reshape(-1, x.shape[-1]).sum(0)
        g = torch.mul(grad, weight)
        # d/dx: rstd * (g - x_hat * mean(g * x_hat))
        mean = (g * x_hat).mean(-1, keepdim=True)
        return g.sub_(x_hat.mul_(mean)).mul_(rstd), grad_weight, None


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` (same parameters and state dict) whose fp32/fp64 CPU forward is one autograd function
    (`_RMSNormFunction`); elsewhere, and inside compiled graphs (inductor fuses torch's own), torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or self.weight is None or x.dtype not in (torch.float32, torch.float64)
                or torch.compiler.is_compiling()):
            return super().forward(x)
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return _RMSNormFunction.apply(x, self.weight, eps)


class SequenceParallelNorm(torch.nn.Module):
    """RMSNorm / LayerNorm (per `config.normalization`) for the local spec, usable with sequence parallelism:
    its parameters are marked `sequence_parallel` so megatron all-reduces their gradients over TP (each TP
    rank sees only its slice of the sequence). megatron's own torch norm refuses sequence parallelism."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-6):
        if config.normalization == "RMSNorm":
            norm = RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


class InjectionAdapter(torch.nn.Module):
    """Input injection `adapter(s, e) -> [s, b, h]` run before every core pass.

    concat: `W [s; e]` (Huginn, W: 2h -> h);  add: `s + e`;  gate: `g * s + (1 - g) * e` with
    `g = sigmoid(W [s; e])`.
    """

    def __init__(self, kind: str, hidden_size: int, dtype: torch.dtype = torch.float32,
                 sequence_parallel: bool = False):
        super().__init__()
        self.kind = kind
        if kind in ("concat", "gate"):
            self.proj = torch.nn.Linear(2 * hidden_size, hidden_size, bias=False, dtype=dtype)
            # replicated over TP; with sequence parallelism each rank's gradient covers its tokens only
            self.proj.weight.sequence_parallel = sequence_parallel

    def forward(self, state: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        if self.kind == "add":
            return state + injected
        mixed = self.proj(torch.cat([state, injected], dim=-1))
        if self.kind == "concat":
            return mixed
        gate = torch.sigmoid(mixed)
        return gate * state + (1.0 - gate) * injected


def default_ffn_hidden_size(hidden_size: int, activation: str) -> int:
    """4h for gelu; 8h/3 rounded up to a multiple of 64 for swiglu (same parameter count)."""
    if activation == "gelu":
        return 4 * hidden_size
    return int(math.ceil(8 * hidden_size / 3 / 64) * 64)


def _plain_linear_applies(kwargs: dict) -> bool:
    """Whether megatron's linear autograd function would compute exactly `F.linear` here: no tensor-parallel
    gradient all-reduce, no sequence parallelism, no fused or deferred weight-gradient accumulation."""
    return not (kwargs.get("gradient_accumulation_fusion") or kwargs.get("allreduce_dgrad")
                or kwargs.get("sequence_parallel") or kwargs.get("grad_output_buffer") is not None)


class LocalColumnParallelLinear(ColumnParallelLinear):
    """megatron's `ColumnParallelLinear` whose matmul is `F.linear` where megatron's own autograd function would
    compute the same thing (`_plain_linear_applies`: one tensor-parallel rank, ...): the same kernels, without the
    Python autograd function around them (about 40 us per call, a tenth of a tiny model's eager step)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not args and _plain_linear_applies(kwargs):
            return F.linear(input, weight, kwargs.get("bias"))
        return super()._forward_impl(input, weight, *args, **kwargs)


class LocalRowParallelLinear(RowParallelLinear):
    """`RowParallelLinear` with `LocalColumnParallelLinear`'s matmul (the reduction over ranks stays megatron's)."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        if not args and _plain_linear_applies(kwargs):
            return F.linear(input, weight, kwargs.get("bias"))
        return super()._forward_impl(input, weight, *args, **kwargs)


def layer_spec_submodules(use_te: bool, attention: str, num_experts: Optional[int] = None, qk_norm: bool = False
                          ) -> tuple[TransformerLayerSubmodules, type]:
    """The megatron-core layer spec the looped blocks are made of, and the norm class for sandwich norms:
    TransformerEngine where importable and asked for (its n1/n3 are fused into the following linear), else
    the local (pure torch) spec with the core attention swapped for SDPA when asked."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        from megatron.core.extensions.transformer_engine import TENorm

        spec = get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, qk_layernorm=qk_norm)
        return spec.submodules, TENorm
    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization="RMSNorm", qk_layernorm=qk_norm)
    sub: TransformerLayerSubmodules = spec.submodules
    sub.self_attention.module = RotarySelfAttention
    sub.self_attention.submodules.linear_qkv = LocalColumnParallelLinear
    sub.self_attention.submodules.linear_proj = LocalRowParallelLinear
    if num_experts is None:
        sub.mlp.submodules.linear_fc1, sub.mlp.submodules.linear_fc2 = LocalColumnParallelLinear, LocalRowParallelLinear
    if attention == "sdpa":
        sub.self_attention.submodules.core_attention = SDPACoreAttention
    sub.input_layernorm = sub.pre_mlp_layernorm = SequenceParallelNorm
    return sub, SequenceParallelNorm
