"""Checkpoints through megatron-core dist_checkpointing, written atomically.

Layout of `<checkpoint dir>`:
    step_00000010/          one complete checkpoint (sharded model + optimizer, common state, rng/)
    step_00000020.tmp/      a save in progress (never read; removed by the next save)
    latest                  the name of the newest complete checkpoint, replaced atomically last

A save writes into `<name>.tmp/`, renames it to `<name>/` once every rank has finished, and only then
points `latest` at it, so a crash at any moment leaves the previous checkpoint intact and `latest` valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from torch.distributed.checkpoint.api import CheckpointException

from recurdepth.errors import CheckpointError

LATEST = "latest"
CRASH_IN_SAVE_ENV = "RECURDEPTH_CRASH_IN_SAVE_AT_STEP"
# The distributed optimizer's canonical per-parameter layout: reloadable under any TP/PP/DP layout.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_batches: list = field(default_factory=list)  # consumed-sample offsets of batches never to train on


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not path.exists() and (path.parent / (path.name + ".old") / "recurdepth.json").is_file():
        path = path.parent / (path.name + ".old")  # a crash while re-saving the same step
    if not (path / "recurdepth.json").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing; "
                              f"point it at a complete step_* directory or remove it to start afresh")
    return path


def _unwrap(model):
    """The bare model under a DDP wrapper: checkpoint keys are the model's own parameter names."""
    return getattr(model, "module", model)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _crash_now() -> None:
    """Die like a killed process (no cleanup), taking megatron's writer helper processes along."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os._exit(17)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    from megatron.core import tensor_parallel

    state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(root: Path, state: TrainState, model, optimizer, scheduler, config_dict: dict,
                    keep_last: int = 0, vocab_size: Optional[int] = None, keep_every: int = 0,
                    engine: str = "megatron") -> Path:
    """Save model, optimizer, scheduler, train state, RNG states and config; collective over all ranks.
    With the deepspeed engine, model and optimizer are DeepSpeed's own files (in `deepspeed/`) and the rest
    is a `common.pt` beside them; the directory layout, atomicity and `latest` are the same."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    name = checkpoint_name(state.step)
    tmp, final = root / (name + ".tmp"), root / name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    common = {"scheduler": scheduler.state_dict(), "config": config_dict,
              "train_state": {"step": state.step, "consumed_samples": state.consumed_samples,
                              "skipped_batches": list(state.skipped_batches)}}
    if engine == "deepspeed":
        from recurdepth.train.deepspeed_engine import save_deepspeed

        save_deepspeed(model, tmp)
        if _rank() == 0:
            torch.save(common, tmp / "common.pt")
    else:
        sharded = {"model": _unwrap(model).sharded_state_dict(), **common}
        sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], metadata=_OPTIM_METADATA)
        dist_checkpointing.save(sharded, str(tmp))
    if os.environ.get(CRASH_IN_SAVE_ENV) == str(state.step):  # test hook: die half-way through a save
        _crash_now()
    (tmp / "rng").mkdir(exist_ok=True)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    torch.save({"world_size": world, "state": rng_state()}, tmp / "rng" / f"rank_{_rank():05d}.pt")
    _barrier()
    if _rank() == 0:
        (tmp / "recurdepth.json").write_text(json.dumps(
            {"step": state.step, "consumed_samples": state.consumed_samples, "world_size": world,
             "vocab_size": vocab_size, "engine": engine,
             "code_version": code_version()}, indent=1))
        old = root / (name + ".old")
        if final.exists():  # re-saving a step: keep the old copy until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _atomic_write(root / LATEST, name + "\n")
        if keep_last > 0:
            _prune(root, keep_last, keep_every)
    _barrier()
    return final


def _prune(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Remove complete checkpoints older than the newest `keep_last`, except steps that are multiples of
    `keep_every` (kept permanently)."""
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    for old in complete[:-keep_last]:
        if keep_every and int(old.name[5:]) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


_SHAPE_KEYS = ("hidden_size", "num_heads", "num_query_groups", "ffn_hidden_size", "prelude_layers", "core_layers",
               "coda_layers", "adapter", "block_norm", "activation", "tie_embeddings", "make_vocab_size_divisible_by")


def check_compatible(path: Path, model_cfg: dict, vocab_size: Optional[int] = None) -> None:
    """Refuse a checkpoint whose model shape or vocabulary differs from the configured one, naming the keys."""
    saved = saved_config(path).get("model", {})
    diff = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {model_cfg.get(k)!r}"
            for k in _SHAPE_KEYS if saved.get(k) != model_cfg.get(k)]
    saved_vocab = json.loads((Path(path) / "recurdepth.json").read_text()).get("vocab_size")
    if vocab_size is not None and saved_vocab is not None and saved_vocab != vocab_size:
        diff.append(f"tokenizer vocabulary: checkpoint {saved_vocab} vs data.tokenizer {vocab_size}")
    if diff:
        raise CheckpointError(f"checkpoint {path} is for another model ({'; '.join(diff)}); "
                              f"use the checkpoint's model settings or a fresh run directory")


def load_checkpoint(path: Path, model, optimizer, scheduler, model_cfg: Optional[dict] = None,
                    vocab_size: Optional[int] = None, engine: str = "megatron") -> tuple[TrainState, dict]:
    """Load a checkpoint saved by `save_checkpoint` into model/optimizer/scheduler (megatron engine: any
    TP/PP/DP layout; deepspeed engine: the same data-parallel size)."""
    path = Path(path)
    if not (path / "recurdepth.json").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no recurdepth.json); "
                              f"pick a complete step_* directory")
    if model_cfg is not None:
        check_compatible(path, model_cfg, vocab_size)
    meta = json.loads((path / "recurdepth.json").read_text())
    saved_engine = meta.get("engine", "megatron")
    if saved_engine != engine:
        raise CheckpointError(f"{path} was written by the {saved_engine} engine and cannot be resumed by the {engine} "
                              f"engine; set train.engine={saved_engine} or start a fresh run directory")
    if engine == "deepspeed":
        from recurdepth.train.deepspeed_engine import load_deepspeed

        load_deepspeed(model, path, int(meta.get("world_size", 0)))
        try:
            loaded = torch.load(path / "common.pt", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - truncated or missing: the same problem to a user
            raise CheckpointError(f"cannot read {path / 'common.pt'} ({type(exc).__name__}); the checkpoint is "
                                  f"truncated or corrupt: resume from an earlier step_* directory") from exc
    else:
        loaded = _load_megatron(path, model, optimizer)
    scheduler.num_steps = 0  # megatron's load_state_dict *adds* the saved step count to the current one
    scheduler.load_state_dict(loaded["scheduler"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if rng_file.is_file():
        saved = torch.load(rng_file, weights_only=False)
        if saved["world_size"] == world:  # RNG streams are per rank: only meaningful in the same layout
            set_rng_state(saved["state"])
    ts = loaded["train_state"]
    return TrainState(step=int(ts["step"]), consumed_samples=int(ts["consumed_samples"]),
                      skipped_batches=list(ts.get("skipped_batches", []))), loaded["config"]


def _load_megatron(path: Path, model, optimizer) -> dict:
    from megatron.core import dist_checkpointing

    sharded = {"model": _unwrap(model).sharded_state_dict()}
    sharded["optimizer"] = optimizer.sharded_state_dict(sharded["model"], is_loading=True, metadata=_OPTIM_METADATA)
    sharded["scheduler"] = None
    sharded["train_state"] = None
    sharded["config"] = None
    try:
        loaded = dist_checkpointing.load(sharded, str(path))
    except (Exception, CheckpointException) as exc:  # truncated or foreign (DCP's error is a BaseException)
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}); it is truncated, corrupt or "
                              f"from another model shape: resume from an earlier step_* directory") from exc
    _unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    return loaded


def saved_config(path: Path) -> dict:
    """The resolved config stored in a checkpoint (read from its common state, without a model)."""
    common = Path(path) / "common.pt"
    if not common.is_file():
        raise CheckpointError(f"{path} has no common.pt; it is not a recurdepth checkpoint")
    try:
        return torch.load(common, weights_only=False)["config"]
    except Exception:  # noqa: BLE001 - any unreadable file is the same problem to a user
        raise CheckpointError(f"{common} is unreadable (truncated or corrupt); resume from an earlier step_* "
                              f"directory") from None


def code_version() -> str:
    """recurdepth's version plus the git commit when running from a checkout."""
    from recurdepth import __version__

    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{__version__}+g{ref[:10]}"
    except OSError:
        return __version__
