"""`model.vocab_size` is what training builds: the embedding and output rows are model.vocab_size (rounded up to
make_vocab_size_divisible_by), padding beyond the tokenizer's ids; one smaller than the tokenizer's is refused;
unset, the tokenizer's size is used. plan sizes the same number."""

from __future__ import annotations

import pytest

from recurdepth.config import load_config
from recurdepth.errors import ConfigError

SMALL = ["model.hidden_size=32", "model.num_heads=2", "model.core_layers=1", "model.seq_length=16"]


def rows(model) -> int:
    return model.embedding.word_embeddings.weight.shape[0]


def test_vocab_size_is_honoured_padded_and_checked(megatron_single_process):
    from recurdepth.model.build import build_model

    assert rows(build_model(load_config(None, SMALL), 300)) == 384  # the tokenizer's 300, rounded to 128
    model = build_model(load_config(None, SMALL + ["model.vocab_size=1000"]), 300)
    assert rows(model) == model.vocab_size == 1024
    with pytest.raises(ConfigError, match=r"model.vocab_size=200 is smaller than the tokenizer's vocabulary \(300"):
        build_model(load_config(None, SMALL + ["model.vocab_size=200"]), 300)


def test_plan_sizes_the_vocabulary_training_builds(megatron_single_process):
    from recurdepth.model.build import model_vocab_size
    from recurdepth.plan import resolve_vocab_size

    for extra in ([], ["model.vocab_size=1000"], ["model.vocab_size=65536"]):
        cfg = load_config(None, SMALL + extra)
        assert resolve_vocab_size(cfg, 300) == model_vocab_size(cfg, 300), extra


def test_the_vocabulary_rule_needs_no_torch():
    """plan sizes the vocabulary by training's rule without importing torch or megatron (plan stays fast)."""
    import subprocess
    import sys

    code = ("import sys; from recurdepth.config import load_config; from recurdepth.plan import resolve_vocab_size; "
            "assert resolve_vocab_size(load_config(None, ['model.vocab_size=1000']), 300) == 1024; "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
