"""The optimizer and the LR / weight-decay schedule, for both engines, built here only.

Both engines give the same update: AdamW over megatron-core's parameter groups (no weight decay on biases and
1-D parameters) and megatron-core's `OptimizerParamScheduler` (warmup, then cosine / constant / WSD / linear
decay) driving the optimizer's param groups. The megatron engine takes megatron's own optimizer
(`build_optimizer`: DistributedOptimizer when `optimizer.distributed`, state sharded over data-parallel ranks);
DeepSpeed wraps a torch AdamW over the same groups (`adamw`), and both get their schedule from
`build_scheduler`.
"""

from __future__ import annotations

import torch

from recurdepth.config import Config

_SCHEDULE_NAMES = {"cosine": "cosine", "constant": "constant", "wsd": "WSD", "linear": "linear"}


def build_optimizer(cfg: Config, ddp_model, dtype: torch.dtype):
    """megatron-core AdamW (distributed: state sharded over data-parallel ranks) + its LR/WD scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from recurdepth.compat.optimizer import apply_optimizer_fix

    apply_optimizer_fix()  # megatron's fallback (torch) Adam: wherever it runs, not only on CPU
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=o.distributed), [ddp_model])
    return optimizer, build_scheduler(cfg, optimizer)


def adamw(cfg: Config, model: torch.nn.Module) -> torch.optim.AdamW:
    """torch AdamW over megatron-core's parameter groups of `model` (the optimizer DeepSpeed wraps)."""
    from megatron.core.optimizer import OptimizerConfig

    from recurdepth.compat.private import param_groups

    o = cfg.optimizer
    groups = param_groups([model], OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr,
                                                   weight_decay=o.weight_decay))
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def build_scheduler(cfg: Config, optimizer):
    """megatron-core's LR (warmup + decay) and weight-decay schedule over `optimizer.param_groups` (any engine)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    decay = o.decay_steps or cfg.train.steps
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(decay, o.warmup_steps + 1), lr_decay_style=_SCHEDULE_NAMES[o.schedule],
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay, wd_incr_style="constant",
        wsd_decay_steps=o.wsd_decay_steps or max(1, decay // 5), lr_wsd_decay_style="linear")
