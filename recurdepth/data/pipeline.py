"""Training data as megatron-core GPT datasets, and the deterministic walk of global batches over them.

Sample `i` of the run is always the same sequence (megatron's shuffled, cached sample index), and the
global batch at `consumed_samples` is `[consumed, consumed + global_batch)`, split over data-parallel
ranks, so resuming from `consumed_samples` replays exactly the uninterrupted sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from recurdepth.config import Config
from recurdepth.data.builtin_corpus import prepare_builtin_corpus
from recurdepth.data.tokenizer import build_tokenizer
from recurdepth.errors import DataError


@dataclass
class Datasets:
    tokenizer: object
    train: object
    valid: object


def build_datasets(cfg: Config, train_samples: int, valid_samples: int, is_rank_zero: bool = True) -> Datasets:
    """Build (or load cached) megatron GPT datasets for training and validation."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer)
    if d.source == "builtin":
        if is_rank_zero:
            prefixes = [prepare_builtin_corpus(d.cache_dir, d.builtin_max_mb, tokenizer)]
        _barrier()
        prefixes = [prepare_builtin_corpus(d.cache_dir, d.builtin_max_mb, tokenizer)]
        weights = None
    else:
        prefixes = [str(p) for p in d.paths]
        for p in prefixes:
            for ext in (".bin", ".idx"):
                if not Path(p + ext).is_file():
                    raise DataError(f"indexed dataset file {p + ext!r} not found; run `recurdepth data preprocess` "
                                    f"or fix data.paths")
        weights = [float(w) for w in d.weights] if d.weights else None
    blend = (prefixes, weights)
    gpt_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=blend,
        split=d.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(Path(d.cache_dir) / "index-cache"),
        mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, gpt_config).build()
    return Datasets(tokenizer=tokenizer, train=train, valid=valid)


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass
class MicroBatch:
    """One micro-batch: `tokens`, `labels`, `loss_mask` are `[b, s]`; `sample_ids` the global sample indices."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    sample_ids: list


def rank_sample_ids(consumed_samples: int, global_batch: int, dp_rank: int, dp_size: int) -> range:
    """The sample indices of this data-parallel rank's share of the global batch at `consumed_samples`."""
    per_rank = global_batch // dp_size
    start = consumed_samples + dp_rank * per_rank
    return range(start, start + per_rank)


def micro_batches(dataset, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int,
                  dp_size: int, device: torch.device | str = "cpu") -> list[MicroBatch]:
    """This rank's micro-batches of the global batch starting at `consumed_samples`."""
    ids = list(rank_sample_ids(consumed_samples, global_batch, dp_rank, dp_size))
    out = []
    for i in range(0, len(ids), micro_batch):
        chunk = ids[i:i + micro_batch]
        samples = [dataset[j % len(dataset)] for j in chunk]
        out.append(MicroBatch(
            tokens=torch.stack([s["tokens"] for s in samples]).to(device, non_blocking=True),
            labels=torch.stack([s["labels"] for s in samples]).to(device, non_blocking=True),
            loss_mask=torch.stack([s["loss_mask"] for s in samples]).to(device, non_blocking=True),
            sample_ids=chunk,
        ))
    return out
