"""Hugging Face directories in the format of the published Huginn-0125 model (`model_type: huginn_raven`,
seal-rg/recurrent-pretraining `raven_modeling_minimal.py`), written from and read back into recurdepth weights.

    recurdepth                                    huginn_raven
    embedding.word_embeddings.weight              transformer.wte.weight (lm_head.weight tied to it)
    prelude.i / core.j / coda.i                   transformer.prelude.i / core_block.j / coda.i
      input_layernorm / post_attention_layernorm    norm_1 / norm_2
      pre_mlp_layernorm / post_mlp_layernorm        norm_3 / norm_4
      self_attention.linear_qkv  [h0:q k v | h1:q k v | ...], RoPE rotate-half
                                                    attn.Wqkv  [Q; K; V], RoPE on interleaved pairs (rows permuted)
      self_attention.linear_proj                    attn.proj
      mlp.linear_fc1 [gate; up] / linear_fc2        mlp.fc [gate; up] / mlp.proj
    adapter.proj.weight  W [s; e]                 transformer.adapter.weight  W [state; embeds]
    final_layernorm.weight                        transformer.ln_f.weight (Huginn applies it to s_r and after the coda)

      self_attention.linear_qkv.bias (qkv_bias: qk)  attn.qk_bias [2, 1, heads, head size]: the q and k parts
                                                    (same row order as Wqkv; Huginn adds them before RoPE, as
                                                    megatron's projection bias is); the v part is zero

Huginn's forward fixes some choices that are options in recurdepth; a model exports only with those
(`huginn_incompatibilities` names the others; a value bias, which Huginn has no place for, is refused when
the weights are written).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from recurdepth.atomic import commit_staged, fsync_dir, fsync_file, write_atomically
from recurdepth.config import Config, config_from_dict
from recurdepth.errors import CheckpointError, ConfigError, RecurdepthError
from recurdepth.model.names import to_local

MODEL_TYPE = "huginn_raven"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.model"
# parameter names inside one block: recurdepth -> huginn_raven
_BLOCK = {
    "input_layernorm.weight": "norm_1.weight",
    "self_attention.linear_qkv.weight": "attn.Wqkv.weight",
    "self_attention.linear_proj.weight": "attn.proj.weight",
    "post_attention_layernorm.weight": "norm_2.weight",
    "pre_mlp_layernorm.weight": "norm_3.weight",
    "mlp.linear_fc1.weight": "mlp.fc.weight",
    "mlp.linear_fc2.weight": "mlp.proj.weight",
    "post_mlp_layernorm.weight": "norm_4.weight",
}
QKV_BIAS, QK_BIAS = "self_attention.linear_qkv.bias", "attn.qk_bias"
_STACKS = {"prelude": "transformer.prelude", "core": "transformer.core_block", "coda": "transformer.coda"}
_TOP = {"embedding.word_embeddings.weight": "transformer.wte.weight", "adapter.proj.weight": "transformer.adapter.weight",
        "final_layernorm.weight": "transformer.ln_f.weight", "output_layer.weight": "lm_head.weight"}


# every file an export may write (config.json last when they are moved into place)
EXPORT_FILES = (WEIGHTS, "generation_config.json", TOKENIZER, "tokenizer.json", "special_tokens_map.json",
                "tokenizer_config.json", "config.json")


class ExportError(RecurdepthError):
    """A model or directory that the Huginn format cannot represent, or that is not in it."""


# ---------------------------------------------------------------------------------------------------- options

def huginn_incompatibilities(cfg: Config) -> list[str]:
    """Each model option whose value Huginn's architecture cannot represent, with the value it needs."""
    m = cfg.model
    if m.kind == "dense":  # a megatron GPTModel: its checkpoint is megatron's own format already
        return ["model.kind='dense' (a megatron GPTModel, not a looped model; megatron's own tools read its "
                "checkpoint)"]
    need = []
    for key, value in (("block_norm", "sandwich"), ("adapter", "concat"), ("normalization", "RMSNorm"),
                       ("activation", "swiglu"), ("norm_before_coda", True)):
        if getattr(m, key) != value:
            need.append(f"model.{key}={getattr(m, key)!r} (Huginn: {value!r})")
    if m.num_query_groups not in (None, m.num_heads):
        need.append(f"model.num_query_groups={m.num_query_groups} (Huginn: one key/value head per head)")
    if not math.isclose(m.embedding_scale, math.sqrt(m.hidden_size), rel_tol=1e-6):
        need.append(f"model.embedding_scale={m.embedding_scale:g} (Huginn: sqrt(hidden_size) = "
                    f"{math.sqrt(m.hidden_size):.10g})")
    if m.num_experts:
        need.append(f"model.num_experts={m.num_experts} (Huginn: a dense MLP)")
    if m.qkv_bias == "qkv":
        need.append("model.qkv_bias='qkv' (Huginn: 'qk' or 'none': it has no value bias)")
    if m.head_width * m.num_heads != m.hidden_size:
        need.append(f"model.head_dim={m.head_dim} (Huginn: hidden_size / num_heads)")
    if m.qk_norm:
        need.append("model.qk_norm=true (Huginn: no query/key norm)")
    if m.rope_scaling != "none":
        need.append(f"model.rope_scaling={m.rope_scaling!r} (Huginn: unscaled RoPE)")
    return need


def check_exportable(cfg: Config) -> None:
    bad = huginn_incompatibilities(cfg)
    if bad:
        raise ExportError(f"the Huginn format cannot represent {'; '.join(bad)}; train with Huginn's options "
                          f"(see docs/evaluation.md) to export this model")


def mean_recurrence(cfg: Config) -> int:
    """Huginn's default test-time depth: recurrence.eval_depth, else the sampler's mean (or fixed depth)."""
    from recurdepth.model.depth import eval_depth

    return eval_depth(cfg.recurrence)


def huginn_config(cfg: Config, vocab_rows: int, ffn: int, dtype: str = "float32") -> dict:
    """config.json of a huginn_raven model (the keys of Huginn-0125's RavenConfig), plus the recurdepth config
    under `recurdepth_config` so that `import` restores every setting."""
    m, r = cfg.model, cfg.recurrence
    return {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                     "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"},
        "model_type": MODEL_TYPE,
        "n_embd": m.hidden_size,
        "n_heads": m.num_heads,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_heads,
        "n_layers": m.prelude_layers + m.core_layers + m.coda_layers,
        "block_size": m.seq_length,
        "vocab_size": vocab_rows,
        "padding_multiple": m.make_vocab_size_divisible_by,
        "tie_embeddings": m.tie_embeddings,
        "intermediate_size": ffn,
        "bias": False,
        "architecture_class_name": "RecurrentGPT",
        "block_class_name": "SandwichBlock",
        "norm_class_name": "RMSNorm_llama",
        "norm_eps": m.norm_eps,
        "mlp_class_name": "GatedMLP",
        "nonlin_name": "SiLU",
        "init_strategy": "takase",
        "init_orthogonal": False,
        "state_init": "zero" if m.initial_state == "zeros" else "like-init",
        "injection_type": "linear",
        "n_layers_in_recurrent_block": m.core_layers,
        "mean_recurrence": mean_recurrence(cfg),
        "sampling_scheme": "poisson-lognormal-filling",
        "mean_backprop_depth": r.backprop_depth,
        "n_layers_in_prelude": m.prelude_layers,
        "n_layers_in_coda": m.coda_layers,
        "qk_bias": m.qkv_bias == "qk",
        "activation_checkpoint_impl": "per-iteration",
        "rope_base": m.rotary_base,
        "torch_dtype": dtype,
        "transformers_version": "4.47.1",
        "recurdepth_config": cfg.to_dict(),
    }


# ---------------------------------------------------------------------------------------------------- weights

def rope_pair_order(head_dim: int) -> torch.Tensor:
    """Row order that turns a rotate-half head (pairs i, i + d/2) into an interleaved one (pairs 2i, 2i + 1)."""
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


def qkv_to_huginn(w: torch.Tensor, heads: int) -> torch.Tensor:
    """megatron `[h0: q k v | h1: q k v | ...]` (one key/value group per head) -> Huginn `[Q; K; V]`, with the
    q and k rows of every head in interleaved RoPE order (q.k is unchanged: both permuted alike)."""
    d = w.shape[0] // (3 * heads)
    q, k, v = w.view(heads, 3, d, -1).unbind(1)  # each [heads, d, h]
    order = rope_pair_order(d)
    return torch.cat([q[:, order], k[:, order], v]).reshape(3 * heads * d, -1).contiguous()


def qkv_from_huginn(w: torch.Tensor, heads: int) -> torch.Tensor:
    d = w.shape[0] // (3 * heads)
    q, k, v = w.view(3, heads, d, -1).unbind(0)
    inverse = torch.argsort(rope_pair_order(d))
    return torch.stack([q[:, inverse], k[:, inverse], v], dim=1).reshape(3 * heads * d, -1).contiguous()


def qk_bias_to_huginn(bias: torch.Tensor, heads: int, name: str = "linear_qkv.bias") -> torch.Tensor:
    """megatron's q/k/v projection bias `[h0: q k v | ...]` -> Huginn's `qk_bias` `[2, 1, heads, d]` (q, k in
    interleaved RoPE order); ExportError when the value part is non-zero (Huginn has no value bias)."""
    d = bias.shape[0] // (3 * heads)
    q, k, v = bias.view(heads, 3, d).unbind(1)
    if v.abs().max() > 0:
        raise ExportError(f"{name} has a non-zero value part; Huginn's format holds a bias on queries and keys only")
    order = rope_pair_order(d)
    return torch.stack([q[:, order], k[:, order]])[:, None].contiguous()


def qk_bias_from_huginn(qk: torch.Tensor, heads: int, name: str = "attn.qk_bias") -> torch.Tensor:
    """Huginn's `qk_bias` `[2, 1, heads, d]` -> megatron's projection bias `[h0: q k v | ...]` (value part zero)."""
    if qk.dim() != 4 or qk.shape[:3] != (2, 1, heads):
        raise CheckpointError(f"{name} has shape {tuple(qk.shape)}, not [2, 1, {heads} heads, head size]: the "
                              f"Huginn weights do not fit the model their config describes")
    inverse = torch.argsort(rope_pair_order(qk.shape[-1]))
    q, k = qk[0, 0][:, inverse], qk[1, 0][:, inverse]
    return torch.stack([q, k, torch.zeros_like(q)], dim=1).reshape(-1).contiguous()


def huginn_freqs_cis(head_dim: int, block_size: int, base: float) -> torch.Tensor:
    """Huginn's persistent `freqs_cis` buffer `[1, block, 1, d/2, 2]` (cos, sin; float32, as its code computes)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(block_size, dtype=torch.float32), inv).float()
    return torch.stack([freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]], dim=4)


def to_huginn_state(state: dict, cfg: Config) -> dict:
    """recurdepth model state dict (local-spec names: `recurdepth.model.names.to_local`; full tensors, TP = 1)
    -> huginn_raven state dict."""
    heads = cfg.model.num_heads
    out = {}
    for name, tensor in state.items():
        if not torch.is_tensor(tensor) or name.endswith("_extra_state"):
            continue
        if name == "output_layer.weight" and cfg.model.tie_embeddings:
            continue
        stack, _, rest = name.partition(".")
        if stack in _STACKS:
            index, _, param = rest.partition(".")
            if param == QKV_BIAS:
                out[f"{_STACKS[stack]}.{index}.{QK_BIAS}"] = qk_bias_to_huginn(tensor, heads, name)
                continue
            if param not in _BLOCK:
                raise ExportError(f"parameter {name} has no place in the Huginn format")
            if param == "self_attention.linear_qkv.weight":
                tensor = qkv_to_huginn(tensor, heads)
            out[f"{_STACKS[stack]}.{index}.{_BLOCK[param]}"] = tensor
        elif name in _TOP:
            out[_TOP[name]] = tensor
        else:
            raise ExportError(f"parameter {name} has no place in the Huginn format")
    m = cfg.model
    out["freqs_cis"] = huginn_freqs_cis(m.hidden_size // heads, m.seq_length, m.rotary_base)
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def from_huginn_state(hf: dict, cfg: Config) -> dict:
    """huginn_raven state dict -> recurdepth model state dict (full tensors)."""
    heads = cfg.model.num_heads
    back_block = {v: k for k, v in _BLOCK.items()}
    back_stack = {v: k for k, v in _STACKS.items()}
    back_top = {v: k for k, v in _TOP.items()}
    out = {}
    for name, tensor in hf.items():
        if name == "freqs_cis":
            continue
        if name == "lm_head.weight" and cfg.model.tie_embeddings:
            continue
        if name.endswith(QK_BIAS):
            head, index, _ = _split_block_name(name)
            if head not in back_stack:
                raise ExportError(f"unexpected parameter {name} in a huginn_raven checkpoint")
            if cfg.model.qkv_bias == "qk":
                out[f"{back_stack[head]}.{index}.{QKV_BIAS}"] = qk_bias_from_huginn(tensor, heads, name)
            elif tensor.abs().max() > 0:
                raise ExportError(f"{name} is non-zero but config.json says qk_bias: false; set qk_bias: true there "
                                  f"(the bias is then imported) or remove the tensor")
            continue
        if name in back_top:
            out[back_top[name]] = tensor
            continue
        head, index, param = _split_block_name(name)
        if head not in back_stack or param not in back_block:
            raise ExportError(f"unexpected parameter {name} in a huginn_raven checkpoint")
        if param == "attn.Wqkv.weight":
            if tensor.dim() != 2 or tensor.shape[0] % (3 * heads):
                raise CheckpointError(f"{name} has shape {tuple(tensor.shape)}, not [3 x {heads} heads x head "
                                      f"size, hidden]: the Huginn weights do not fit the model their config "
                                      f"describes")
            tensor = qkv_from_huginn(tensor, heads)
        out[f"{back_stack[head]}.{index}.{back_block[param]}"] = tensor
    return out


def _split_block_name(name: str) -> tuple[str, str, str]:
    parts = name.split(".")
    for width in (2, 1):
        head = ".".join(parts[:width])
        if head in _STACKS.values() and len(parts) > width + 1:
            return head, parts[width], ".".join(parts[width + 1:])
    return "", "", ""


# ---------------------------------------------------------------------------------------------------- directories

def real_path(path: Path) -> Path:
    """`path`, or the folder it links to: staged output is renamed onto the real folder, never onto a link."""
    return path.resolve() if path.is_symlink() else path


def _nearest_existing(path: Path) -> Path:
    for p in [path, *path.parents]:
        if p.exists() or p.is_symlink():
            return p
    return Path(".")


def check_output_path(out_dir: Path, what: str) -> None:
    """`out_dir` can become a directory: it is not a regular file, no folder above it is one, and the nearest
    existing folder is writable. One-line ExportError otherwise."""
    out_dir = Path(out_dir)
    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is an existing file, not a directory; give a new or empty directory for "
                          f"the {what}")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise ExportError(f"cannot write the {what} to {out_dir}: {parent} is a regular file, not a "
                              f"directory; choose another output path")
    base = _nearest_existing(out_dir if out_dir.exists() else out_dir.parent)
    if not os.access(base, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write the {what} to {out_dir}: {base} is not writable (permission denied); "
                          f"choose a writable location")


def check_export_target(out_dir: Path, overwrite: bool = False) -> None:
    """Refuse an export into a regular file, under one, or into a non-empty directory without `overwrite`."""
    out_dir = Path(out_dir)
    check_output_path(out_dir, "export")
    if out_dir.is_dir() and not overwrite:
        entries = sorted(p.name for p in out_dir.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ExportError(f"{out_dir} is not empty ({len(entries)} entries: {shown}); export into a new or empty "
                              f"directory, or pass --overwrite to replace the export's files in it")


class Staging:
    """A fresh folder beside `out_dir` (same file system, so the result is renamed into place), and the
    parent folders made for it; `discard()` removes the folder, and those parents when they are empty."""

    def __init__(self, out_dir: Path, kind: str):
        out_dir = Path(out_dir)
        self.made = [p for p in [out_dir.parent, *out_dir.parent.parents] if not p.exists()]
        self.path = out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}.tmp"
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)  # left by a killed earlier attempt of this pid
            self.path.mkdir()
        except OSError as exc:
            self.discard()
            raise ExportError(f"cannot write beside {out_dir} ({exc.strerror or exc}); choose a writable output "
                              f"path") from None

    def discard(self, parents: bool = True) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        for p in self.made if parents else ():
            try:
                p.rmdir()
            except OSError:
                break


def _stale_export_files(out_dir: Path, written: set) -> list[Path]:
    """Files of an earlier export in `out_dir` that this one does not write (a sharded index and its shards,
    a tokenizer from a sentencepiece run): left in place they would be read instead of, or with, the new files."""
    stale = [out_dir / n for n in EXPORT_FILES if n not in written and (out_dir / n).is_file()]
    index = out_dir / (WEIGHTS + ".index.json")
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, OSError, AttributeError):
            shards = set()
        shards = {n for n in shards if isinstance(n, str) and n and "/" not in n and not n.startswith(".")}
        stale += [out_dir / n for n in sorted(shards) if n not in written and (out_dir / n).is_file()] + [index]
    return stale


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished export in `tmp` to `out_dir`: one rename when `out_dir` is new or empty; otherwise
    (--overwrite) each file replaced atomically, config.json last, and stale export files removed."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)  # the rename survives a crash
        return
    written = {p.name for p in tmp.iterdir()}
    for stale in _stale_export_files(out_dir, written):
        stale.unlink()
    commit_staged((tmp / name, out_dir / name)
                  for name in sorted(written, key=lambda n: EXPORT_FILES.index(n) if n in EXPORT_FILES else -1))
    tmp.rmdir()


def export_huginn(loaded, out_dir: Path, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    """Write `out_dir/{config.json, model.safetensors, generation_config.json}` (+ tokenizer files) for the loaded
    model (`recurdepth.infer.loading.LoadedModel`). Everything is written into a folder beside `out_dir` and
    moved into place at the end, so a failure leaves `out_dir` as it was; a non-empty `out_dir` is refused
    unless `overwrite`."""
    out_dir = real_path(Path(out_dir))
    check_export_target(out_dir, overwrite)
    cfg = loaded.cfg
    check_exportable(cfg)
    tok_files = _tokenizer_files(cfg)
    from safetensors import SafetensorError

    staging = Staging(out_dir, "export")
    try:
        _write_export(loaded, cfg, tok_files, staging.path, dtype)
        _publish(staging.path, out_dir)
    except BaseException as exc:
        staging.discard()
        if isinstance(exc, (OSError, SafetensorError)):
            reason = getattr(exc, "strerror", None) or " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ExportError(f"writing the export to {out_dir} failed ({reason}); removed the partial export "
                              f"beside it") from None
        raise
    staging.discard(parents=False)  # the folder itself is gone: renamed to out_dir, or emptied into it
    return out_dir


def _write_export(loaded, cfg: Config, tok_files: dict, out_dir: Path, dtype: Optional[torch.dtype]) -> None:
    from safetensors.torch import save_file

    state = to_huginn_state(to_local(loaded.model.state_dict()), cfg)
    if dtype is not None:
        state = {k: (v if k == "freqs_cis" else v.to(dtype)) for k, v in state.items()}
    rows, _ = state["transformer.wte.weight"].shape
    ffn = state[f"{_STACKS['core']}.0.mlp.proj.weight"].shape[1]
    weights_dtype = str(state["transformer.wte.weight"].dtype).replace("torch.", "")
    save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt"})
    fsync_file(out_dir / WEIGHTS)  # on disk before the folder is renamed into place (write_atomically: the rest)
    config = huginn_config(cfg, rows, ffn, weights_dtype)
    tok = loaded.tokenizer
    config.update(pad_token_id=tok.pad, eos_token_id=tok.eod, recurdepth_tokenizer=cfg.data.tokenizer,
                  recurdepth_vocab_size=loaded.vocab_size)
    write_atomically(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    write_atomically(out_dir / "generation_config.json", json.dumps(
        {"eos_token_id": tok.eod, "pad_token_id": tok.pad, "transformers_version": "4.47.1"}, indent=2) + "\n")
    for name, src in tok_files.items():  # a Hugging Face tokenizer's files as they are; a sentencepiece model
        write_atomically(out_dir / name, Path(src).read_bytes())
    if TOKENIZER in tok_files:
        write_atomically(out_dir / "tokenizer_config.json", json.dumps(
            {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
             "pad_token": "<pad>", "eos_token": "<eod>", "unk_token": "<unk>", "legacy": False}, indent=2) + "\n")


def _tokenizer_files(cfg: Config) -> dict:
    """The tokenizer files to export alongside (name in the export -> file): the sentencepiece model, or a
    Hugging Face tokenizer's tokenizer.json with the config files beside it; none for the byte tokenizer.
    A missing file -> ExportError."""
    kind = cfg.data.tokenizer
    if kind not in ("sentencepiece", "hf"):
        return {}
    from recurdepth.data.tokenizer import hf_tokenizer_files, resolve_model_path

    try:
        if kind == "sentencepiece":
            return {TOKENIZER: resolve_model_path(cfg.data.tokenizer_model)}
        return hf_tokenizer_files(cfg.data.tokenizer_model)
    except RecurdepthError:
        raise ExportError(f"the checkpoint's tokenizer {cfg.data.tokenizer_model!r} is missing; it is exported "
                          f"alongside the weights, so restore it (or train with it) first") from None


def read_config_json(in_dir: Path) -> dict:
    """A Hugging Face model directory's config.json as a dict; one-line ExportError when it is missing or bad."""
    in_dir = Path(in_dir)
    config_file = in_dir / "config.json"
    if not in_dir.is_dir():
        raise ExportError(f"{in_dir} is not a directory; pass a Hugging Face model directory (config.json and "
                          f"model.safetensors, as save_pretrained writes them)")
    if not config_file.is_file():
        raise ExportError(f"{in_dir} has no config.json; pass a directory written by `recurdepth export` or "
                          f"save_pretrained")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{config_file} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read {config_file} ({getattr(exc, 'strerror', None) or exc})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{config_file} holds a JSON {type(config).__name__}, not an object; pass a Hugging Face "
                          f"model directory")
    return config


def read_safetensors(in_dir: Path) -> dict:
    """Every tensor of `in_dir/model.safetensors` (or the shards its `.index.json` names)."""
    from safetensors.torch import load_file

    in_dir = Path(in_dir)
    index = in_dir / (WEIGHTS + ".index.json")
    files = _weight_files(index) if index.is_file() else [WEIGHTS]
    state = {}
    for name in files:
        path = in_dir / name
        if not path.is_file():
            other = sorted(p.name for p in in_dir.glob("*.bin"))
            hint = (f" (it holds {', '.join(other[:2])}: load it with transformers and save_pretrained it with "
                    f"safe_serialization, the default)") if other else "; the directory is incomplete"
            raise ExportError(f"{path} is missing{hint}")
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise ExportError(f"{path} is not a readable safetensors file ({reason}): it is truncated or corrupt; "
                              f"export or download it again") from None
        state.update(tensors)
    return state


def read_huginn(in_dir: Path) -> tuple[dict, dict]:
    """(config.json, state dict) of a huginn_raven directory (one or sharded safetensors files)."""
    in_dir = Path(in_dir)
    config = read_config_json(in_dir)
    if config.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{in_dir} holds a {config.get('model_type')!r} model, not {MODEL_TYPE!r}; import it with "
                          f"--format hf-llama if it is a Llama-family model (recurdepth import --help)")
    state = read_safetensors(in_dir)
    if "transformer.wte.weight" not in state:
        raise ExportError(f"{in_dir} has no transformer.wte.weight (the embedding); it is not a complete "
                          f"huginn_raven checkpoint")
    return config, state


def _weight_files(index: Path) -> list[str]:
    """The safetensors shards a `model.safetensors.index.json` names."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
        files = sorted(set(weight_map.values()))
    except (ValueError, OSError, AttributeError, TypeError):
        raise ExportError(f"{index} is not a safetensors index (a JSON object with a weight_map); export or "
                          f"download it again") from None
    if not files or not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..") for f in files):
        raise ExportError(f"{index} names no usable weight files; export or download it again")
    return files


def recurdepth_config_from_huginn(config: dict, tokenizer_model: Optional[Path], rows: int,
                                  tokenizer_kind: str = "sentencepiece",
                                  tokenizer_vocab: Optional[int] = None) -> Config:
    """The recurdepth config of a huginn_raven model: the stored one when recurdepth exported it, else built
    from Huginn's keys (with Huginn's fixed choices; embedding rows for at least `tokenizer_vocab` ids)."""
    if "recurdepth_config" in config:
        raw = config["recurdepth_config"]
        if not isinstance(raw, dict):
            raise ExportError("config.json's recurdepth_config is not an object; export the checkpoint again")
    else:
        try:
            raw = _raw_config_from_huginn(config, max(rows, tokenizer_vocab or 0))
        except KeyError as exc:
            raise ExportError(f"config.json has no {exc.args[0]!r}, which a huginn_raven config needs; pass a "
                              f"complete Hugging Face huginn_raven directory") from None
        except (TypeError, ValueError) as exc:
            raise ExportError(f"config.json has a value of the wrong type ({' '.join(str(exc).split())[:160]}); "
                              f"pass a valid huginn_raven directory") from None
    raw = json.loads(json.dumps(raw))  # a private copy
    if tokenizer_model is not None:
        raw.setdefault("data", {}).update(tokenizer=tokenizer_kind, tokenizer_model=str(tokenizer_model.resolve()))
    elif tokenizer_kind == "byte":  # --tokenizer byte
        raw.setdefault("data", {}).update(tokenizer="byte", tokenizer_model=None)
    for section in ("parallel",):
        raw.pop(section, None)  # the imported checkpoint reshards: the layout is chosen when it is loaded
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ExportError(f"the Huginn config cannot be expressed as a recurdepth config ({exc})") from None


def _raw_config_from_huginn(config: dict, rows: int) -> dict:
    """The recurdepth config sections of a foreign huginn_raven config.json (Huginn's fixed choices)."""
    heads = config.get("n_heads", config.get("num_attention_heads"))
    if heads is None:
        raise KeyError("n_heads")
    h, heads = int(config["n_embd"]), int(heads)
    if config.get("n_kv_heads", heads) != heads or config.get("bias", False):
        raise ExportError("only Huginn models with one key/value head per head and no linear biases (bias: false; "
                          "the q/k bias, qk_bias: true, imports) import")
    divisible = 128 if rows % 128 == 0 else rows & -rows  # the rows exactly, divisible by as many TP ranks as can be
    raw = {"model": {"hidden_size": h, "num_heads": heads, "ffn_hidden_size": int(config["intermediate_size"]),
                     "prelude_layers": int(config["n_layers_in_prelude"]),
                     "core_layers": int(config["n_layers_in_recurrent_block"]),
                     "coda_layers": int(config["n_layers_in_coda"]), "seq_length": int(config["block_size"]),
                     "vocab_size": rows, "make_vocab_size_divisible_by": divisible, "adapter": "concat",
                     "block_norm": "sandwich",
                     "normalization": "RMSNorm", "norm_eps": float(config.get("norm_eps", 1e-6)),
                     "activation": "swiglu", "tie_embeddings": bool(config.get("tie_embeddings", True)),
                     "embedding_scale": math.sqrt(h), "norm_before_coda": True,
                     "rotary_base": float(config.get("rope_base", 50000.0)),
                     "qkv_bias": "qk" if config.get("qk_bias") else "none",
                     "initial_state": "zeros" if config.get("state_init") == "zero" else "trunc_normal"},
           "recurrence": {"mean": float(config.get("mean_recurrence", 32)),
                          "backprop_depth": int(config.get("mean_backprop_depth", 8))}}
    return raw


def check_imported_shapes(model_state: dict, weights: dict) -> None:
    """Every model parameter present with the same shape, and nothing left over."""
    expected = {k: v.shape for k, v in model_state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k])}" for k in expected
             if k in weights and weights[k].shape != expected[k]]
    if missing or extra or wrong:
        detail = "; ".join(filter(None, [f"missing {', '.join(missing[:3])}" if missing else "",
                                         f"unexpected {', '.join(extra[:3])}" if extra else "",
                                         f"shape {', '.join(wrong[:3])}" if wrong else ""]))
        raise CheckpointError(f"the Huginn weights do not fit the model their config describes ({detail})")
