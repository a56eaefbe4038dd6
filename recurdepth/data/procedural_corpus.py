"""Procedural tasks as a training corpus: verified samples -> (tokens, answer-only mask) documents ->
a masked megatron indexed dataset (see `masked.py`), prepared once and cached by its defining key
(task, n, difficulty, seed, tokenizer)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from recurdepth.atomic import write_atomically
from recurdepth.data.masked import write_masked_documents
from recurdepth.data.procedural.base import encode_with_mask
from recurdepth.data.procedural.splits import generate_split
from recurdepth.errors import DataError


def prepare_procedural_corpus(task: str, n: int, difficulty: Optional[Mapping[str, Any]], seed: int,
                              tokenizer, cache_dir: str, split: str = "train", filler: Sequence[int] = (),
                              filler_target: bool = False, pad_to: int = 0) -> str:
    """Write (once) `n` verified samples of `task` as a masked indexed dataset; returns its prefix. `filler`:
    token ids (e.g. pauses) between prompt and answer, targets only if `filler_target` (`encode_with_mask`).
    `pad_to` S > 0: every sample padded with eod tokens (no loss) to exactly S tokens, the training sequence
    length, so megatron's packing puts one whole sample at the start of each window (none cut in two)."""
    keys = [task, n, dict(difficulty or {}), seed, split, tokenizer.fingerprint()]
    if filler:  # corpora without filler keep their existing cache keys
        keys += [list(map(int, filler)), bool(filler_target)]
    if pad_to:
        keys += [{"pad_to": int(pad_to)}]
    key = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / f"procedural-{task.replace(':', '_')}-{split}-{key}"
    prefix = folder / "corpus"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return str(prefix)
    samples = generate_split(task, n, split, difficulty, seed)  # each one checked by its verifier
    documents = (encode_with_mask(s, tokenizer, filler=filler, filler_target=filler_target) for s in samples)
    if pad_to:
        documents = list(documents)
        longest = max(len(ids) for ids, _ in documents)
        if longest > pad_to:
            raise DataError(f"procedural source {task!r} with pad: true has samples of up to {longest} tokens, "
                            f"longer than the {pad_to}-token training sequence; raise model.seq_length to at least "
                            f"{longest} (plus the positions the objective inserts) or make the task's samples shorter")
        documents = [(ids + [tokenizer.eod] * (pad_to - len(ids)), mask + [0] * (pad_to - len(ids)))
                     for ids, mask in documents]
    counts = write_masked_documents(documents, str(prefix), tokenizer.vocab_size)
    write_atomically(manifest, json.dumps({"task": task, "n": n, "difficulty": dict(difficulty or {}), "seed": seed,
                                           "split": split, "tokenizer": tokenizer.fingerprint(), **counts},
                                          indent=1))  # the manifest marks the corpus complete
    return str(prefix)
