"""Answer-only loss masks carried through megatron-core's GPT datasets.

A masked corpus is two megatron indexed datasets with identical document lengths:
    <prefix>.bin/.idx            token ids (prompt, answer, eod per document)
    <prefix>_lossmask.bin/.idx   one uint8 per token: 1 where the token is a training target
`MaskedGPTDataset` is megatron's `GPTDataset` (same shuffling, packing and caching) that reads the mask
with the very same sample index, so a label's loss counts only where the mask marks it. Corpora
without a mask file behave exactly like `GPTDataset`. Every dataset in a blend uses this class.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from recurdepth.atomic import commit_staged

MASK_SUFFIX = "_lossmask"


def mask_prefix(prefix: str) -> str:
    return str(prefix) + MASK_SUFFIX


def has_mask(prefix: str) -> bool:
    return Path(mask_prefix(prefix) + ".idx").is_file()


class MaskedGPTDataset(GPTDataset):
    """megatron `GPTDataset` whose `loss_mask` is also zero wherever `<prefix>_lossmask` says 0."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self.mask_dataset = IndexedDataset(mask_prefix(dataset_path)) if dataset_path and has_mask(dataset_path) else None

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        if self.mask_dataset is None or idx is None:
            return sample
        tokens_dataset = self.dataset
        try:  # megatron's own packing logic, pointed at the mask dataset: the same documents and offsets
            self.dataset = self.mask_dataset
            mask, _ = self._query_document_sample_shuffle_indices(idx)
        finally:
            self.dataset = tokens_dataset
        target = torch.from_numpy(np.asarray(mask[1:], dtype=np.int64) == 1).to(sample["loss_mask"].dtype)
        sample["loss_mask"] = sample["loss_mask"] * target
        return sample


def write_masked_documents(documents: Iterable[tuple[Sequence[int], Sequence[int]]], prefix: str,
                           vocab_size: int) -> dict:
    """Write (token ids, target mask) documents as `<prefix>` + `<prefix>_lossmask`, atomically.

    Files are written under a temporary name in the same folder, fsynced and renamed only when both are
    complete. Returns counts: documents, tokens, target tokens.
    """
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{os.getpid()}"
    dtype = np.uint16 if vocab_size <= 65535 else np.int32
    tokens = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    masks = IndexedDatasetBuilder(mask_prefix(tmp) + ".bin", dtype=np.uint8)
    docs = n_tokens = n_targets = 0
    try:
        for ids, mask in documents:
            if len(ids) != len(mask):
                raise ValueError(f"document {docs}: {len(ids)} tokens but {len(mask)} mask entries")
            tokens.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            masks.add_document(np.asarray(mask, dtype=np.uint8), [len(mask)])
            docs, n_tokens, n_targets = docs + 1, n_tokens + len(ids), n_targets + int(np.sum(mask))
        tokens.finalize(tmp + ".idx")
        masks.finalize(mask_prefix(tmp) + ".idx")
        # fsynced, renamed, folder fsynced; the tokens last: they mark "done"
        commit_staged((src + ext, dst + ext) for src, dst in ((mask_prefix(tmp), mask_prefix(prefix)), (tmp, prefix))
                      for ext in (".bin", ".idx"))
    finally:
        for leftover in (tmp, mask_prefix(tmp)):
            for ext in (".bin", ".idx"):
                if os.path.exists(leftover + ext):
                    os.remove(leftover + ext)
    return {"documents": docs, "tokens": n_tokens, "target_tokens": n_targets}


def remove_dataset(prefix: str) -> None:
    for p in (prefix, mask_prefix(prefix)):
        for ext in (".bin", ".idx"):
            if os.path.exists(p + ext):
                os.remove(p + ext)
    shutil.rmtree(str(prefix) + ".cache", ignore_errors=True)
