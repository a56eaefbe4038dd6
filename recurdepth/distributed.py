"""Rank discovery, layout checks, torch.distributed + megatron-core parallel_state initialisation.

Ranks are found in order: RANK/WORLD_SIZE (torchrun), SLURM_PROCID/SLURM_NTASKS, OMPI_COMM_WORLD_* /
PMI_* (mpirun), else a single process. The layout is checked against the world size *before* any
process group is built, so an impossible layout is one error line, not a hang.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from recurdepth.config import Config
from recurdepth.errors import ConfigError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str


def discover_ranks(env=os.environ) -> RankInfo:
    """This process's rank from the launcher's environment (see module docstring for the order)."""
    for rank_key, size_key, local_key, source in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "slurm"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "openmpi"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "pmi"),
    ):
        if rank_key in env and size_key in env:
            return RankInfo(int(env[rank_key]), int(env[size_key]), int(env.get(local_key, 0)), source)
    return RankInfo(0, 1, 0, "single")


def check_layout(cfg: Config, world_size: int) -> int:
    """Validate TP x PP (x EP) against the world size and the model; returns the data-parallel size."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    model_parallel = p.tensor * p.pipeline
    if world_size % model_parallel:
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline = "
                          f"{p.tensor} x {p.pipeline}; launch a multiple of {model_parallel} processes or change the layout")
    dp = world_size // model_parallel
    if m.num_heads % p.tensor:
        raise ConfigError(f"parallel.tensor={p.tensor} does not divide model.num_heads={m.num_heads}; "
                          f"use a tensor size that divides the head count")
    groups = m.num_query_groups or m.num_heads
    if groups % p.tensor:
        raise ConfigError(f"parallel.tensor={p.tensor} does not divide model.num_query_groups={groups}; "
                          f"use a tensor size that divides the query groups")
    if p.pipeline_split == "looped" and m.core_layers % p.pipeline:
        raise ConfigError(f"model.core_layers={m.core_layers} is not divisible by parallel.pipeline={p.pipeline}; "
                          f"use a multiple of {p.pipeline} core layers")
    if p.expert > 1 and not m.num_experts:
        raise ConfigError(f"parallel.expert={p.expert} needs an MoE model; set model.num_experts or parallel.expert=1")
    if m.num_experts and m.num_experts % p.expert:
        raise ConfigError(f"model.num_experts={m.num_experts} is not divisible by parallel.expert={p.expert}; "
                          f"use a multiple of {p.expert} experts")
    if p.expert > 1 and (dp * p.tensor) % p.expert:
        raise ConfigError(f"parallel.expert={p.expert} does not divide data x tensor parallel = {dp} x {p.tensor}; "
                          f"expert parallelism is carved out of those ranks")
    if p.pipeline > 1 and t.overlap_grad_reduce:
        raise ConfigError("train.overlap_grad_reduce is not supported with parallel.pipeline > 1 (the looped schedule "
                          "runs several backward passes per micro-batch); set it to false")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
                          f"data-parallel size = {t.micro_batch_size} x {dp}; use a multiple of {t.micro_batch_size * dp}")
    return dp


def init_distributed(cfg: Config, info: RankInfo) -> torch.device:
    """Start torch.distributed (nccl on GPU, gloo on CPU) and megatron's TP/PP/DP groups; returns the device."""
    check_layout(cfg, info.world_size)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        from recurdepth.compat.megatron_cpu import apply_cpu_compat

        apply_cpu_compat()
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000) if info.world_size == 1 else "29500")
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=info.rank, world_size=info.world_size,
            timeout=timedelta(minutes=30))
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
            expert_model_parallel_size=cfg.parallel.expert,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return device


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
