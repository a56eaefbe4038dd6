"""Rank discovery, layout checks, torch.distributed + megatron-core parallel_state initialisation.

Ranks are found in order: RANK/WORLD_SIZE (torchrun), SLURM_PROCID/SLURM_NTASKS (srun), OMPI_COMM_WORLD_*
(Open MPI's mpirun), PMI_RANK/PMI_SIZE (MPICH/Hydra, Intel MPI), then mpi4py's COMM_WORLD (an MPI launcher
that sets none of those), else a single process. Launchers other than torchrun set no MASTER_ADDR: under
slurm it is the step's first host, under MPI rank 0 broadcasts its address and a free port with mpi4py.
The layout is checked against the world size *before* any process group is built, so an impossible
layout is one error line, not a hang.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch

from recurdepth.config import Config
from recurdepth.errors import ConfigError


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    source: str


# (source, rank variable, world-size variable, local-rank variables): the first pair present wins
RANK_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", ("LOCAL_RANK",)),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", ("SLURM_LOCALID",)),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",)),
    ("pmi", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")),
)
# Variables an MPI launcher sets in its children: only under one of them is mpi4py (MPI_Init) tried, so a
# plain `recurdepth train` never initialises MPI. RECURDEPTH_MPI4PY=1 forces the attempt, =0 disables it.
_MPI_HINT_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "MPI_LOCALRANKID", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_", "ALPS_APP_PE")


def _env_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"{key}={env[key]!r} is not an integer; unset it or fix the launcher") from None


def _mpi4py_ranks(env: Mapping[str, str]) -> Optional[RankInfo]:
    """Rank and size from mpi4py's COMM_WORLD, when an MPI launcher is evident and mpi4py importable."""
    wanted = env.get("RECURDEPTH_MPI4PY", "")
    if wanted == "0" or (wanted != "1" and not any(k.startswith(_MPI_HINT_PREFIXES) for k in env)):
        return None
    if importlib.util.find_spec("mpi4py") is None:
        return None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError):  # mpi4py without an MPI library it can load
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local = node.Get_rank()
    node.Free()
    return RankInfo(comm.Get_rank(), comm.Get_size(), local, "mpi4py")


def discover_ranks(env=os.environ) -> RankInfo:
    """This process's rank from the launcher's environment (see module docstring for the order)."""
    for source, rank_key, size_key, local_keys in RANK_SOURCES:
        if rank_key in env and size_key in env:
            rank, size = _env_int(env, rank_key), _env_int(env, size_key)
            if not 0 <= rank < size:
                raise ConfigError(f"{rank_key}={rank} is not a rank of {size_key}={size}; fix the launcher's variables")
            local = next((_env_int(env, k) for k in local_keys if k in env), 0)
            return RankInfo(rank, size, local, source)
    return _mpi4py_ranks(env) or RankInfo(0, 1, 0, "single")


def first_slurm_host(nodelist: str) -> Optional[str]:
    """The first host of a slurm hostlist ('gpu[003-005,9],cpu1' -> 'gpu003'), as `scontrol show hostnames`."""
    depth, item = 0, []
    for ch in nodelist:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            break
        item.append(ch)
    first = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], "".join(item).strip())
    return first or None


def slurm_head_node(env: Mapping[str, str] = os.environ) -> tuple[Optional[str], str]:
    """(host of rank 0 under srun, how it was found): the step's (else the job's) first host via `scontrol show
    hostnames`, else parsed from the hostlist, else SLURM_LAUNCH_NODE_IPADDR."""
    for key in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        nodelist = env.get(key)
        if not nodelist:
            continue
        if shutil.which("scontrol"):
            try:
                out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                     timeout=30, check=True).stdout.split()
                if out:
                    return out[0], f"first host of {key} (scontrol show hostnames)"
            except (OSError, subprocess.SubprocessError):
                pass
        host = first_slurm_host(nodelist)
        if host:
            return host, f"first host of {key}"
    if env.get("SLURM_LAUNCH_NODE_IPADDR"):
        return env["SLURM_LAUNCH_NODE_IPADDR"], "SLURM_LAUNCH_NODE_IPADDR"
    return None, "nothing"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _address_seen_by(peer: str) -> str:
    """This host's address on the route to `peer` (a UDP connect sends nothing), else its resolved name."""
    name = socket.gethostname()
    try:
        addr = socket.gethostbyname(name)
        if not addr.startswith("127."):
            return addr
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.getfqdn(name)


def _mpi_rendezvous(info: RankInfo, env) -> tuple[str, str, str]:
    """(MASTER_ADDR, MASTER_PORT, how) agreed by all MPI ranks: rank 0's address and a free port, broadcast."""
    if importlib.util.find_spec("mpi4py") is None:
        local_size = env.get("OMPI_COMM_WORLD_LOCAL_SIZE") or env.get("MPI_LOCALNRANKS")
        if local_size == str(info.world_size):  # every rank on this host: loopback and the usual port
            return "127.0.0.1", env.get("MASTER_PORT", "29500"), "all ranks on one host, mpi4py not installed"
        raise ConfigError(f"launched by MPI ({info.source}) with {info.world_size} ranks over several hosts but no "
                          f"MASTER_ADDR and no mpi4py to agree on one; `pip install mpi4py` or export MASTER_ADDR "
                          f"and MASTER_PORT to every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)")
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if (comm.Get_rank(), comm.Get_size()) != (info.rank, info.world_size):
        raise ConfigError(f"MPI's COMM_WORLD says rank {comm.Get_rank()} of {comm.Get_size()} but the launcher's "
                          f"variables ({info.source}) say {info.rank} of {info.world_size}; unset the stale variables")
    hosts = comm.allgather(socket.gethostname())
    chosen = None
    if info.rank == 0:
        one_host = len(set(hosts)) == 1
        addr = "127.0.0.1" if one_host else _address_seen_by(next(h for h in hosts if h != hosts[0]))
        chosen = (addr, env.get("MASTER_PORT") or str(_free_port(addr if one_host else "")))
    addr, port = comm.bcast(chosen, root=0)
    return addr, port, f"rank 0's address, broadcast with mpi4py over {len(set(hosts))} host(s)"


def _slurm_port(env) -> str:
    """A port per job, so two jobs sharing a node don't collide; MASTER_PORT overrides."""
    job = env.get("SLURM_JOB_ID", "")
    return env.get("MASTER_PORT") or (str(20000 + int(job) % 20000) if job.isdigit() else "29500")


def _rendezvous(info: RankInfo, env=os.environ) -> Optional[str]:
    """Sets MASTER_ADDR/MASTER_PORT for launchers that don't (srun, mpirun); returns how, or None for
    torchrun and single processes (their defaults are unchanged)."""
    if info.source in ("torchrun", "single"):
        return None
    if "MASTER_ADDR" in env:
        env.setdefault("MASTER_PORT", "29500")
        how = "MASTER_ADDR/MASTER_PORT from the environment"
    elif info.source == "slurm":
        host, how = slurm_head_node(env)
        if host is None:
            raise ConfigError("launched by slurm (SLURM_PROCID) but neither SLURM_JOB_NODELIST nor "
                              "SLURM_LAUNCH_NODE_IPADDR names rank 0's host; export MASTER_ADDR and MASTER_PORT")
        env["MASTER_ADDR"], env["MASTER_PORT"] = host, _slurm_port(env)
    else:
        env["MASTER_ADDR"], env["MASTER_PORT"], how = _mpi_rendezvous(info, env)
    return how


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
    if info.source not in ("torchrun", "single"):  # srun/mpirun: what torchrun would have exported
        for key, value in (("RANK", info.rank), ("WORLD_SIZE", info.world_size), ("LOCAL_RANK", info.local_rank)):
            os.environ.setdefault(key, str(value))
    check_layout(cfg, info.world_size)
    from recurdepth.compat.checkpoint_writer import apply_checkpoint_writer_compat

    apply_checkpoint_writer_compat()  # on GPU too: a stop signal to the process group must not break a save
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        from recurdepth.compat.megatron_cpu import apply_cpu_compat

        apply_cpu_compat()
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        how = _rendezvous(info)
        if how and info.rank == 0:
            print(f"recurdepth | ranks from {info.source}: world {info.world_size} | rendezvous "
                  f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({how})", flush=True)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000) if info.world_size == 1 else "29500")
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo", rank=info.rank, world_size=info.world_size,
            timeout=timedelta(minutes=30), store=_restart_scoped_store(info))
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=cfg.parallel.tensor,
            pipeline_model_parallel_size=cfg.parallel.pipeline,
            expert_model_parallel_size=cfg.parallel.expert,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.train.seed)
    return device


def _restart_scoped_store(info: RankInfo):
    """Under `torchrun --max-restarts`, the rendezvous store outlives a failed attempt and still holds the dead
    workers' addresses, which the restarted workers would try to reach. Scope our keys by the restart count;
    None (torch's default store) everywhere else."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart in (None, "0") or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), info.world_size,
                                      is_master=False, timeout=timedelta(minutes=5))
    return torch.distributed.PrefixStore(f"recurdepth/attempt_{restart}", base)


def shutdown_distributed() -> None:
    import sys

    if "megatron.core.parallel_state" in sys.modules:  # megatron's groups exist only if it was imported
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
