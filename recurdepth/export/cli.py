"""`recurdepth export CHECKPOINT --format hf-huginn OUT/` and `recurdepth import HF_DIR OUT/`.

Export writes a Hugging Face directory in Huginn-0125's format (see `hf_huginn`); import turns one back into a
recurdepth checkpoint folder (`OUT/step_00000000`, `OUT/latest`): model weights, a fresh optimizer state, the
config, reshardable to any TP/PP layout when loaded."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from recurdepth.errors import ConfigError

FORMATS = ("hf-huginn",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    for group in adam.param_groups:
        for p in group["params"]:
            state = adam.state[p]
            if not state:
                state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p.data),
                             exp_avg_sq=torch.zeros_like(p.data))


def export_checkpoint(checkpoint: str, out_dir: str, fmt: str = "hf-huginn", dtype: str = "float32",
                      tokenizer=None) -> Path:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
    from recurdepth.export.hf_huginn import check_exportable, export_huginn
    from recurdepth.infer.loading import checkpoint_config, load_model, resolve_checkpoint

    check_exportable(checkpoint_config(resolve_checkpoint(checkpoint)))  # refuse before building anything
    loaded = load_model(checkpoint, tokenizer=tokenizer)
    return export_huginn(loaded, Path(out_dir), _DTYPES[dtype])


def import_checkpoint(hf_dir: str, out_dir: str) -> Path:
    """A huginn_raven directory -> `out_dir/step_00000000` (+ `latest`, and the tokenizer when there is one)."""
    from recurdepth.data.tokenizer import build_tokenizer
    from recurdepth.export.hf_huginn import (TOKENIZER, check_imported_shapes, from_huginn_state, read_huginn,
                                             recurdepth_config_from_huginn)
    from recurdepth.infer.loading import init_single_process
    from recurdepth.model.build import build_model

    hf_dir, out = Path(hf_dir), Path(out_dir)
    config, hf_state = read_huginn(hf_dir)
    tok_file = None
    if (hf_dir / TOKENIZER).is_file():
        out.mkdir(parents=True, exist_ok=True)
        tok_file = out / TOKENIZER
        shutil.copyfile(hf_dir / TOKENIZER, tok_file)
    elif config.get("recurdepth_tokenizer", "sentencepiece") != "byte":
        from recurdepth.export.hf_huginn import ExportError

        raise ExportError(f"{hf_dir} has no {TOKENIZER}; put the sentencepiece model the weights were trained with "
                          f"next to them (recurdepth export writes it there)")
    rows = hf_state["transformer.wte.weight"].shape[0]
    cfg = recurdepth_config_from_huginn(config, tok_file, rows)
    tok = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model)
    init_single_process(cfg)
    dtype = hf_state["transformer.wte.weight"].dtype
    model = build_model(cfg, tok.vocab_size, dtype)
    weights = from_huginn_state(hf_state, cfg)
    check_imported_shapes(model.state_dict(), weights)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(weights[name])
    return write_checkpoint(cfg, model, out, tok.vocab_size)


def _export(args: argparse.Namespace) -> int:
    out = export_checkpoint(args.checkpoint, args.out_dir, args.format, args.dtype, args.tokenizer)
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
    e.set_defaults(func=_export)
    i = verbs.add_parser("import", help="import a Huginn-format directory: recurdepth import HF_DIR OUT_CHECKPOINTS")
    i.add_argument("hf_dir")
    i.add_argument("out_dir", help="checkpoint folder to write (step_00000000 and latest)")
    i.set_defaults(func=_import)
