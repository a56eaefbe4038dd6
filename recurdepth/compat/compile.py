"""`torch.compile` of the model's transformer blocks, one graph per block (`train.compile`).

Each block is compiled with torch's own `nn.Module.compile` (torch keeps the compiled call on the module; its
forward, parameters and state-dict keys stay as they are). The loop, its no-grad/grad split and activation
checkpointing stay eager, so the graphs are one block each (grad and no-grad variants), shared by every block of
the same shape. A block's graph must not break (tests/model/test_compile.py counts breaks): each break is a
separate graph and loses the fusion across it. What keeps it whole are rows "compile" of the table of megatron
patches in `recurdepth/compat/__init__.py`, applied after the one version gate:

- torch's dynamo config: `warnings.warn` is a reorderable logging function (megatron's one-time warnings would
  split the graph) and the recompile limit covers grad/no-grad x per-block constants;
- `RowParallelLinear._forward_impl` (class-level): megatron's `forward` passes `tp_group=None` to its matmul,
  which looks the default TP group up and, on rank 0, warns (DeprecationWarning) on every call: a break in every
  block. The group is unused on that path (row-parallel: no dgrad all-reduce, no sequence parallelism inside the
  matmul), so the layer's own group is passed instead.

RoPE: our attention (`RotarySelfAttention`) takes ready (cos, sin) tables; callers that pass them (the looped
model: `rope_cos_sin` before the block) keep cos/sin out of the graph, where inductor would otherwise fuse them
into the rotation and evaluate them once per element of q and k instead of once per position. Frequencies still
work (cos/sin are then computed inside the graph, without a break).
"""

from __future__ import annotations

import functools
import warnings

import torch

from recurdepth.compat.version import check_megatron_version

__all__ = ["apply_row_parallel_group_fix", "compile_blocks", "configure_dynamo"]

_WHAT = "recurdepth's torch.compile workarounds"
_MARK = "_recurdepth_compile_compat"


def compile_blocks(model: torch.nn.Module, block_types: tuple = ()) -> list:
    """Compile, in place, every submodule of `model` that is a megatron `TransformerLayer` or one of
    `block_types` (`nn.Module.compile(dynamic=False)`), after the workarounds that keep each one graph.
    Returns the compiled blocks. Raises CompatError for an untested megatron-core."""
    check_megatron_version(_WHAT)
    from megatron.core.transformer.transformer_layer import TransformerLayer

    kinds = (TransformerLayer, *block_types)
    blocks = [m for m in model.modules() if isinstance(m, kinds)]
    configure_dynamo(len(blocks))
    apply_row_parallel_group_fix()
    for block in blocks:
        block.compile(dynamic=False)
    return blocks


def configure_dynamo(num_blocks: int) -> None:
    """Dynamo settings for `num_blocks` compiled blocks (process-global; only ever relaxed)."""
    dynamo = torch._dynamo.config
    dynamo.reorderable_logging_functions.add(warnings.warn)  # megatron's one-time warnings would split the graph
    dynamo.recompile_limit = max(dynamo.recompile_limit, 4 * num_blocks)  # grad/no-grad x per-block constants


def apply_row_parallel_group_fix() -> bool:
    """Have `RowParallelLinear._forward_impl` use the layer's own TP group where megatron passes None (module
    docstring). Class-level, idempotent; returns True once applied."""
    check_megatron_version(_WHAT)
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    original = RowParallelLinear._forward_impl
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    def _forward_impl(self, input, weight, *args, **kwargs):
        if "tp_group" in kwargs and kwargs["tp_group"] is None:
            kwargs["tp_group"] = self.tp_group
        return original(self, input, weight, *args, **kwargs)

    setattr(_forward_impl, _MARK, True)
    RowParallelLinear._forward_impl = _forward_impl
    return True
