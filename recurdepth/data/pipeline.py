"""Training data as megatron-core GPT datasets, and the deterministic walk of global batches over them.

Sample `i` of the run is always the same sequence (megatron's shuffled, cached sample index), and the
global batch at `consumed_samples` is `[consumed, consumed + global_batch)`, split over data-parallel
ranks, so resuming from `consumed_samples` replays exactly the uninterrupted sequence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from recurdepth.config import Config
from recurdepth.data.builtin_corpus import prepare_builtin_corpus
from recurdepth.data.masked import MaskedGPTDataset, has_mask, mask_prefix
from recurdepth.data.stepwise import optional_problems
from recurdepth.data.tokenizer import build_tokenizer
from recurdepth.compat.private import size_per_split_per_dataset
from recurdepth.errors import DataError
from recurdepth.objectives.registry import objective_class


@dataclass
class Datasets:
    tokenizer: object
    train: object
    valid: object


def build_datasets(cfg: Config, train_samples: int, valid_samples: int, is_rank_zero: bool = True,
                   need_valid: Optional[bool] = None) -> Datasets:
    """Build (or load cached) blended megatron GPT datasets for training and validation.

    Sources are prepared on rank 0 first (builtin corpus, procedural sets), then every rank opens them.
    The blend is megatron's `BlendedDataset` (exact proportions, deterministic); its index caches live
    under a folder named by the *contents* of the inputs, so editing a corpus in place rebuilds them.

    Before megatron builds anything, `plan_splits` checks that every split the run reads has documents in
    every source (megatron splits by whole documents and loops forever on an empty split) and bounds how often
    a split would be repeated. `need_valid` (default: `valid_samples > 0` and `train.eval_interval > 0`) says
    whether the validation split is used: when it is and a source leaves it empty, that is an error; when it
    is not, an empty validation split is dropped with a warning (`Datasets.valid` is then None).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    d = cfg.data
    tokenizer = build_tokenizer(d.tokenizer, d.tokenizer_model)
    objective = objective_class(cfg.objective.kind)  # the objective's data hooks (objectives/base.py)
    own = objective.datasets(cfg, tokenizer, train_samples, valid_samples)
    if own is not None:
        return Datasets(tokenizer=tokenizer, train=own[0], valid=own[1])
    n_reserved = objective.reserved_positions(cfg)
    parse_split(d.split)  # a malformed data.split is refused before any source is prepared
    if is_rank_zero:
        prefixes = resolve_sources(cfg, tokenizer)
    _barrier()
    prefixes = resolve_sources(cfg, tokenizer)
    weights = [float(src.get("weight", 1.0)) for src in d.sources]
    # megatron's builder rejects zero weights: drop those sources (a weight of 0 means "not in this run")
    blend = [(p, w) for p, w in zip(prefixes, weights) if w > 0]
    gpt_config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length - n_reserved,  # the objective fills the sequence up to seq_length
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
    if need_valid is None:
        need_valid = valid_samples > 0 and cfg.train.eval_interval > 0
    plan = plan_splits(gpt_config, [p for p, _ in blend], [w for _, w in blend] if len(blend) > 1 else None,
                       [train_samples, valid_samples, 0], need_valid, source_names(cfg, blend, prefixes),
                       eval_interval=cfg.train.eval_interval)
    if plan.warning and is_rank_zero:
        print(f"warning: {plan.warning}", file=sys.stderr, flush=True)
    gpt_config.split_matrix = plan.split_matrix
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MaskedGPTDataset, [train_samples, valid_samples, 0], lambda: True, gpt_config).build()
    train = objective.transform_dataset(cfg, tokenizer, train, "train")
    valid = objective.transform_dataset(cfg, tokenizer, valid, "valid")
    return Datasets(tokenizer=tokenizer, train=train, valid=valid)


# ------------------------------------------------------------------------------------------ data phases

@dataclass
class Phase:
    """One phase of the data schedule: from optimizer step `from_step` on, sample `consumed - first_sample` of
    `train` is the run's next sample (each phase reads its blend from its own start)."""

    from_step: int
    first_sample: int
    train: object
    sources: list


@dataclass
class DataPhases:
    phases: list

    def at(self, step: int) -> Phase:
        """The phase of the step taken after `step` steps (0-based: the first step is step 0)."""
        current = self.phases[0]
        for phase in self.phases[1:]:
            if step >= phase.from_step:
                current = phase
        return current


def describe_sources(sources: list) -> str:
    """`stdlib-docs + procedural:arithmetic x0.5`: a blend in a few words, for the progress output."""
    parts = []
    for src in sources:
        kind = next(k for k in ("builtin", "path", "procedural") if k in src)
        name = src[kind] if kind != "procedural" else f"procedural:{src[kind]}"
        weight = float(src.get("weight", 1.0))
        parts.append(name if weight == 1.0 else f"{name} x{weight:g}")
    return " + ".join(parts)


def data_phases(cfg, first: Datasets, is_rank_zero: bool) -> DataPhases:
    """`data.sources` from step 0, then each of `data.phases` from its `from_step`: every phase's training set
    built now (a bad source fails the run before its first step, not hours in). A phase starts reading its
    blend at its first sample whatever came before, so the schedule is a function of the step alone: a resumed
    run reads what the uninterrupted one read."""
    t = cfg.train
    phases = [Phase(0, 0, first.train, list(cfg.data.sources))]
    bounds = [p["from_step"] for p in cfg.data.phases] + [t.steps]
    for spec, end in zip(cfg.data.phases, bounds[1:]):
        phase_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=spec["sources"]))
        built = build_datasets(phase_cfg, (end - spec["from_step"]) * t.global_batch_size, 0, is_rank_zero,
                               need_valid=False)
        phases.append(Phase(spec["from_step"], spec["from_step"] * t.global_batch_size, built.train,
                            list(spec["sources"])))
    return DataPhases(phases)


# ------------------------------------------------------------------------------------------ split planning

SPLIT_NAMES = ("training", "validation", "test")
# a split repeated more often than this is a configuration mistake (a tiny corpus for a long run), and the
# loop in which megatron counts the epochs it needs would take minutes; refused with the numbers
MAX_EPOCHS = 1_000_000


@dataclass
class SplitPlan:
    """What `plan_splits` decided: megatron's split matrix to use (test always None: the run never reads it,
    and an empty one would hang megatron too), and a warning to print (an unused empty validation split
    dropped), or None."""

    split_matrix: list
    warning: Optional[str] = None


def parse_split(split) -> list:
    """`data.split` ("train,valid,test" documents per 100) as three non-negative fractions summing to 1, or a
    one-line DataError."""
    text = str(split)
    parts = [p.strip() for p in text.split(",")]
    # the numbers megatron's own parser reads (plain decimals; it would misread "1e1" or "-5")
    values = [float(p) for p in parts] if all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", p) for p in parts) else None
    if values is None or not 1 <= len(values) <= 3 or sum(values) <= 0:
        raise DataError(f"data.split={text} is not a split; give three non-negative numbers train,validation,test "
                        f"(shares of the documents), e.g. data.split=98,2,0")
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_range(bookends: Optional[tuple], documents: int) -> tuple[int, int]:
    """The [begin, end) documents megatron gives a split (its rounding: BlendedMegatronDatasetBuilder)."""
    if bookends is None:
        return 0, 0
    return int(round(bookends[0] * float(documents))), int(round(bookends[1] * float(documents)))


def _split_text(vector: list) -> str:
    return ",".join(f"{100 * v:.4g}" for v in vector)


def _suggest_split(vector: list, documents: list[int]) -> Optional[str]:
    """The first `T,V,test` (integer percentages, test share kept) giving every source's training and validation
    at least one document, or None when none does (a source with a single document)."""
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    test = round(100 * vector[2])
    for v in (1, 2, 5, 10, 15, 20, 25, 30, 40, 50):
        t = 100 - v - test
        if t <= 0:
            break
        matrix = convert_split_vector_to_split_matrix([t / 100, v / 100, test / 100])
        if all(split_range(matrix[i], n)[1] > split_range(matrix[i], n)[0] for n in documents for i in (0, 1)):
            return f"{t},{v},{test}"
    return None


def _min_documents(matrix: list) -> Optional[int]:
    """The fewest documents for which the split matrix gives training and validation one each, if any."""
    for n in range(2, 100_001):
        if all(split_range(matrix[i], n)[1] > split_range(matrix[i], n)[0] for i in (0, 1)):
            return n
    return None


def plan_splits(gpt_config, prefixes: list[str], weights: Optional[list], sizes: list, need_valid: bool,
                names: Optional[list] = None, eval_interval: int = 0) -> SplitPlan:
    """Check, before megatron builds anything, that every split the run reads has documents in every source and
    is not repeated more than MAX_EPOCHS times; returns the split matrix to build with (see SplitPlan).

    megatron gives split i of a source of N documents the documents [round(lo*N), round(hi*N)) and, for an
    empty one, counts epochs forever (`GPTDataset._get_num_epochs`). Here the same rounding, the same samples
    per source (`_get_size_per_split_per_dataset`) and the same epoch count are computed directly."""
    from megatron.core.datasets.utils import normalize

    from recurdepth.data.preprocess import sequence_lengths

    names = names or list(prefixes)
    vector = parse_split(gpt_config.split)
    split_text = str(gpt_config.split)
    matrix = list(gpt_config.split_matrix)
    matrix[2] = None  # never read by the run
    if weights is None:
        per_source = [list(sizes)]
    else:
        per_source = size_per_split_per_dataset(normalize(weights), list(sizes),
                                                     surplus=gpt_config.mid_level_dataset_surplus)
    lengths = [sequence_lengths(p) for p in prefixes]
    documents = [len(x) for x in lengths]
    warning = None
    if matrix[0] is None:
        raise DataError(f"data.split={split_text} gives training no documents; give it a share, e.g. "
                        f"data.split=98,2,0")
    if need_valid and matrix[1] is None:
        raise DataError(f"data.split={split_text} gives validation no documents but train.eval_interval="
                        f"{eval_interval} validates; give it a share (e.g. data.split=98,2,0) or set "
                        f"train.eval_interval=0")
    for i in (0, 1):
        if matrix[i] is None:
            continue
        for name, lens, n, want in zip(names, lengths, documents, per_source):
            lo, hi = split_range(matrix[i], n)
            if hi > lo:
                continue
            if i == 1 and not need_valid:
                suggestion = _suggest_split(vector, documents)
                warning = (f"data.split={split_text} leaves 0 of {n} documents of {name} for validation; training "
                           f"without a validation split (train.eval_interval={eval_interval} does not use one)"
                           + (f"; data.split={suggestion} would give it documents" if suggestion else ""))
                matrix[1] = None
                break
            fixes = []
            suggestion = _suggest_split(vector, documents)
            if suggestion:
                fixes.append(f"data.split={suggestion}")
            fewest = _min_documents(matrix)
            if fewest is not None and fewest > n:
                fixes.append(f"a corpus of at least {fewest} documents"
                             + (" (this one is a single document: give each paragraph or JSONL line its own, see "
                                "`recurdepth data preprocess --text-docs`)" if n == 1 else ""))
            if i == 1:
                fixes.append("train.eval_interval=0 (no validation)")
            raise DataError(f"data.split={split_text} leaves 0 of {n} documents of {name} for "
                            f"{SPLIT_NAMES[i]} (megatron splits a corpus by whole documents); use "
                            + " or ".join(fixes))
    seq = int(gpt_config.sequence_length)
    extra = int(bool(gpt_config.add_extra_token_to_sequence))
    for i in (0, 1):
        if matrix[i] is None:
            continue
        for name, lens, n, want in zip(names, lengths, documents, per_source):
            lo, hi = split_range(matrix[i], n)
            tokens = int(np.asarray(lens[lo:hi], dtype=np.int64).sum())
            samples = int(want[i] or 0)
            needed = samples * seq + extra
            epochs = max(1, -(-needed // tokens)) if tokens > 0 else math.inf
            if epochs > MAX_EPOCHS:
                raise DataError(f"the run reads {samples} samples of {seq} tokens from the {SPLIT_NAMES[i]} split of "
                                f"{name}, which holds {tokens} tokens in {hi - lo} documents: it would be repeated "
                                f"{epochs if tokens else 'infinitely many'} times (at most {MAX_EPOCHS:,}); use more "
                                f"data, a smaller weight for it, or fewer train.steps")
    return SplitPlan(split_matrix=matrix, warning=warning)


def source_names(cfg: Config, blend: list, prefixes: list) -> list[str]:
    """A readable name of each blended source (its config entry), in blend order."""
    by_prefix = {}
    for src, prefix in zip(cfg.data.sources, prefixes):
        if "path" in src:
            label = str(src["path"])
        elif "builtin" in src:
            label = f"builtin {src['builtin']}"
        else:
            label = f"procedural {src['procedural']} (n={src.get('n', 10000)})"
        by_prefix.setdefault(prefix, label)
    return [by_prefix.get(p, p) for p, _ in blend]


def resolve_sources(cfg: Config, tokenizer) -> list[str]:
    """The indexed-dataset prefix of every configured source, preparing builtin/procedural ones on first use."""
    d = cfg.data
    prefixes = []
    for src in d.sources:
        if "builtin" in src:
            prefixes.append(prepare_builtin_corpus(d.cache_dir, d.builtin_max_mb, tokenizer))
        elif "procedural" in src:
            from recurdepth.data.procedural_corpus import prepare_procedural_corpus

            objective = objective_class(cfg.objective.kind)
            pad_to = cfg.model.seq_length - objective.reserved_positions(cfg) if src.get("pad") else 0
            prefixes.append(prepare_procedural_corpus(
                src["procedural"], int(src.get("n", 10000)), src.get("difficulty"), int(src.get("seed", 0)),
                tokenizer, d.cache_dir, pad_to=pad_to, **objective.procedural_options(cfg, tokenizer)))
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
    `problems` the step-by-step problems of the samples when the data has them (data/stepwise.py); `sizes` their
    problem sizes when it has them (data/sized.py)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    sample_ids: list
    problems: Optional[list] = None
    sizes: Optional[list] = None


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
            sizes=[s["size"] for s in samples] if samples and "size" in samples[0] else None,
        ))
    return out
