"""Engines: what does data parallelism, gradient reduction and the optimizer step (`train.engine`).

`base.Engine` is the protocol a step uses (its docstring lists the verbs and their order); `megatron` is
megatron-core's DDP and optimizer, `deepspeed` DeepSpeed ZeRO. `build_engine` wraps a built model in the
configured one; build the model in `model_dtype(cfg, dtype)` first (DeepSpeed keeps fp32 weights itself).
"""

from __future__ import annotations

import torch

from recurdepth.errors import ConfigError
from recurdepth.train.engine.base import Engine
from recurdepth.train.engine.deepspeed import DeepSpeedEngine
from recurdepth.train.engine.megatron import MegatronEngine

__all__ = ["ENGINES", "DeepSpeedEngine", "Engine", "MegatronEngine", "build_engine", "engine_class", "model_dtype"]

ENGINES: dict[str, type] = {"megatron": MegatronEngine, "deepspeed": DeepSpeedEngine}


def engine_class(cfg) -> type:
    """The Engine subclass `train.engine` names."""
    name = cfg.train.engine
    if name not in ENGINES:
        raise ConfigError(f"train.engine={name!r} is not an engine; available: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]


def model_dtype(cfg, dtype: torch.dtype) -> torch.dtype:
    """The dtype to build the model in for the configured engine, computing in `dtype`."""
    return engine_class(cfg).model_dtype(dtype)


def build_engine(cfg, model: torch.nn.Module, dtype: torch.dtype, device: torch.device, dp_size: int = 1,
                 local_rank: int = 0) -> Engine:
    """`model` wrapped in the configured engine, with its optimizer and LR schedule."""
    return engine_class(cfg)(cfg, model, dtype, device, dp_size=dp_size, local_rank=local_rank)
