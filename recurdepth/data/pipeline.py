"""Training data as megatron-core GPT datasets, and the deterministic walk of global batches over them.

Sample `i` of the run is always the same sequence (megatron's shuffled, cached sample index), and the
global batch at `consumed_samples` is `[consumed, consumed + global_batch)`, split over data-parallel
ranks, so resuming from `consumed_samples` replays exactly the uninterrupted sequence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from recurdepth.config import Config
from recurdepth.data.builtin_corpus import prepare_builtin_corpus
from recurdepth.data.masked import MaskedGPTDataset, has_mask, mask_prefix
from recurdepth.data.pauses import PauseInserted, pause_token, pauses_per_sequence
from recurdepth.data.stepwise import optional_problems
from recurdepth.data.tokenizer import build_tokenizer
from recurdepth.errors import DataError


@dataclass
class Datasets:
    tokenizer: object
    train: object
    valid: object


def build_datasets(cfg: Config, train_samples: int, valid_samples: int, is_rank_zero: bool = True) -> Datasets:
    """Build (or load cached) blended megatron GPT datasets for training and validation.

    Sources are prepared on rank 0 first (builtin corpus, procedural sets), then every rank opens them.
    The blend is megatron's `BlendedDataset` (exact proportions, deterministic); its index caches live
    under a folder named by the *contents* of the inputs, so editing a corpus in place rebuilds them.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer, d.tokenizer_model)
    if cfg.objective.kind == "coconut":  # one step-by-step problem per sample, never packed
        return stepwise_datasets(cfg, tokenizer, train_samples, valid_samples)
    pause = pause_token(cfg, tokenizer) if cfg.objective.kind == "pause" else None
    n_pauses = pauses_per_sequence(cfg)
    if is_rank_zero:
        prefixes = resolve_sources(cfg, tokenizer)
    _barrier()
    prefixes = resolve_sources(cfg, tokenizer)
    weights = [float(src.get("weight", 1.0)) for src in d.sources]
    # megatron's builder rejects zero weights: drop those sources (a weight of 0 means "not in this run")
    blend = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
    gpt_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length - n_pauses,  # pauses fill the sequence up to seq_length
        blend=([p for p, _ in blend], [w for _, w in blend] if len(blend) > 1 else None),
        split=d.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(Path(d.cache_dir) / "index-cache" / content_fingerprint([p for p, _ in blend])),
        mmap_bin_files=True,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MaskedGPTDataset, [train_samples, valid_samples, 0], lambda: True, gpt_config).build()
    if n_pauses:
        train, valid = (PauseInserted(ds, pause[0], n_pauses, cfg.train.seed, pause[1]) if ds is not None else None
                        for ds in (train, valid))
    return Datasets(tokenizer=tokenizer, train=train, valid=valid)


def stepwise_datasets(cfg: Config, tokenizer, train_samples: int, valid_samples: int) -> Datasets:
    """Coconut's data: step-by-step problems from the procedural sources, checked to fit every stage."""
    from recurdepth.data.stepwise import StepwiseProblems, check_fits, stage_layouts

    o, s = cfg.objective, cfg.model.seq_length
    train, valid = (StepwiseProblems(cfg.data.sources, tokenizer, max(n, 1), s, cfg.train.seed, split)
                    for n, split in ((train_samples, "train"), (valid_samples, "test")))
    layouts = stage_layouts(o.coconut_thoughts_per_step, o.coconut_max_stage)
    for ds in (train, valid):
        check_fits(ds, layouts, s)
    return Datasets(tokenizer=tokenizer, train=train, valid=valid)


def resolve_sources(cfg: Config, tokenizer) -> list[str]:
    """The indexed-dataset prefix of every configured source, preparing builtin/procedural ones on first use."""
    d = cfg.data
    prefixes = []
    for src in d.sources:
        if "builtin" in src:
            prefixes.append(prepare_builtin_corpus(d.cache_dir, d.builtin_max_mb, tokenizer))
        elif "procedural" in src:
            from recurdepth.data.procedural_corpus import prepare_procedural_corpus

            pad_to = cfg.model.seq_length - pauses_per_sequence(cfg) if src.get("pad") else 0
            prefixes.append(prepare_procedural_corpus(
                src["procedural"], int(src.get("n", 10000)), src.get("difficulty"), int(src.get("seed", 0)),
                tokenizer, d.cache_dir, pad_to=pad_to, **answer_pauses(cfg, tokenizer)))
        else:
            from recurdepth.data.preprocess import check_indexed_dataset, check_tokenizer_matches

            prefix = str(src["path"])
            for ext in (".bin", ".idx"):
                if not Path(prefix + ext).is_file():
                    raise DataError(f"indexed dataset file {prefix + ext!r} not found; run `recurdepth data "
                                    f"preprocess` to create it or fix data.sources")
            check_indexed_dataset(prefix)  # truncated .idx, .bin/.idx size mismatch
            # a dataset tokenized by another tokenizer than data.tokenizer (when its manifest says so)
            check_tokenizer_matches(prefix, tokenizer, require_manifest=False)
            prefixes.append(prefix)
    return prefixes


def answer_pauses(cfg: Config, tokenizer) -> dict:
    """Finetuning with pauses: `objective.pause_count` pauses (or supervised fillers) between the prompt and the
    answer of every procedural sample (keyword arguments of `prepare_procedural_corpus`)."""
    o = cfg.objective
    if o.kind != "pause" or not o.pause_count:
        return {}
    token, supervised = pause_token(cfg, tokenizer)
    return {"filler": (token,) * o.pause_count, "filler_target": supervised}


def content_fingerprint(prefixes: list[str]) -> str:
    """A short hash of the datasets' contents: the whole .idx (document lengths and offsets) plus the .bin
    size and its first and last MiB. Changing a corpus file in place changes the key."""
    h = hashlib.sha256()
    for prefix in prefixes:
        h.update(Path(prefix + ".idx").read_bytes())
        bin_path = Path(prefix + ".bin")
        size = bin_path.stat().st_size
        h.update(str(size).encode())
        with open(bin_path, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
        if has_mask(prefix):
            h.update(Path(mask_prefix(prefix) + ".idx").read_bytes())
            h.update(Path(mask_prefix(prefix) + ".bin").read_bytes()[: 1 << 20])
    return h.hexdigest()[:16]


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@dataclass
class MicroBatch:
    """One micro-batch: `tokens`, `labels`, `loss_mask` are `[b, s]`; `sample_ids` the global sample indices;
    `problems` the step-by-step problems of the samples when the data has them (data/stepwise.py)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    sample_ids: list
    problems: Optional[list] = None


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
            problems=optional_problems(samples),
        ))
    return out
