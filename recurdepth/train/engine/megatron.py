"""The megatron engine (`train.engine: megatron`, the default): megatron-core `DistributedDataParallel` and its
optimizer (`optimizer.distributed`: the DistributedOptimizer, state sharded over data-parallel ranks), with
tensor, pipeline and expert parallelism. Gradients accumulate in DDP's fp32 buffers; `finalize_model_grads`
reduces them and scales them by 1 / the global token count (which it all-reduces in place). Checkpoints are
megatron's dist_checkpointing format (`checkpoint.ShardedState`), reloadable under any layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from recurdepth.train.checkpoint import ShardedState
from recurdepth.train.engine.base import Engine
from recurdepth.train.guards import grads_finite
from recurdepth.train.optimizer import build_optimizer


class MegatronEngine(Engine):
    name = "megatron"

    def __init__(self, cfg, model, dtype: torch.dtype, device: torch.device, dp_size: int = 1, local_rank: int = 0):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        self.cfg, self.device = cfg, device
        self.model = DistributedDataParallel(
            config=model.config, module=model,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.train.overlap_grad_reduce,
                use_distributed_optimizer=cfg.optimizer.distributed))
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model, dtype)
        self.checkpoint = ShardedState(self.model, self.optimizer)

    def label(self) -> str:
        return "megatron " + ("distributed optimizer" if self.cfg.optimizer.distributed else "DDP")

    def weights_loaded(self) -> None:
        self.optimizer.reload_model_params()  # main (fp32) parameters from the model's, as megatron's finetuning

    def prepare(self, tokens: torch.Tensor) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def reduce_gradients(self, tokens: torch.Tensor) -> None:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads([self.model], num_tokens=tokens)  # all-reduces `tokens` in place

    def grads_finite(self) -> bool:
        return grads_finite(self.model, self.device)

    def step(self, bad: Optional[str]) -> tuple[float, Optional[str]]:
        if bad is not None:
            return float("nan"), bad
        _, grad_norm, _ = self.optimizer.step()
        return float(grad_norm) if grad_norm is not None else float("nan"), None

    def save_state(self, tmp: Path, common: dict) -> None:
        self.checkpoint.save_state(tmp, common)

    def load_state(self, path: Path, meta: dict) -> dict:
        return self.checkpoint.load_state(path, meta)
