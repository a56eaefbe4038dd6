"""How many embedding and output rows a model has: the one rule, torch-free (training builds with it, plan sizes
with it)."""

from __future__ import annotations

import math

from recurdepth.errors import ConfigError


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """Vocabulary rounded up to `multiple` (independent of TP, so checkpoints reshard across TP sizes)."""
    return int(math.ceil(vocab_size / multiple) * multiple)


def model_vocab_size(cfg, tokenizer_vocab: int) -> int:
    """The embedding and output rows: `model.vocab_size` when set (at least the tokenizer's: the extra rows are
    padding no token id reaches), else the tokenizer's; rounded up to `model.make_vocab_size_divisible_by`."""
    wanted = cfg.model.vocab_size
    if wanted is not None and wanted < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={wanted} is smaller than the tokenizer's vocabulary ({tokenizer_vocab} "
                          f"ids); set model.vocab_size >= {tokenizer_vocab} or null (= the tokenizer's)")
    return padded_vocab_size(wanted or tokenizer_vocab, cfg.model.make_vocab_size_divisible_by)
