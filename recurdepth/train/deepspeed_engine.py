"""The DeepSpeed engine (`train.engine: deepspeed`): the same model, data, objective and callbacks, with
data parallelism through DeepSpeed ZeRO stage 1, 2 or 3 (optionally offloading optimizer state, and at
stage 3 parameters, to the CPU).

What is DeepSpeed's and what is ours:
- DeepSpeed: partitioning of optimizer state / gradients / parameters, gradient reduction, clipping, the
  optimizer step, offload, and its checkpoint files (`engine.save_checkpoint` / `load_checkpoint`).
- Ours, shared with the megatron engine so both give the same update: the optimizer (torch AdamW over
  megatron-core's parameter groups: no weight decay on biases and 1-D parameters), the learning-rate and
  weight-decay schedule (megatron-core's `OptimizerParamScheduler` driving the optimizer's param groups),
  and the loss normalisation (summed token losses / global token count, whatever the layout).

DeepSpeed averages gradients over data-parallel ranks and, by default, divides the loss by the gradient
accumulation steps; the per-micro-batch loss is therefore scaled by `dp / global_tokens` (and
`scale_wrt_gas=False`), where `global_tokens` is counted before the backward passes.

A bad step (numerical guard) never reaches the weights: the verdict is taken after the last micro-batch's
forward, and a bad step's last backward is poisoned with NaN so that DeepSpeed's own overflow path drops
the update, clears the gradients and keeps its counters consistent (the Adam state is not touched).
Gradients that are non-finite by themselves take the same path; the trainer records them as bad steps.

Limits: data parallelism only (parallel.tensor/pipeline/expert = 1; use the megatron engine for model
parallelism); a checkpoint resumes at the same data-parallel size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from recurdepth.errors import CheckpointError, ConfigError

TAG = "deepspeed"  # the sub-directory of a recurdepth checkpoint holding DeepSpeed's files


def import_deepspeed():
    """deepspeed, imported for this machine's accelerator (its CPU accelerator without CUDA)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - deepspeed is a dependency
        raise ConfigError(f"train.engine=deepspeed needs the deepspeed package ({exc}); pip install deepspeed") from None
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (~35 s on 2 cores, again for
        # every new install path) that only its inference all-reduce uses; training reduces through gloo.
        import importlib

        # by module name: `import deepspeed.comm.torch as m` would bind deepspeed.comm's attribute `torch` (torch)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


def deepspeed_config(cfg, dp_size: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config this run's sections map onto (written to the run dir as deepspeed_config.json)."""
    t, o, d = cfg.train, cfg.optimizer, cfg.deepspeed
    zero = {"stage": d.zero_stage, "reduce_bucket_size": d.reduce_bucket_size, "overlap_comm": d.overlap_comm,
            "contiguous_gradients": d.contiguous_gradients}
    if d.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, however small
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    bf16 = dtype == torch.bfloat16
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp_size),
        "gradient_clipping": o.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, **({"check_grad_overflow": True} if bf16 else {})},
        # the optimizer is ours (torch AdamW over megatron's parameter groups), also when offloading
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2 ** 62,
        "wall_clock_breakdown": False,
    }


def build_deepspeed(cfg, model, dtype: torch.dtype, dp_size: int, local_rank: int = 0):
    """Wrap `model` in a DeepSpeed engine; returns (engine, zero optimizer, megatron scheduler, ds config).
    DeepSpeed insists on LOCAL_RANK in the environment: a plain process, srun or MPICH's mpirun sets none, so
    it is filled from the rank recurdepth discovered."""
    import os

    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups

    from recurdepth.train.trainer import build_scheduler

    deepspeed = import_deepspeed()
    o = cfg.optimizer
    groups = _get_param_groups([model], OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr,
                                                        weight_decay=o.weight_decay), None)
    base = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    ds_config = deepspeed_config(cfg, dp_size, dtype)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=base, config=ds_config,
                                                   dist_init_required=False)
    return engine, optimizer, build_scheduler(cfg, optimizer), ds_config


def save_deepspeed(engine, directory: Path) -> None:
    """DeepSpeed's own checkpoint files (model, each rank's optimizer partition) under `directory/deepspeed`."""
    engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)


def load_deepspeed(engine, directory: Path, saved_world: int) -> None:
    world = torch.distributed.get_world_size()
    if saved_world != world:
        raise CheckpointError(f"{directory} was written by the deepspeed engine on {saved_world} ranks; a DeepSpeed "
                              f"ZeRO checkpoint resumes on the same number ({world} now): relaunch with "
                              f"{saved_world} processes")
    if not (directory / TAG).is_dir():
        raise CheckpointError(f"{directory} has no {TAG}/ directory: it was not written by the deepspeed engine; "
                              f"resume it with train.engine=megatron")
    try:
        path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False)
    except Exception as exc:  # noqa: BLE001 - truncated or foreign files all mean the same to a user
        raise CheckpointError(f"cannot read the DeepSpeed checkpoint in {directory} ({type(exc).__name__}); it is "
                              f"truncated or corrupt: resume from an earlier step_* directory") from exc
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {directory / TAG}; resume from another step_* directory")


def write_config(ds_config: dict, run_dir: Path) -> None:
    (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1) + "\n")
