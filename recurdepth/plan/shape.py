"""What a config builds, as plan counts it: the vocabulary (`recurdepth.model.vocab.model_vocab_size`, the rule
training builds with), the recurrence depths (`recurdepth.model.depth`'s), the block dimensions and the
parameters each pipeline stage holds."""

from __future__ import annotations

import dataclasses
from typing import Optional

from recurdepth.config import Config
from recurdepth.errors import ConfigError
from recurdepth.model import depth
from recurdepth.model.vocab import model_vocab_size


# ---------------------------------------------------------------------------------------------- vocabulary


def tokenizer_vocab_size(cfg: Config) -> int:
    """The configured tokenizer's vocabulary size (data.tokenizer, data.tokenizer_model)."""
    from recurdepth.data.tokenizer import build_tokenizer

    try:
        return build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model).vocab_size
    except Exception as exc:  # noqa: BLE001 - a missing/unreadable tokenizer model
        raise ConfigError(f"cannot read the vocabulary size of data.tokenizer={cfg.data.tokenizer} ({exc}); set "
                          f"model.vocab_size or pass --vocab-size") from None


def resolve_vocab_size(cfg: Config, vocab_size: Optional[int] = None) -> int:
    """The vocabulary the embedding and head are built with, by training's own rule
    (`recurdepth.model.vocab.model_vocab_size`): model.vocab_size when set (refused when smaller than the
    tokenizer's), else the tokenizer's, padded to model.make_vocab_size_divisible_by. `vocab_size`
    (--vocab-size) is the tokenizer's size, given instead of reading data.tokenizer. With model.vocab_size set
    an unreadable tokenizer is not checked (plan loads no data; training reads it)."""
    if vocab_size is not None:
        tokenizer = int(vocab_size)
    elif cfg.model.vocab_size is None:
        tokenizer = tokenizer_vocab_size(cfg)
    else:
        try:
            tokenizer = tokenizer_vocab_size(cfg)
        except ConfigError:
            tokenizer = cfg.model.vocab_size  # not known: assume it fits, as the refusal needs the real one
    return model_vocab_size(cfg, tokenizer)


# ---------------------------------------------------------------------------------------------- depth


def max_recurrence(cfg: Config) -> float:
    """The largest r the sampler can draw (inf when unbounded): `recurdepth.model.depth.max_depth`."""
    return depth.max_depth(cfg.recurrence)


def mean_recurrence(cfg: Config) -> float:
    """r used for FLOPs: `recurdepth.model.depth.mean_depth` (the configured mean, depth or (low+high)/2, capped
    by max_depth)."""
    return depth.mean_depth(cfg.recurrence)


def grad_iterations(cfg: Config) -> int:
    """g = min(largest r the sampler can draw, k): the iterations whose activations a micro-batch keeps."""
    return int(min(max_recurrence(cfg), cfg.recurrence.backprop_depth))


# ---------------------------------------------------------------------------------------------- parameters


def dims(cfg: Config) -> dict:
    from recurdepth.model.layers import default_ffn_hidden_size

    m = cfg.model
    h = m.hidden_size
    head_dim = m.head_width
    f = m.ffn_hidden_size or default_ffn_hidden_size(h, m.activation)
    return dict(h=h, q=m.num_heads * head_dim, kv=(m.num_query_groups or m.num_heads) * head_dim, f=f, a=m.num_heads,
                qk_norm=2 * head_dim if m.qk_norm else 0,
                f_moe=m.moe_ffn_hidden_size or f, norm=2 if m.normalization == "LayerNorm" else 1)


def is_moe(cfg: Config, block: str) -> bool:
    """Whether a block of kind `block` ("core" or "outer") is a mixture of experts."""
    return bool(cfg.model.num_experts) and (block == "core" or cfg.model.moe_layers == "all")


def layer_params(cfg: Config, tp: int, ep: int, moe: bool) -> tuple[int, int]:
    """(dense, expert) parameters of one transformer block on one rank (TP-sharded; experts E/EP per rank)."""
    m, d = cfg.model, dims(cfg)
    h, kv, f = d["h"], d["kv"], d["f"]
    norms = (4 if m.block_norm == "sandwich" else 2) * d["norm"] * h + d["qk_norm"]
    attention = h * (d["q"] + 2 * kv) // tp + d["q"] * h // tp
    mlp_per = (3 if m.activation == "swiglu" else 2) * h
    if not moe:
        return norms + attention + mlp_per * f // tp, 0
    router = m.num_experts * h
    experts = (m.num_experts // ep) * (mlp_per * d["f_moe"] // tp)
    return norms + attention + router, experts


def core_layers_on(cfg: Config, stage: int, pp: int) -> int:
    """Core blocks held by pipeline stage `stage`: R/p (looped split), or all on stage 0 (naive split)."""
    m = cfg.model
    if cfg.parallel.pipeline_split == "naive" and pp > 1:
        return m.core_layers if stage == 0 else 0
    return m.core_layers // pp


def stage_params(cfg: Config, vocab: int, tp: int, pp: int, ep: int) -> list[tuple[int, int]]:
    """(dense, expert) parameters held by one rank of each pipeline stage."""
    m, d = cfg.model, dims(cfg)
    h = d["h"]
    out = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        dense = expert = 0
        for count, block in ((m.prelude_layers if first else 0, "outer"), (core_layers_on(cfg, s, pp), "core"),
                             (m.coda_layers if last else 0, "outer")):
            dl, el = layer_params(cfg, tp, ep, is_moe(cfg, block))
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
