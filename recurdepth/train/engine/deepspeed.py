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

The step's verbs (`recurdepth.train.engine.base`): `prepare` all-reduces the token count and fixes the
scale; `backward` runs DeepSpeed's backward and micro-step for every micro-batch but the last, whose loss is
kept for `step`, which poisons it when the verdict is bad and then takes the boundary step (reduction,
clipping, the update).

Limits: data parallelism only (parallel.tensor/pipeline/expert = 1; use the megatron engine for model
parallelism); a checkpoint resumes at the same data-parallel size.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch

from recurdepth.errors import CheckpointError, ConfigError
from recurdepth.train.engine.base import Engine
from recurdepth.train.optimizer import adamw, build_scheduler

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


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def model_dtype(cls, dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # DeepSpeed keeps fp32 master weights itself and casts the module for bf16

    def __init__(self, cfg, model, dtype: torch.dtype, device: torch.device, dp_size: int = 1, local_rank: int = 0):
        # DeepSpeed insists on LOCAL_RANK in the environment: a plain process, srun or MPICH's mpirun sets none,
        # so it is filled from the rank recurdepth discovered
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        deepspeed = import_deepspeed()
        self.cfg, self.device, self.dp_size = cfg, device, dp_size
        self.ds_config = deepspeed_config(cfg, dp_size, dtype)
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw(cfg, model),
                                                                config=self.ds_config, dist_init_required=False)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self._scale: Optional[torch.Tensor] = None  # dp / global tokens, this step's
        self._last: Optional[torch.Tensor] = None  # the last micro-batch's loss, backpropagated in step()

    def label(self) -> str:
        d = self.cfg.deepspeed
        offload = "+".join(n for n, on in (("optimizer", d.offload_optimizer), ("params", d.offload_params)) if on)
        return f"deepspeed ZeRO-{d.zero_stage}" + (f" offload {offload}" if offload else "")

    def run_files(self) -> dict[str, str]:
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=1) + "\n"}

    def prepare(self, tokens: torch.Tensor) -> None:
        from megatron.core import parallel_state

        torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        self._scale = self.dp_size / tokens.clamp_min(1)
        self._last = None

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if last:
            self._last = loss  # after the verdict, in step()
            return
        self.model.backward(loss * self._scale, scale_wrt_gas=False)
        self.model.step()  # not a boundary: DeepSpeed only counts the micro-step

    def reduce_gradients(self, tokens: torch.Tensor) -> None:
        """Nothing before the boundary step: `tokens` is global since `prepare`, DeepSpeed reduces in step()."""

    def step(self, bad: Optional[str]) -> tuple[float, Optional[str]]:
        loss, self._last = self._last, None
        if bad is not None:
            loss = loss * float("nan")  # DeepSpeed's overflow path drops the update and clears the gradients
        skipped = self.model.skipped_steps
        self.model.backward(loss * self._scale, scale_wrt_gas=False)
        self.model.step()  # the boundary: reduction, clipping and the update (dropped on non-finite gradients)
        if bad is None and self.model.skipped_steps > skipped:
            bad = "non-finite gradient norm"
        if bad is not None:
            return float("nan"), bad
        return float(self.model.get_global_grad_norm()), None

    def save_state(self, tmp: Path, common: dict) -> None:
        save_deepspeed(self.model, tmp)
        if torch.distributed.get_rank() == 0:
            torch.save(common, tmp / "common.pt")

    def load_state(self, path: Path, meta: dict) -> dict:
        load_deepspeed(self.model, path, int(meta.get("world_size", 0)))
        try:
            return torch.load(path / "common.pt", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - truncated or missing: the same problem to a user
            raise CheckpointError(f"cannot read {path / 'common.pt'} ({type(exc).__name__}); the checkpoint is "
                                  f"truncated or corrupt: resume from an earlier step_* directory") from exc


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
