"""One map between the parameter names of the two layer specs (torch-free).

TransformerEngine's spec fuses a block's first norm into its qkv projection and the MLP's norm into fc1
(`TELayerNormColumnParallelLinear`), so a TE-spec block names n1 and n3 `self_attention.linear_qkv.layer_norm_*`
and `mlp.linear_fc1.layer_norm_*`, and gives every TE module an `_extra_state` (FP8 metadata). The local spec
(CPU, eval, export) names them `input_layernorm.*` and `pre_mlp_layernorm.*`; its megatron linears have an
`_extra_state` too, always empty.

Checkpoints are written in the local names, whatever spec trained them (`LoopedTransformerLayer.sharded_state_dict`
maps TE names to local ones and leaves TE's extra state out: recurdepth trains no FP8, so it holds nothing to
keep), so resume, eval, export and import read one format; `to_local` and `to_spec` convert plain state dicts
(export, import, tests) in both directions.
"""

from __future__ import annotations

from typing import Iterable, Optional

# TE-spec suffix inside a block -> local-spec suffix (MoE blocks keep a separate pre-MLP norm in both specs)
TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
LOCAL_TO_TE = {local: te for te, local in TE_TO_LOCAL.items()}
EXTRA_STATE = "_extra_state"


def _swap_suffix(name: str, table: dict) -> str:
    for old, new in table.items():
        if name == old or name.endswith("." + old):
            return name[: len(name) - len(old)] + new
    return name


def local_name(name: str) -> Optional[str]:
    """The local-spec name of a (local or TE) parameter name; None for TE's `_extra_state` entries."""
    if name.rsplit(".", 1)[-1] == EXTRA_STATE:
        return None
    return _swap_suffix(name, TE_TO_LOCAL)


def to_local(state: dict) -> dict:
    """A state dict in local-spec names (TE's extra state dropped); a local-spec state dict is returned as is."""
    out = {}
    for name, value in state.items():
        new = local_name(name)
        if new is None:
            continue
        if new in out:
            raise KeyError(f"{name} and another parameter both map to {new}: a state dict with both specs' names")
        out[new] = value
    return out


def to_spec(state: dict, names: Iterable[str]) -> dict:
    """`state` (either spec's names) renamed to the names of a model whose state dict keys are `names`: for a TE
    model the fused norms take their TE names; `_extra_state` entries are not filled (take the model's own)."""
    local = to_local(state)
    out = {}
    for name in names:
        key = local_name(name)
        if key is not None and key in local:
            out[name] = local.pop(key)
    out.update(local)  # names the model does not have: left for load_state_dict to report
    return out


def with_extra_state(model, state: dict) -> dict:
    """`state` completed with the model's own `_extra_state` entries, which checkpoints do not hold (a TE model
    loads a checkpoint with `load_state_dict(strict=True)`, which expects them)."""
    own = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] == EXTRA_STATE}
    return {**own, **state}
