"""Checkpoints through megatron-core dist_checkpointing, written atomically, checksummed, never rewritten.

Layout of `<checkpoint dir>`:
    step_00000010/          one complete checkpoint (sharded model + optimizer, common state, rng/, and
                            recurdepth.json: the manifest, with the lineage and every file's sha256)
    step_00000020.tmp/      a save in progress (never read; removed by the next save)
    latest                  the name of the newest complete checkpoint, replaced atomically last
    archive/<time>/         checkpoints moved aside by `--resume fresh` or by resuming an older step

A save writes into `<name>.tmp/`, hashes every file (each rank a share), writes the manifest, renames it to
`<name>/` once every rank has finished, and only then points `latest` at it, so a crash at any moment leaves
the previous checkpoint intact and `latest` valid. A complete checkpoint is never written again: saving a
step that exists is a no-op. Loading verifies the checksums first (`verify_checkpoint`).

Lineage: every manifest names its `run_id` (one per lineage of saves) and `parent` (the checkpoint the run
resumed from). Retention (`keep_last`, `keep_every`) only removes checkpoints of the lineage `latest` belongs
to that are older than `latest`, and never `latest` or this process's resume point.

What goes into a checkpoint besides the layout is the engine's (`recurdepth.train.engine`): its `name` (in
the manifest; a checkpoint resumes under the engine that wrote it), `save_state(tmp, common)` writing the
model, the optimizer and the common state (scheduler, train state, config) into `tmp`, and
`load_state(path, manifest)` reading them back. `ShardedState` is megatron-core's dist_checkpointing format
(the megatron engine's, and the default for callers without an engine); nothing here names an engine.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch

from torch.distributed.checkpoint.api import CheckpointException

from recurdepth.atomic import fsync_dir, write_atomically
from recurdepth.compat.scheduler import load_scheduler_state
from recurdepth.errors import CheckpointError
from recurdepth.model.names import EXTRA_STATE, with_extra_state
from recurdepth.train.faults import maybe_fail_save
from recurdepth.train.state import Lineage, TrainState  # noqa: F401 - re-exported: where they were

LATEST = "latest"
MANIFEST = "recurdepth.json"
ARCHIVE = "archive"
CRASH_IN_SAVE_ENV = "RECURDEPTH_CRASH_IN_SAVE_AT_STEP"
# The distributed optimizer's canonical per-parameter layout: reloadable under any TP/PP/DP layout.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> Optional[int]:
    name = path.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def manifest(path: Path) -> dict:
    """The checkpoint's recurdepth.json ({} when missing or unreadable)."""
    try:
        value = json.loads((Path(path) / MANIFEST).read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete step_* checkpoints directly under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint `root/latest` names, or None when `root` holds no checkpoint at all. Step directories
    without a `latest` are an error, never a silent fresh start over them."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        complete = complete_checkpoints(root)
        if complete:
            raise CheckpointError(
                f"{root} holds checkpoints but no `latest` pointer (newest complete: {complete[-1].name}); resume "
                f"it with --resume {complete[-1]}, or start afresh with --resume fresh (moves them aside)")
        return None
    path = root / pointer.read_text().strip()
    if not path.exists() and (path.parent / (path.name + ".old") / MANIFEST).is_file():
        path = path.parent / (path.name + ".old")  # a crash while re-saving the same step (before 0.2)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing; "
                              f"point it at a complete step_* directory or remove it to start afresh")
    return path


def archive_checkpoints(root: Path, paths: Iterable[Path], why: str) -> Optional[Path]:
    """Move `paths` (checkpoints, and `latest` if given) into `root/archive/<time>/`, never deleting them;
    returns the archive folder (None when there was nothing to move)."""
    paths = [Path(p) for p in paths if Path(p).exists()]
    if not paths:
        return None
    dest = Path(root) / ARCHIVE / time.strftime("%Y%m%d-%H%M%S")
    while dest.exists():
        dest = dest.with_name(dest.name + "+")
    dest.mkdir(parents=True)
    write_atomically(dest / "WHY", why + "\n")
    for p in paths:
        os.rename(p, dest / p.name)
    fsync_dir(Path(root))
    return dest


def _unwrap(model):
    """The bare model under a DDP wrapper: checkpoint keys are the model's own parameter names."""
    return getattr(model, "module", model)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (collective)."""
    if not torch.distributed.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _gather(obj) -> list:
    if not torch.distributed.is_initialized():
        return [obj]
    out = [None] * _world()
    torch.distributed.all_gather_object(out, obj)
    return out


def _crash_now() -> None:
    """Die like a killed process (no cleanup), taking any helper processes along."""
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


# ------------------------------------------------------------------ checksums

def file_sha256(path: Path) -> str:
    """The file's sha256, streamed (constant memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files_of(directory: Path) -> list[str]:
    """Every file under a checkpoint directory but its manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def checksum_files(directory: Path) -> dict:
    """{relative path: {size, sha256}} of every file in `directory`, each rank hashing a share (collective)."""
    files = _files_of(directory) if _rank() == 0 else None
    if torch.distributed.is_initialized():
        box = [files]
        torch.distributed.broadcast_object_list(box, src=0)
        files = box[0]
    mine = {rel: {"size": (Path(directory) / rel).stat().st_size, "sha256": file_sha256(Path(directory) / rel)}
            for rel in files[_rank()::_world()]}
    merged: dict = {}
    for part in _gather(mine):
        merged.update(part)
    return dict(sorted(merged.items()))


def verify_checkpoint(path: Path, distributed: bool = False) -> bool:
    """Check every file of a checkpoint against the sizes and sha256 sums its manifest recorded at save (with
    `distributed`, each rank hashes a share: collective). Raises CheckpointError naming the first bad file;
    returns False for a checkpoint written before checksums existed (nothing to verify), else True."""
    path = Path(path)
    files = manifest(path).get("files")
    if files is None:
        return False
    rank, world = (_rank(), _world()) if distributed else (0, 1)
    problem = None
    for rel, info in files.items():  # presence and size first: cheap, and catches truncation everywhere
        f = path / rel
        if not f.is_file():
            problem = f"{rel} is missing"
        elif f.stat().st_size != info["size"]:
            problem = f"{rel} has {f.stat().st_size} bytes, {info['size']} at save (truncated or overwritten)"
        if problem:
            break
    if problem is None:
        for rel in sorted(files)[rank::world]:
            if file_sha256(path / rel) != files[rel]["sha256"]:
                problem = f"{rel} does not match the sha256 written at save (corrupted on disk)"
                break
    problems = [p for p in (_gather(problem) if distributed else [problem]) if p]
    if problems:
        raise CheckpointError(f"checkpoint {path} is corrupt: {problems[0]}; resume from an earlier step_* "
                              f"directory (or pass --no-verify to load it regardless)")
    return True


# ------------------------------------------------------------------ save

def _no_space(exc: BaseException) -> bool:
    """Whether a save failure was a full disk (anywhere in the exception chain, DCP's per-rank failures too)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
        todo += [v for v in getattr(e, "failures", {}).values() if isinstance(v, BaseException)]
    return False


def _disk_nearly_full(path: Path, reserve: int = 16 << 20) -> bool:
    """Whether the filesystem holding `path` has (almost) no space left: writers such as torch's zip writer
    report a full disk as a short write without ENOSPC."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free < reserve
            except OSError:
                return False
    return False


def _failure(exc: BaseException, tmp: Path) -> tuple[str, bool]:
    """(what went wrong, in a few words; whether the disk is full) for a save that raised `exc`."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}", _no_space(exc) or _disk_nearly_full(tmp)


def _save_failed_message(root: Path, tmp: Path, name: str, what: str, no_space: bool, where: str = "") -> str:
    """The one line for a failed save whose partial `tmp` was removed, naming what is left to resume from."""
    try:
        previous = (Path(root) / LATEST).read_text().strip()
    except OSError:
        previous = None
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    if no_space:
        return (f"no space left on device while saving {name} to {root}{where}; removed the partial {tmp.name}, "
                f"{kept}; free space or set checkpoint.dir to a larger disk, then resume")
    return f"saving {name} to {root} failed{where} ({what}); removed the partial {tmp.name}, {kept}"


def _save_failed(root: Path, tmp: Path, name: str, exc: Optional[BaseException]) -> CheckpointError:
    """Remove the partial save and say what happened, in one line, the same on every rank (collective)."""
    failures = [f for f in _gather(None if exc is None else _failure(exc, tmp)) if f is not None]
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    what = failures[0][0] if failures else "Error: unknown"
    return CheckpointError(_save_failed_message(root, tmp, name, what, any(f[1] for f in failures)))


def _write_shards(sharded: dict, tmp: Path, step: int) -> None:
    """megatron's dist_checkpointing.save of `sharded` into `tmp` (`<root>/<name>.tmp`). Its errors after the
    write phase are raised on every rank (a CheckpointException) and agreed by the caller; an error in one
    rank's own write phase leaves the other ranks waiting in megatron's barrier, so that rank stops the run at
    once with the reason (the launcher then ends the other ranks; the partial save is removed, the previous
    checkpoint intact)."""
    from megatron.core import dist_checkpointing

    root, name = tmp.parent, tmp.name[: -len(".tmp")]
    # megatron logs a writer's failure itself before raising it: we report it, in one line
    writer_log = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    level = writer_log.level
    writer_log.setLevel(logging.CRITICAL)
    try:
        maybe_fail_save(step)
        dist_checkpointing.save(sharded, str(tmp))
    except CheckpointException:
        raise
    except Exception as exc:  # noqa: BLE001
        if _world() == 1:
            raise
        what, no_space = _failure(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        error = CheckpointError(_save_failed_message(root, tmp, name, what, no_space, f" on rank {_rank()}")
                                + "; stopping every rank")
        error.same_on_every_rank = False
        raise error from exc
    finally:
        writer_log.setLevel(level)


class ShardedState:
    """Model and optimizer in megatron-core's dist_checkpointing format, the common state (scheduler, train
    state, config) in the same sharded save: loadable under any TP/PP/DP layout. The megatron engine's
    checkpoint state, and what `save_checkpoint` / `load_checkpoint` use when given no engine."""

    name = "megatron"

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def save_state(self, tmp: Path, common: dict) -> None:
        sharded = {"model": _unwrap(self.model).sharded_state_dict(), **common}
        sharded["optimizer"] = self.optimizer.sharded_state_dict(sharded["model"], metadata=_OPTIM_METADATA)
        _write_shards(sharded, tmp, common["train_state"]["step"])

    def load_state(self, path: Path, meta: dict) -> dict:
        from megatron.core import dist_checkpointing

        model = _unwrap(self.model)
        sharded = {"model": model.sharded_state_dict()}
        sharded["optimizer"] = self.optimizer.sharded_state_dict(sharded["model"], is_loading=True,
                                                                 metadata=_OPTIM_METADATA)
        sharded["scheduler"] = None
        sharded["train_state"] = None
        sharded["config"] = None
        try:
            loaded = dist_checkpointing.load(sharded, str(path))
        except (Exception, CheckpointException) as exc:  # truncated or foreign (DCP's error is a BaseException)
            raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}); it is truncated, corrupt "
                                  f"or from another model shape: resume from an earlier step_* directory") from exc
        model.load_state_dict(with_extra_state(model, loaded["model"]))
        self.optimizer.load_state_dict(loaded["optimizer"])
        return loaded


def existing_checkpoint(final: Path, lineage: Lineage) -> Path:
    """A complete checkpoint already at the path a save would write: this lineage's is the same state (a stop
    right after an interval save, a halt right after a resume) and is returned as it is; another lineage's is
    never written over or mistaken for this run's."""
    owner = manifest(final).get("run_id")
    if owner is not None and owner != lineage.run_id:
        raise CheckpointError(f"cannot save {final.name}: {final} belongs to another run (run_id {owner}, not "
                              f"{lineage.run_id}); move it out of {final.parent} and resume")
    return final


def save_checkpoint(root: Path, state: TrainState, model, optimizer, scheduler, config_dict: dict,
                    keep_last: int = 0, vocab_size: Optional[int] = None, keep_every: int = 0,
                    engine=None, lineage: Optional[Lineage] = None) -> Path:
    """Save model, optimizer, scheduler, train state, RNG states and config; collective over all ranks.
    `engine` (a `recurdepth.train.engine.Engine`, or anything with its `name`, `save_state`, `load_state`)
    writes model and optimizer in its own files (default: `ShardedState(model, optimizer)`); the directory
    layout, atomicity, checksums and `latest` are the same for every engine. A step that already has a
    complete checkpoint is not written again (its path is returned)."""
    root = Path(root)
    engine = engine if engine is not None else ShardedState(model, optimizer)
    lineage = lineage or Lineage()
    name = checkpoint_name(state.step)
    tmp, final = root / (name + ".tmp"), root / name
    if _any_rank((final / MANIFEST).is_file()):
        return existing_checkpoint(final, lineage)  # never rewrite a complete checkpoint
    common = {"scheduler": scheduler.state_dict(), "config": config_dict,
              "train_state": {"step": state.step, "consumed_samples": state.consumed_samples,
                              "skipped_batches": list(state.skipped_batches)}}
    failure: Optional[BaseException] = None
    try:
        if _rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in [tmp, *root.glob("step_*.deleting")]:  # left by a crash
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        _barrier()
        engine.save_state(tmp, common)
        if os.environ.get(CRASH_IN_SAVE_ENV) == str(state.step):  # test hook: die half-way through a save
            _crash_now()
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save({"world_size": _world(), "state": rng_state()}, tmp / "rng" / f"rank_{_rank():05d}.pt")
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - DCP's error is a BaseException
        failure = exc
    if _any_rank(failure is not None):
        raise _save_failed(root, tmp, name, failure) from failure
    files = checksum_files(tmp)
    try:
        if _rank() == 0:
            commit_checkpoint(root, tmp, {
                "step": state.step, "consumed_samples": state.consumed_samples, "world_size": _world(),
                "vocab_size": vocab_size, "engine": engine.name, "code_version": code_version(), "run_id": lineage.run_id,
                "parent": lineage.parent, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files},
                keep_last, keep_every, lineage)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        failure = exc
    if _any_rank(failure is not None):
        pointed = (root / LATEST).is_file() and (root / LATEST).read_text().strip() == name
        if _rank() == 0 and final.exists() and not pointed:
            os.rename(final, tmp)  # not pointed at by `latest`: not a complete save
        raise _save_failed(root, tmp, name, failure) from failure
    _barrier()
    return final


def commit_checkpoint(root: Path, tmp: Path, meta: dict, keep_last: int = 0, keep_every: int = 0,
                      lineage: Optional[Lineage] = None) -> Path:
    """Make a fully written `<name>.tmp` the complete checkpoint `<name>` -- its manifest, the rename, then
    `latest` -- and apply retention (rank 0 only, after every rank has written its files)."""
    final = Path(root) / tmp.name[: -len(".tmp")]
    write_atomically(tmp / MANIFEST, json.dumps(meta, indent=1))
    os.rename(tmp, final)
    fsync_dir(Path(root))
    write_atomically(Path(root) / LATEST, final.name + "\n")
    if keep_last > 0:
        protect = [lineage.parent] if lineage is not None and lineage.parent else []
        _prune(root, keep_last, keep_every, protect)
    return final


@dataclass
class ResumePlan:
    """What a run starting in a checkpoint folder does: load `target` (None: start afresh) after moving
    `archive` aside (never deleted), and why."""

    target: Optional[Path]
    archive: list
    why: str = ""


def apply_resume_plan(root: Path, plan: ResumePlan) -> Optional[Path]:
    """Carry out a plan's moves (rank 0, under the run-dir lock): archive what it moves aside and, when it
    resumes an older step of this folder, point `latest` at that step. Returns the archive folder."""
    dest = archive_checkpoints(root, plan.archive, plan.why)
    if dest is not None and plan.target is not None and plan.target.resolve().parent == Path(root).resolve():
        write_atomically(Path(root) / LATEST, plan.target.name + "\n")
    return dest


def plan_resume(root: Path, mode: str = "auto", path: Optional[Path] = None) -> ResumePlan:
    """Decide where a run resumes from, reading only. `mode` is checkpoint.resume; `path` an explicit
    checkpoint (or checkpoints folder). Resuming an older step of this folder moves the newer ones aside, so
    a new lineage never writes over or prunes them; `never` refuses where checkpoints exist, `fresh` moves
    them aside; a checkpoint from another folder is refused where this folder already holds checkpoints."""
    root = Path(root)
    existing = complete_checkpoints(root)
    pointer = [root / LATEST] if (root / LATEST).exists() else []
    if path is not None:
        target = Path(path)
        if target.is_dir() and not (target / MANIFEST).is_file() and (target / LATEST).is_file():
            target = latest_checkpoint(target)  # a checkpoints folder: its latest
        if not (target / MANIFEST).is_file():
            raise CheckpointError(f"{target} is not a complete checkpoint (no {MANIFEST}); pick a complete step_* "
                                  f"directory")
        inside = target.resolve().parent == root.resolve()
        if not inside and existing:
            raise CheckpointError(f"{root} already holds checkpoints (newest {existing[-1].name}); resuming {target} "
                                  f"there would mix two lineages: use a new train.run_dir")
        newer = [p for p in existing if inside and _step_of(p) > _step_of(target)]
        return ResumePlan(target, newer + pointer if newer else [], f"resumed from the older {target.name}")
    if mode in ("never", "fresh"):
        if mode == "never" and (existing or pointer):
            raise CheckpointError(
                f"{root} holds checkpoints (newest {existing[-1].name if existing else '?'}) and --resume never "
                f"would mix a new run with them: use --resume fresh (checkpoint.resume=fresh) to move them aside "
                f"into {root / ARCHIVE} and start afresh, or another train.run_dir")
        return ResumePlan(None, existing + pointer, "--resume fresh")
    target = latest_checkpoint(root)
    if target is None and mode == "required":
        raise CheckpointError(f"checkpoint.resume=required but {root} has no checkpoint; train without it or point "
                              f"checkpoint.dir at one")
    return ResumePlan(target, [])


def _prune(root: Path, keep_last: int, keep_every: int = 0, protect: Iterable[str] = ()) -> list[str]:
    """Remove checkpoints of `latest`'s lineage that are older than `latest`, beyond the newest `keep_last`
    (latest included), except steps that are multiples of `keep_every` and the names in `protect`. Other
    lineages' checkpoints, newer ones and `latest` itself are never touched. Returns the removed names."""
    root = Path(root)
    try:
        newest = latest_checkpoint(root)
    except CheckpointError:
        return []
    if newest is None or keep_last <= 0:
        return []
    run_id, top = manifest(newest).get("run_id"), _step_of(newest)
    older = [p for p in complete_checkpoints(root)
             if p.name != newest.name and _step_of(p) < top and manifest(p).get("run_id") == run_id]
    removable = older[:len(older) - (keep_last - 1)] if keep_last > 1 else older
    removed = []
    for old in removable:
        if (keep_every and _step_of(old) % keep_every == 0) or old.name in set(protect):
            continue
        doomed = old.with_name(old.name + ".deleting")  # never a half-deleted directory that looks complete
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(old.name)
    return removed


# Keys that may differ between a checkpoint and the config resuming it: they change how the model is computed
# or trained, not the function it computes (docs/checkpoints.md lists them). Every other key of the model and
# objective sections must match, or resume is refused (checkpoint.allow_changes forces named keys).
SAFE_TO_CHANGE = {
    "model": ("seq_length", "attention", "spec", "moe_dispatcher", "init_std", "depth_scaled_init"),
    "objective": ("checkpoint_thoughts", "coconut_stage_steps", "stream_attention", "coconut_kv_cache"),
}
FUNCTION_SECTIONS = ("model", "objective")


def config_changes(saved: dict, current: dict, allowed: Iterable[str] = ()) -> list[str]:
    """The keys of the model and objective sections whose values differ between a checkpoint's config and the
    current one, excluding SAFE_TO_CHANGE and `allowed` ("section.key"), as "section.key: a -> b" lines."""
    allowed = set(allowed)
    out = []
    for section in FUNCTION_SECTIONS:
        old, new = saved.get(section, {}) or {}, current.get(section, {}) or {}
        for key in sorted(set(old) | set(new)):
            dotted = f"{section}.{key}"
            if key in SAFE_TO_CHANGE.get(section, ()) or dotted in allowed:
                continue
            if key not in old:  # a key added after the checkpoint was written: only its default is safe
                continue
            if section == "objective" and key not in new:  # another kind's option (configs saved before the
                continue  # objective section was per kind list every kind's); a change of kind is `kind` itself
            if old.get(key) != new.get(key):
                out.append(f"{dotted}: checkpoint {old.get(key)!r}, config {new.get(key)!r}")
    return out


def check_compatible(path: Path, config: dict, vocab_size: Optional[int] = None,
                     allowed: Iterable[str] = ()) -> None:
    """Refuse a checkpoint whose model or objective (`config`: the resolved config as a dict) differs from the
    configured one, naming the keys, both values and how to force it; and one whose tokenizer vocabulary differs."""
    saved_vocab = manifest(path).get("vocab_size")
    if vocab_size is not None and saved_vocab is not None and saved_vocab != vocab_size:
        raise CheckpointError(f"checkpoint {path} is for another tokenizer (tokenizer vocabulary: checkpoint "
                              f"{saved_vocab} vs data.tokenizer {vocab_size}); use the tokenizer it was trained "
                              f"with or a fresh run directory")
    saved = saved_config(path)
    expert_saved = (saved.get("parallel") or {}).get("expert", 1)
    expert_now = (config.get("parallel") or {}).get("expert", 1)
    if (config.get("model") or {}).get("num_experts") and expert_saved != expert_now:
        raise CheckpointError(f"checkpoint {path} was saved with parallel.expert={expert_saved}; resuming it with "
                              f"parallel.expert={expert_now} is not supported (megatron keys the expert optimizer "
                              f"state by the expert-parallel layout and recurdepth does not reshard it): resume with "
                              f"parallel.expert={expert_saved}, or start a fresh run directory")
    diff = config_changes(saved, config, allowed)
    if diff:
        keys = ",".join(d.split(":")[0] for d in diff)
        raise CheckpointError(f"checkpoint {path} was trained with another model ({'; '.join(diff)}); resuming would "
                              f"change the function it computes: use the checkpoint's values, a fresh run directory, "
                              f"or force it with checkpoint.allow_changes=[{keys}]")


def load_checkpoint(path: Path, model, optimizer, scheduler, model_cfg: Optional[dict] = None,
                    vocab_size: Optional[int] = None, engine=None, verify: bool = True,
                    allowed_changes: Iterable[str] = ()) -> tuple[TrainState, dict]:
    """Load a checkpoint saved by `save_checkpoint` into model/optimizer/scheduler through `engine` (as in
    `save_checkpoint`; the megatron format loads under any TP/PP/DP layout, DeepSpeed's at the same
    data-parallel size), after verifying its checksums. `model_cfg`: the resolved config (as a dict) to check
    the checkpoint against."""
    path = Path(path)
    engine = engine if engine is not None else ShardedState(model, optimizer)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MANIFEST}); "
                              f"pick a complete step_* directory")
    if model_cfg is not None:
        check_compatible(path, model_cfg, vocab_size, allowed_changes)
    meta = manifest(path)
    saved_engine = meta.get("engine", "megatron")
    if saved_engine != engine.name:
        raise CheckpointError(f"{path} was written by the {saved_engine} engine and cannot be resumed by the "
                              f"{engine.name} engine; set train.engine={saved_engine} or start a fresh run directory")
    if verify:
        verify_checkpoint(path, distributed=True)
    loaded = engine.load_state(path, meta)
    if int(loaded["train_state"]["step"]) == 0:
        # step 0 (an import): no schedule progress to restore, and the saved hyper-parameters are the importer's
        # defaults, so the run's own schedule (warmup, peak, decay) starts here, as in a fresh run
        scheduler.num_steps = 0
        scheduler.step(increment=0)
    else:
        load_scheduler_state(scheduler, loaded["scheduler"])
    rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
    if rng_file.is_file():
        saved = torch.load(rng_file, weights_only=False)
        if saved["world_size"] == _world():  # RNG streams are per rank: only meaningful in the same layout
            set_rng_state(saved["state"])
    ts = loaded["train_state"]
    return TrainState(step=int(ts["step"]), consumed_samples=int(ts["consumed_samples"]),
                      skipped_batches=list(ts.get("skipped_batches", []))), loaded["config"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory from a step_* directory, a checkpoints folder (its `latest`) or a run
    directory (its checkpoints/latest)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} not found; pass a step_* directory, a checkpoints folder "
                              f"or a run directory")
    if (path / "recurdepth.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        if (root / "latest").is_file():
            return latest_checkpoint(root)
    if path.name == "latest" and path.is_file():
        return latest_checkpoint(path.parent)
    if (path / "config.json").is_file() or (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a recurdepth checkpoint (no recurdepth.json): a checkpoint of another "
                              f"model or framework; a Hugging Face Huginn directory can be converted with "
                              f"`recurdepth import {path} OUT_DIR`")
    raise CheckpointError(f"{path} is not a recurdepth checkpoint (no recurdepth.json, no `latest`); pass a "
                          f"step_* directory written by `recurdepth train`")


def load_model_weights(path: Path, model, verify: bool = True) -> list[str]:
    """The model weights of checkpoint `path` into `model`, nothing else (no optimizer state, schedule or step):
    `checkpoint.init_from`. megatron's dist_checkpointing reads them under any TP/PP/DP layout. Returns the
    names of this model's tensors the checkpoint does not hold (they keep their initialisation); a tensor of
    another shape is a CheckpointError."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"checkpoint.init_from={path} is not a complete checkpoint (no {MANIFEST}); "
                              f"pick a complete step_* directory")
    if verify:
        verify_checkpoint(path, distributed=True)
    inner = _unwrap(model)
    wanted = inner.sharded_state_dict()
    try:
        saved = set(dist_checkpointing.load_tensors_metadata(str(path)))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"cannot read checkpoint.init_from={path} ({type(exc).__name__}); it is truncated "
                              f"or corrupt: pick another step_* directory") from exc
    request = {name: sh for name, sh in wanted.items() if getattr(sh, "key", None) in saved}
    missing = sorted(name for name, sh in wanted.items()
                     if name not in request and not name.endswith(EXTRA_STATE))
    try:
        loaded = dist_checkpointing.load({"model": request}, str(path))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"cannot load the weights of checkpoint.init_from={path} into this model "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); its shapes differ "
                              f"from the configured model's: use the same model section") from exc
    result = inner.load_state_dict(with_extra_state(inner, loaded["model"]), strict=False)
    unexpected_missing = sorted(k for k in result.missing_keys if k not in missing and not k.endswith(EXTRA_STATE))
    if unexpected_missing:
        raise CheckpointError(f"checkpoint.init_from={path} left {', '.join(unexpected_missing[:5])} unloaded")
    return missing


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
