"""`recurdepth export CHECKPOINT --format hf-huginn OUT/` and `recurdepth import HF_DIR OUT/`.

Export writes a Hugging Face directory in Huginn-0125's format (see `hf_huginn`); import turns one back into a
recurdepth checkpoint folder (`OUT/step_00000000`, `OUT/latest`): model weights, a fresh optimizer state, the
config, reshardable to any TP/PP layout when loaded."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

from recurdepth.atomic import fsync_dir, write_atomically
from recurdepth.errors import ConfigError
from recurdepth.model.names import local_name, to_local

FORMATS = ("hf-huginn",)
_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names; torch is imported when a command runs

if TYPE_CHECKING:
    import torch


def write_checkpoint(cfg, model, root: Path, vocab_size: int) -> Path:
    """Save `model` (with a fresh optimizer and scheduler) as step 0 under `root`, like a training checkpoint."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from recurdepth.train.checkpoint import TrainState, save_checkpoint
    from recurdepth.train.trainer import build_optimizer

    dtype = next(model.parameters()).dtype
    ddp = DistributedDataParallel(config=model.config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.optimizer.distributed))
    optimizer, scheduler = build_optimizer(cfg, ddp, dtype)
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        _zero_adam_state(inner.optimizer)
    return save_checkpoint(Path(root), TrainState(), ddp, optimizer, scheduler, cfg.to_dict(), vocab_size=vocab_size)


def _zero_adam_state(adam: torch.optim.Optimizer) -> None:
    """Adam state as before the first step (zero moments, step 0): what a checkpoint needs to hold, with no step
    taken, so that the weights stay exactly as imported."""
    import torch

    for group in adam.param_groups:
        for p in group["params"]:
            state = adam.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p.data),
                             exp_avg_sq=torch.zeros_like(p.data))


def export_checkpoint(checkpoint: str, out_dir: str, fmt: str = "hf-huginn", dtype: str = "float32",
                      tokenizer=None, overwrite: bool = False, verify: bool = True) -> Path:
    """Export `checkpoint` to `out_dir` (refused, before anything is loaded, when `out_dir` is a file or a
    non-empty directory without `overwrite`; and when a checkpoint file fails its checksum, unless not `verify`)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    from recurdepth.export.hf_huginn import check_export_target, check_exportable, export_huginn
    from recurdepth.infer.loading import checkpoint_config, load_model, resolve_checkpoint

    check_export_target(Path(out_dir), overwrite)
    check_exportable(checkpoint_config(resolve_checkpoint(checkpoint)))  # refuse before building anything
    loaded = load_model(checkpoint, tokenizer=tokenizer, verify=verify)
    import torch

    return export_huginn(loaded, Path(out_dir), getattr(torch, dtype), overwrite=overwrite)


def check_import_target(out: Path) -> None:
    """Refuse an import into a file, under one, or into a folder that already holds checkpoints (its `latest`
    would be repointed at the imported step 0, and the next `train` there would overwrite the run's own steps)
    or a tokenizer.model."""
    from recurdepth.export.hf_huginn import TOKENIZER, ExportError, check_output_path

    check_output_path(out, "import")
    if not out.is_dir():
        return
    for folder in (out, out / "checkpoints"):  # a checkpoints folder, or the run directory above one
        if not folder.is_dir():
            continue
        steps = sorted(p.name for p in folder.iterdir() if p.name.startswith("step_"))
        if steps or (folder / "latest").exists() or (folder / "latest").is_symlink():
            newest = f"newest {steps[-1]}" if steps else "a `latest` pointer"
            where = out if folder == out else f"{out} is a run directory: {folder}"
            raise ExportError(f"{where} already holds checkpoints ({newest}); import into an empty or new folder")
    if (out / TOKENIZER).exists():
        raise ExportError(f"{out} already holds a {TOKENIZER}; import into an empty or new folder")


def import_checkpoint(hf_dir: str, out_dir: str) -> Path:
    """A huginn_raven directory -> `out_dir/step_00000000` (+ `latest`, and the tokenizer when there is one).

    Everything is read and checked first, then built in a folder beside `out_dir` and moved into place at the
    end, under the run-directory lock of `out_dir`: a refused or failed import leaves `out_dir` as it was."""
    from recurdepth.data.tokenizer import build_tokenizer
    from recurdepth.export.hf_huginn import (TOKENIZER, ExportError, Staging, check_imported_shapes,
                                             from_huginn_state, read_huginn, real_path,
                                             recurdepth_config_from_huginn)
    from recurdepth.infer.loading import init_single_process
    from recurdepth.model.build import build_model
    from recurdepth.train.lock import run_dir_lock

    hf_dir, out = Path(hf_dir), real_path(Path(out_dir))
    check_import_target(out)
    config, hf_state = read_huginn(hf_dir)
    tok_src = hf_dir / TOKENIZER if (hf_dir / TOKENIZER).is_file() else None
    if tok_src is None and config.get("recurdepth_tokenizer", "sentencepiece") != "byte":
        raise ExportError(f"{hf_dir} has no {TOKENIZER}; put the sentencepiece model the weights were trained with "
                          f"next to them (recurdepth export writes it there)")
    rows = hf_state["transformer.wte.weight"].shape[0]
    # the config names the tokenizer where it will be (out/tokenizer.model); it is read from where it is now
    cfg = recurdepth_config_from_huginn(config, out / TOKENIZER if tok_src else None, rows)
    tok = build_tokenizer(cfg.data.tokenizer, tok_src if tok_src else cfg.data.tokenizer_model)
    init_single_process(cfg)
    dtype = hf_state["transformer.wte.weight"].dtype
    model = build_model(cfg, tok.vocab_size, dtype)
    weights = from_huginn_state(hf_state, cfg)
    check_imported_shapes(to_local(model.state_dict()), weights)
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():  # either spec's names (the TE spec where it is the default)
            param.copy_(weights[local_name(name)])
    made = [p for p in [out, *out.parents] if not p.exists()]  # taking the lock creates them
    try:
        with run_dir_lock(out, "import"):
            check_import_target(out)  # again, now that no train or import can start there
            staging = Staging(out, "import")
            tmp = staging.path
            try:
                if tok_src is not None:
                    write_atomically(tmp / TOKENIZER, tok_src.read_bytes())
                path = write_checkpoint(cfg, model, tmp, tok.vocab_size)
                names = [p.name for p in tmp.iterdir() if p.name != "latest"] + ["latest"]  # the pointer last
                moved = []
                try:
                    for name in names:
                        os.replace(tmp / name, out / name)
                        moved.append(name)
                    fsync_dir(out)  # the renames survive a crash
                except OSError:
                    for name in moved:  # nothing half-moved stays behind
                        target = out / name
                        if target.is_dir():
                            shutil.rmtree(target, ignore_errors=True)
                        else:
                            target.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise ExportError(f"writing the import to {out} failed ({exc.strerror or exc}); nothing was "
                                  f"written there") from None
            finally:
                staging.discard(parents=False)
    except BaseException:
        for p in made:  # made by taking the lock; empty again once the lock is released
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return out / path.name


def _export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir, args.format, args.dtype, args.tokenizer,
                            overwrite=args.overwrite, verify=not args.no_verify)
    print(f"wrote {out} (huginn_raven: config.json, model.safetensors)", flush=True)
    return 0


def _import(args: argparse.Namespace) -> int:
    path = import_checkpoint(args.hf_dir, args.out_dir)
    print(f"wrote {path}", flush=True)
    return 0


def add_export_parsers(verbs) -> None:
    e = verbs.add_parser("export", help="export a checkpoint: recurdepth export CKPT --format hf-huginn OUT_DIR")
    e.add_argument("checkpoint", help="a step_* checkpoint directory, its checkpoints folder or the run directory")
    e.add_argument("out_dir")
    e.add_argument("--format", default="hf-huginn", help="hf-huginn: Huginn-0125's Hugging Face format (default)")
    e.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the written weights")
    e.add_argument("--tokenizer", default=None, help="tokenizer instead of the checkpoint's ('byte' or a .model)")
    e.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty OUT_DIR, replacing the export's files there (other files are kept)")
    e.add_argument("--no-verify", action="store_true",
                   help="load the checkpoint without checking its files against the sha256 sums written at save")
    e.set_defaults(func=_export)
    i = verbs.add_parser("import", help="import a Huginn-format directory: recurdepth import HF_DIR OUT_CHECKPOINTS")
    i.add_argument("hf_dir")
    i.add_argument("out_dir", help="checkpoint folder to write (step_00000000 and latest); new or empty, never "
                                   "one that holds checkpoints")
    i.set_defaults(func=_import)
