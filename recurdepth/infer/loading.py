"""A trained model for inference: a recurdepth checkpoint loaded into one process (TP = PP = 1, any saved
layout: checkpoints reshard on load), with its tokenizer and resolved config."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from recurdepth.config import Config, config_from_dict
from recurdepth.errors import CheckpointError, ConfigError
from recurdepth.model.names import with_extra_state
from recurdepth.train.checkpoint import resolve_checkpoint  # noqa: F401 - re-exported: callers import it here


@dataclass
class LoadedModel:
    model: object  # LoopedGPTModel, eval mode
    cfg: Config
    tokenizer: object
    path: Path
    vocab_size: int  # the tokenizer's (unpadded) vocabulary


def checkpoint_config(path: Path) -> Config:
    """The validated config stored in a checkpoint; a config this version cannot read is another architecture."""
    from recurdepth.train.checkpoint import saved_config

    raw = saved_config(path)
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path} holds no recurdepth model config; it is a checkpoint of another architecture")
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise CheckpointError(f"{path} was written for another architecture or recurdepth version ({exc})") from None


def single_process_layout(cfg: Config) -> Config:
    """The config with every model-parallel size set to 1 (inference runs in one process)."""
    cfg.parallel.tensor = cfg.parallel.pipeline = cfg.parallel.expert = 1
    cfg.parallel.sequence_parallel = False
    return cfg


def init_single_process(cfg: Config) -> torch.device:
    """torch.distributed (world 1) + megatron parallel state for one process; refuses a multi-process launch."""
    from recurdepth.distributed import discover_ranks, init_distributed

    info = discover_ranks()
    if info.world_size > 1:
        raise ConfigError(f"inference and export run in one process (TP = PP = 1), but {info.world_size} were "
                          f"launched; run the command without torchrun/srun/mpirun")
    if not torch.distributed.is_initialized():
        from recurdepth.distributed import _free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port("127.0.0.1"))
    return init_distributed(cfg, info)


def load_tokenizer(cfg: Config, override: Optional[str] = None):
    """The checkpoint's tokenizer (`data.tokenizer`, `data.tokenizer_model`) or `override` (byte, a .model, or a
    tokenizer.json or its folder)."""
    from recurdepth.data.tokenizer import build_tokenizer, tokenizer_from_spec

    if override:
        return tokenizer_from_spec(override)
    model = cfg.data.tokenizer_model
    if cfg.data.tokenizer == "sentencepiece" and model and not (
            Path(model).is_file() or Path(model + ".model").is_file()):
        from recurdepth.errors import DataError

        raise DataError(f"the checkpoint's tokenizer {model!r} is missing; pass --tokenizer "
                        f"PATH.model (the sentencepiece model it was trained with)")
    if cfg.data.tokenizer == "hf" and model and not (
            Path(model).is_file() or (Path(model) / "tokenizer.json").is_file()):
        from recurdepth.errors import DataError

        raise DataError(f"the checkpoint's tokenizer {model!r} is missing; pass --tokenizer PATH/tokenizer.json (the "
                        f"Hugging Face tokenizer it was trained with, or its folder)")
    return build_tokenizer(cfg.data.tokenizer, model)


def require_looped(loaded: "LoadedModel", what: str) -> None:
    """Refuse `what` (a verb that runs the looped model's recurrence, e.g. its KV-cached decoder) on a
    model.kind=dense checkpoint, in one line."""
    if loaded.cfg.model.kind != "looped":
        raise CheckpointError(f"{loaded.path} holds a model.kind=dense megatron GPTModel; {what} runs looped models "
                              f"only (recurrence, per-iteration exits)")


def load_model(path: str | Path, tokenizer: Optional[str] = None, dtype: torch.dtype = torch.float32,
               overrides: Optional[dict] = None, verify: bool = True) -> LoadedModel:
    """Build the checkpoint's model for this process and load its weights (no optimizer state), after checking
    every file against the sha256 sums written at save (`verify`)."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from recurdepth.model.build import build_model

    ckpt = resolve_checkpoint(path)
    cfg = single_process_layout(checkpoint_config(ckpt))
    for key, value in (overrides or {}).items():
        setattr(cfg.model, key, value)
    cfg.train.compile = False  # a training option: the decoder runs one token at a time through the eager blocks
    tok = load_tokenizer(cfg, tokenizer)
    saved_vocab = json.loads((ckpt / "recurdepth.json").read_text()).get("vocab_size")
    if saved_vocab is not None and saved_vocab != tok.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but checkpoint {ckpt} was trained with "
                              f"{saved_vocab}; pass the tokenizer it was trained with (--tokenizer)")
    if verify:
        from recurdepth.train.checkpoint import verify_checkpoint

        verify_checkpoint(ckpt)
    device = init_single_process(cfg)
    model = build_model(cfg, tok.vocab_size, dtype, device)
    sharded = {"model": model.sharded_state_dict()}
    try:
        loaded = dist_checkpointing.load(sharded, str(ckpt))
    except (Exception, CheckpointException) as exc:
        raise CheckpointError(f"cannot load the model weights of {ckpt} ({type(exc).__name__}); it is truncated or "
                              f"from another model shape") from exc
    model.load_state_dict(with_extra_state(model, loaded["model"]))
    model.eval()
    return LoadedModel(model=model, cfg=cfg, tokenizer=tok, path=ckpt, vocab_size=tok.vocab_size)
