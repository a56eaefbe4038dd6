"""Retrofit a pretrained Llama-family model (Hugging Face `save_pretrained` directory) into a looped one:
`recurdepth import --format hf-llama HF_DIR OUT --prelude 0:4 --core 4:12 --coda 12:16 [--drop 12:14]`.

The source's layers are split into prelude, core and coda by half-open index ranges (McLeish et al. 2025,
"retrofitted recurrence", arXiv 2511.07384); layers named by `--drop` are left out. Every layer keeps its
weights; the looped model is pre-norm (`block_norm: pre`), unscaled embeddings, the final norm after the coda:

    transformers (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)   recurdepth
    model.embed_tokens.weight                                              embedding.word_embeddings.weight
    model.layers.i.input_layernorm.weight                                  <stack>.j.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.{weight,bias}                    <stack>.j.self_attention.linear_qkv
        [Q; K; V], heads grouped by key/value head                           [g0: q.. k v | g1: q.. k v | ...]
    model.layers.i.self_attn.o_proj.weight                                 <stack>.j.self_attention.linear_proj
    model.layers.i.post_attention_layernorm.weight (the norm before the MLP)  <stack>.j.pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight / down_proj.weight             <stack>.j.mlp.linear_fc1 [gate; up] / fc2
    model.norm.weight / lm_head.weight                                     final_layernorm.weight / output_layer

Both use rotate-half RoPE, so no rows are permuted. The concat adapter `W [s; e]` starts as `W = [0 | I]`: the
core's input is the prelude's output at every iteration, so the untrained looped model computes the source
model (without the dropped layers) at every r, r = 1 included; the state part of W is learnt from the first
step with r >= 2 on (its gradient is not zero there). Added tokenizer rows (recurdepth's special tokens, when
the source's vocabulary lacks them) start at the mean of the source's embedding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from recurdepth.export.hf_huginn import ExportError, read_config_json, read_safetensors

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
# architectures whose blocks are not a pre-norm transformer layer: named with the reason they do not map
UNMAPPED = {
    "olmo2": "OLMo-2 normalises each sublayer's output (post-norm) and its queries and keys over all heads "
             "(qk-norm); recurdepth's pre-norm and sandwich blocks cannot compute that exactly",
    "olmo": "OLMo uses non-parametric LayerNorm, which recurdepth's RMSNorm/LayerNorm blocks (with weights) do "
            "not compute",
    "gemma": "Gemma scales its norms by (1 + w) and its embeddings by sqrt(h) with a GeLU-tanh MLP",
    "gemma2": "Gemma 2 has sandwich norms with (1 + w) weights, logit soft-capping and sliding-window layers",
    "phi3": "Phi-3 fuses q/k/v and gate/up and uses LongRoPE scaling",
}


@dataclass(frozen=True)
class Split:
    """Source layer indices of the prelude, core and coda (each in order), and the dropped ones."""

    prelude: tuple
    core: tuple
    coda: tuple
    dropped: tuple

    @property
    def stacks(self):
        return (("prelude", self.prelude), ("core", self.core), ("coda", self.coda))


def parse_range(text: str, what: str) -> range:
    """`A:B` (half-open, A <= B) -> range(A, B); ExportError naming the option otherwise."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = int(parts[0]), int(parts[1])
    except ValueError:
        raise ExportError(f"--{what} {text!r} is not a layer range START:STOP (half-open, e.g. 4:12)") from None
    if start < 0 or stop < start:
        raise ExportError(f"--{what} {text!r} is not a layer range: use 0 <= START <= STOP")
    return range(start, stop)


def layer_split(num_layers: int, core: str, prelude: Optional[str] = None, coda: Optional[str] = None,
                drop: Optional[str] = None) -> Split:
    """The split the options describe, checked to tile the source's `num_layers` layers exactly: every layer
    in exactly one of prelude, core, coda or --drop (comma-separated ranges), prelude before core before coda.
    Without --prelude, the prelude is every layer before the core; without --coda, every layer after it (less
    the dropped ones)."""
    c = parse_range(core, "core")
    if not len(c):
        raise ExportError(f"--core {core!r} is empty; the core needs at least one layer")
    dropped = [parse_range(t, "drop") for t in str(drop).split(",")] if drop else []
    dropped_set = {i for r in dropped for i in r}
    p = parse_range(prelude, "prelude") if prelude is not None else \
        [i for i in range(0, c.start) if i not in dropped_set]
    d = parse_range(coda, "coda") if coda is not None else \
        [i for i in range(c.stop, num_layers) if i not in dropped_set]
    named = [("prelude", list(p)), ("core", list(c)), ("coda", list(d))] + [("drop", list(r)) for r in dropped]
    for what, idx in named:
        if idx and idx[-1] >= num_layers:
            raise ExportError(f"--{what} reaches layer {idx[-1]}, but the model has {num_layers} layers "
                              f"(0..{num_layers - 1})")
    owner: dict = {}
    for what, idx in named:
        for i in idx:
            if i in owner:
                raise ExportError(f"layer {i} is in both --{owner[i]} and --{what}; the ranges must not overlap")
            owner[i] = what
    gaps = [i for i in range(num_layers) if i not in owner]
    if gaps:
        shown = ", ".join(map(str, gaps[:6])) + (", ..." if len(gaps) > 6 else "")
        raise ExportError(f"layers {shown} of the model's {num_layers} are in no range; put them in --prelude, "
                          f"--core or --coda, or leave them out with --drop")
    p, d = list(p), list(d)
    if (p and p[-1] >= c.start) or (d and d[0] < c.stop):
        raise ExportError("the prelude's layers must come before the core's and the coda's after them")
    return Split(tuple(p), tuple(c), tuple(d), tuple(sorted(dropped_set)))


# ---------------------------------------------------------------------------------------------------- config

def _rope(config: dict) -> tuple[float, dict]:
    """(theta, recurdepth rope-scaling keys) from `rope_parameters` (transformers >= 5) or `rope_theta` +
    `rope_scaling` (4.x); ExportError for a scaling recurdepth does not compute."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind == "default":
        return theta, {}
    factor = float(merged.get("factor", 1.0))
    if kind == "linear":
        return theta, {"rope_scaling": "linear", "rope_scaling_factor": factor}
    if kind == "llama3":
        return theta, {"rope_scaling": "llama3", "rope_scaling_factor": factor,
                       "rope_low_freq_factor": float(merged.get("low_freq_factor", 1.0)),
                       "rope_high_freq_factor": float(merged.get("high_freq_factor", 4.0)),
                       "rope_original_max_positions": int(merged.get("original_max_position_embeddings", 8192))}
    raise ExportError(f"rope scaling {kind!r} is not supported (recurdepth computes default, linear and llama3 RoPE); "
                      f"this model cannot be imported without changing its outputs")


def check_architecture(config: dict) -> str:
    """The config's model_type when --format hf-llama imports it; ExportError naming why not otherwise."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        why = UNMAPPED.get(kind)
        raise ExportError(f"model_type {kind!r} cannot be imported with --format hf-llama: "
                          + (f"{why}" if why else f"supported are {', '.join(SUPPORTED)} (the Llama family: "
                                                  f"pre-norm RMSNorm blocks, SwiGLU, RoPE)"))
    return kind


def raw_config(config: dict, rows: int, seq_length: Optional[int], split: Split) -> dict:
    """The recurdepth config sections (model, recurrence) of a Llama-family config.json."""
    kind = check_architecture(config)
    try:
        h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        groups = int(config.get("num_key_value_heads") or heads)
        ffn = int(config["intermediate_size"])
    except KeyError as exc:
        raise ExportError(f"config.json has no {exc.args[0]!r}, which a {kind} config needs") from None
    act = config.get("hidden_act", "silu")
    refuse = []
    if act != "silu":
        refuse.append(f"hidden_act={act!r} (recurdepth's gated MLP is SwiGLU: silu)")
    if config.get("mlp_bias"):
        refuse.append("mlp_bias=true (recurdepth's MLP has no biases)")
    if kind in ("llama", "mistral", "qwen3") and config.get("attention_bias"):
        refuse.append("attention_bias=true (it includes a bias on o_proj, which recurdepth's attention output "
                      "projection does not have)")
    head_dim = int(config.get("head_dim") or 0) or None
    if head_dim is None and h % heads:
        refuse.append(f"num_attention_heads={heads} does not divide hidden_size={h} and no head_dim is given")
    if heads % groups:
        refuse.append(f"num_key_value_heads={groups} does not divide num_attention_heads={heads}")
    theta, rope = _rope(config)
    positions = int(config.get("max_position_embeddings", 4096))
    seq = int(seq_length or min(positions, 4096))
    window = config.get("sliding_window")
    if window is not None and (kind == "mistral" or config.get("use_sliding_window")) and int(window) < seq:
        refuse.append(f"sliding_window={window} < the sequence length {seq} (recurdepth's attention is full "
                      f"causal; import with --seq-length {window} or less to compute the same)")
    if refuse:
        raise ExportError(f"this {kind} model cannot be imported exactly: {'; '.join(refuse)}")
    model = {"hidden_size": h, "num_heads": heads, "num_query_groups": groups if groups != heads else None,
             "head_dim": head_dim if head_dim is not None and head_dim * heads != h else None,
             "qk_norm": kind == "qwen3",
             "ffn_hidden_size": ffn, "prelude_layers": len(split.prelude), "core_layers": len(split.core),
             "coda_layers": len(split.coda), "seq_length": seq, "vocab_size": rows,
             "make_vocab_size_divisible_by": _row_multiple(rows), "adapter": "concat", "block_norm": "pre",
             "normalization": "RMSNorm", "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
             "activation": "swiglu", "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
             "embedding_scale": 1.0, "norm_before_coda": False, "initial_state": "zeros",
             "rotary_base": theta, "qkv_bias": "qkv" if kind == "qwen2" else "none", **rope}
    return {"model": model, "recurrence": {"sampler": "fixed", "depth": 1, "backprop_depth": 1}}


def _row_multiple(rows: int) -> int:
    """128 when it divides the rows (megatron's default padding), else the largest power of two that does: the
    rows stay exactly the source's and divide by as many tensor-parallel ranks as they can."""
    return 128 if rows % 128 == 0 else rows & -rows


# ---------------------------------------------------------------------------------------------------- weights

def qkv_from_hf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """q `[heads*d, ...]`, k and v `[groups*d, ...]` (weights or biases) -> megatron's fused projection, grouped
    by key/value head: `[g0: q_0 .. q_{n-1} k_0 v_0 | g1: ...]` with n = heads / groups query heads per group."""
    d = q.shape[0] // heads
    tail = q.shape[1:]
    per = heads // groups
    qg = q.reshape(groups, per * d, *tail)
    return torch.cat([qg, k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)], dim=1).reshape(
        (heads + 2 * groups) * d, *tail).contiguous()


def qkv_to_hf(w: torch.Tensor, heads: int, groups: int) -> tuple:
    """The inverse of `qkv_from_hf`: (q, k, v)."""
    per, tail = heads // groups, w.shape[1:]
    d = w.shape[0] // (heads + 2 * groups)
    g = w.reshape(groups, (per + 2) * d, *tail)
    q, k, v = g[:, :per * d], g[:, per * d:(per + 1) * d], g[:, (per + 1) * d:]
    return q.reshape(heads * d, *tail), k.reshape(groups * d, *tail), v.reshape(groups * d, *tail)


_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
          "self_attn.q_norm.weight": "self_attention.q_layernorm.weight",  # Qwen3 (model.qk_norm)
          "self_attn.k_norm.weight": "self_attention.k_layernorm.weight",
          "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
          "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
          "mlp.down_proj.weight": "mlp.linear_fc2.weight"}


def from_hf_state(hf: dict, cfg, split: Split) -> dict:
    """transformers state dict -> recurdepth model state dict (full tensors; adapter `[0 | I]`; the embedding
    and head with the source's rows: the import extends them, `extend_rows`, when the tokenizer gained some)."""
    m = cfg.model
    heads, groups = m.num_heads, m.num_query_groups or m.num_heads
    out = {}

    def take(name):
        if name not in hf:
            raise ExportError(f"the weights have no {name}; the directory does not hold the model its config.json "
                              f"describes")
        return hf[name]

    for stack, layers in split.stacks:
        for j, i in enumerate(layers):
            src, dst = f"model.layers.{i}.", f"{stack}.{j}."
            for a, b in _LAYER.items():
                if "q_layernorm" in b or "k_layernorm" in b:
                    if not m.qk_norm:
                        continue
                out[dst + b] = take(src + a)
            attn = src + "self_attn."
            out[dst + "self_attention.linear_qkv.weight"] = qkv_from_hf(
                take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight"), heads, groups)
            if m.qkv_bias != "none":
                out[dst + "self_attention.linear_qkv.bias"] = qkv_from_hf(
                    take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias"), heads, groups)
            out[dst + "mlp.linear_fc1.weight"] = torch.cat([take(src + "mlp.gate_proj.weight"),
                                                            take(src + "mlp.up_proj.weight")])
    emb = take("model.embed_tokens.weight")
    out["embedding.word_embeddings.weight"] = emb
    out["final_layernorm.weight"] = take("model.norm.weight")
    if not m.tie_embeddings:
        out["output_layer.weight"] = take("lm_head.weight")
    h = m.hidden_size
    out["adapter.proj.weight"] = torch.cat([torch.zeros(h, h, dtype=emb.dtype), torch.eye(h, dtype=emb.dtype)], 1)
    return out


def extend_rows(w: torch.Tensor, rows: int) -> torch.Tensor:
    """`w` with rows appended up to `rows`, each the mean of `w`'s rows (new tokens start where the average
    token is, not at a random point the model has never seen)."""
    if w.shape[0] >= rows:
        return w
    mean = w.double().mean(0, keepdim=True).to(w.dtype)
    return torch.cat([w, mean.expand(rows - w.shape[0], -1)]).contiguous()


def leftover_weights(hf: dict, split: Split) -> list[str]:
    """Source tensors the import does not use, other than the dropped layers' (these would be silently lost)."""
    used_layers = {*split.prelude, *split.core, *split.coda, *split.dropped}
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    left = []
    for name in hf:
        if name in known or name.endswith("rotary_emb.inv_freq"):
            continue
        parts = name.split(".")
        if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) in used_layers:
            rest = ".".join(parts[3:])
            if rest in _LAYER or rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")) \
                    or rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                continue
        left.append(name)
    return left


def read_llama(hf_dir: Path, core: str, prelude: Optional[str], coda: Optional[str], drop: Optional[str],
               seq_length: Optional[int]) -> tuple[dict, dict, Split]:
    """(raw recurdepth config, transformers state dict, split) of a Llama-family directory, all checked."""
    config = read_config_json(hf_dir)
    if config.get("model_type") == "huginn_raven":
        raise ExportError(f"{hf_dir} holds a huginn_raven model; import it with --format hf-huginn")
    kind = check_architecture(config)
    try:
        layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise ExportError(f"config.json has no usable num_hidden_layers; pass a complete {kind} directory") from None
    if core is None:
        raise ExportError("--format hf-llama needs --core START:STOP: the source layers to loop (e.g. --core 4:12 of "
                          f"{layers}); --prelude and --coda default to the layers before and after it")
    split = layer_split(layers, core, prelude, coda, drop)
    raw_config(config, 1, seq_length, split)  # refuses an unsupported model before its weights are read
    state = read_safetensors(hf_dir)
    if "model.embed_tokens.weight" not in state:
        raise ExportError(f"{hf_dir} has no model.embed_tokens.weight; it is not a complete {config.get('model_type')} "
                          f"checkpoint (transformers' save_pretrained writes one)")
    left = leftover_weights(state, split)
    if left:
        raise ExportError(f"the weights hold tensors this import has no place for ({', '.join(left[:3])}); they "
                          f"are not a {config.get('model_type')} model's as config.json describes it")
    return config, state, split


def model_rows(state: dict, tokenizer_vocab: int) -> int:
    """Embedding rows of the imported model: the source's, or the tokenizer's when its added special tokens
    reach past them."""
    return max(int(state["model.embed_tokens.weight"].shape[0]), int(tokenizer_vocab))


def describe(split: Split, layers: int) -> str:
    def span(idx):
        return f"{idx[0]}:{idx[-1] + 1}" if idx else "none"

    dropped = f", dropped {len(split.dropped)}" if split.dropped else ""
    return (f"prelude {span(split.prelude)}, core {span(split.core)}, coda {span(split.coda)} of {layers} "
            f"layers{dropped}")



# ---------------------------------------------------------------------------------------------------- export

def llama_incompatibilities(cfg) -> list[str]:
    """Each option of a model.kind=dense model that a Llama (or, with a q/k/v bias, Qwen2) config cannot hold."""
    m = cfg.model
    if m.kind != "dense":
        return [f"model.kind={m.kind!r} (--format hf-llama writes megatron GPTModels, model.kind=dense; a looped "
                f"model exports with --format hf-huginn)"]
    need = []
    for key, value in (("normalization", "RMSNorm"), ("activation", "swiglu")):
        if getattr(m, key) != value:
            need.append(f"model.{key}={getattr(m, key)!r} (Llama: {value!r})")
    if m.embedding_scale != 1.0:
        need.append(f"model.embedding_scale={m.embedding_scale:g} (Llama: 1)")
    if m.num_experts:
        need.append(f"model.num_experts={m.num_experts} (Llama: a dense MLP)")
    if m.qkv_bias == "qk":
        need.append("model.qkv_bias='qk' (Llama/Qwen2: none or qkv)")
    return need


def to_hf_state(state: dict, cfg) -> dict:
    """A model.kind=dense state dict (`gpt.` + megatron's local-spec names, full tensors) -> transformers'."""
    m = cfg.model
    heads, groups = m.num_heads, m.num_query_groups or m.num_heads
    back = {v: k for k, v in _LAYER.items()}
    out = {}
    for name, tensor in state.items():
        if not torch.is_tensor(tensor) or name.endswith("_extra_state"):
            continue
        name = name.removeprefix("gpt.")
        if name == "embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = tensor
        elif name == "decoder.final_layernorm.weight":
            out["model.norm.weight"] = tensor
        elif name == "output_layer.weight":
            if not m.tie_embeddings:
                out["lm_head.weight"] = tensor
        elif name.startswith("decoder.layers."):
            i, _, param = name.removeprefix("decoder.layers.").partition(".")
            dst = f"model.layers.{i}."
            if param in back:
                out[dst + back[param]] = tensor
            elif param in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
                kind = param.rsplit(".", 1)[1]
                for proj, part in zip("qkv", qkv_to_hf(tensor, heads, groups)):
                    out[f"{dst}self_attn.{proj}_proj.{kind}"] = part
            elif param == "mlp.linear_fc1.weight":
                gate, up = tensor.chunk(2)
                out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
            else:
                raise ExportError(f"parameter {name} has no place in a Llama model")
        else:
            raise ExportError(f"parameter {name} has no place in a Llama model")
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def llama_config(cfg, rows: int, layers: int, tok, dtype: str) -> dict:
    """config.json of the transformers model (LlamaForCausalLM; Qwen2ForCausalLM with a q/k/v bias)."""
    m = cfg.model
    qwen = m.qkv_bias == "qkv"
    if qwen and m.qk_norm:
        raise ExportError("model.qkv_bias=qkv with model.qk_norm=true is neither Qwen2 (no qk-norm) nor Qwen3 "
                          "(no bias)")
    kind = "qwen3" if m.qk_norm else "qwen2" if qwen else "llama"
    rope = {"rope_theta": m.rotary_base}
    if m.rope_scaling == "linear":
        rope["rope_scaling"] = {"rope_type": "linear", "factor": m.rope_scaling_factor}
    elif m.rope_scaling == "llama3":
        rope["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor,
                                "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
                                "original_max_position_embeddings": m.rope_original_max_positions}
    from recurdepth.model.layers import default_ffn_hidden_size

    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind]
    config = {"architectures": [arch], "model_type": kind, "hidden_size": m.hidden_size,
              "intermediate_size": m.ffn_hidden_size or default_ffn_hidden_size(m.hidden_size, m.activation),
              "num_hidden_layers": layers, "num_attention_heads": m.num_heads,
              "num_key_value_heads": m.num_query_groups or m.num_heads,
              "head_dim": m.head_width,
              "hidden_act": "silu", "max_position_embeddings": m.seq_length, "rms_norm_eps": m.norm_eps,
              "tie_word_embeddings": m.tie_embeddings, "vocab_size": rows, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": None, "eos_token_id": tok.eod, "pad_token_id": tok.pad, "torch_dtype": dtype,
              "use_cache": True, "recurdepth_config": cfg.to_dict(), **rope}
    if kind != "llama":
        config.update(use_sliding_window=False, sliding_window=None)
        if kind == "qwen2":
            del config["attention_bias"], config["mlp_bias"]
    return config


def export_llama(loaded, out_dir: Path, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    """Write a model.kind=dense checkpoint as a transformers directory (config.json, model.safetensors,
    generation_config.json, the tokenizer's files): staged beside `out_dir`, moved into place at the end."""
    import json

    from safetensors.torch import save_file

    from recurdepth.atomic import fsync_file, write_atomically
    from recurdepth.export.hf_huginn import (Staging, _publish, _tokenizer_files, check_export_target, real_path)
    from recurdepth.model.names import to_local

    out_dir = real_path(Path(out_dir))
    check_export_target(out_dir, overwrite)
    cfg = loaded.cfg
    bad = llama_incompatibilities(cfg)
    if bad:
        raise ExportError(f"the Llama format cannot represent {'; '.join(bad)}")
    tok_files = _tokenizer_files(cfg)
    state = to_hf_state(to_local(loaded.model.state_dict()), cfg)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    rows = state["model.embed_tokens.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    weights_dtype = str(state["model.embed_tokens.weight"].dtype).replace("torch.", "")
    staging = Staging(out_dir, "export")
    try:
        tmp, tok = staging.path, loaded.tokenizer
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fsync_file(tmp / "model.safetensors")
        write_atomically(tmp / "config.json", json.dumps(llama_config(cfg, rows, layers, tok, weights_dtype),
                                                         indent=2) + "\n")
        write_atomically(tmp / "generation_config.json", json.dumps(
            {"eos_token_id": tok.eod, "pad_token_id": tok.pad}, indent=2) + "\n")
        for name, src in tok_files.items():
            write_atomically(tmp / name, Path(src).read_bytes())
        _publish(tmp, out_dir)
    except BaseException as exc:
        staging.discard()
        if isinstance(exc, OSError):
            raise ExportError(f"writing the export to {out_dir} failed ({exc.strerror or exc}); removed the partial "
                              f"export beside it") from None
        raise
    staging.discard(parents=False)
    return out_dir
