"""`pad: true` on a procedural source: every training window starts with one whole sample (megatron's packing
otherwise cuts short samples across windows, training answers without their question)."""

import pytest

from recurdepth.config import load_config
from recurdepth.data.pipeline import build_datasets
from recurdepth.data.procedural import get_task
from recurdepth.errors import ConfigError, DataError


def _windows(data_cache, pad, seq=40):
    cfg = load_config(None, [f"model.seq_length={seq}", f"data.cache_dir={data_cache}"])
    cfg.data.sources = [{"procedural": "addition", "n": 400, "difficulty": {"min_digits": 1, "max_digits": 3},
                         **({"pad": True} if pad else {})}]
    cfg.validate()
    ds = build_datasets(cfg, 300, 20)
    return ds.tokenizer, [ds.train[i] for i in range(300)]


def _whole(tok, sample, task):
    """The window's text up to its first eod is `prompt answer` and verifies; the loss falls on that answer and
    its eod only."""
    ids = [int(t) for t in sample["tokens"]]
    if tok.eod not in ids:
        return False
    text = tok.detokenize(ids[:ids.index(tok.eod)])
    prompt, sep, answer = text.rpartition("\nAnswer: ")
    if not sep or not task.verify(prompt + "\nAnswer:", answer):
        return False
    targets = [int(t) for t, m in zip(sample["labels"], sample["loss_mask"]) if m > 0]
    return targets == tok.tokenize(answer) + [tok.eod]


def test_padded_windows_hold_one_whole_sample_each(megatron_single_process, data_cache):
    task = get_task("addition")
    tok, padded = _windows(data_cache, pad=True)
    assert all(_whole(tok, s, task) for s in padded)
    tok, packed = _windows(data_cache, pad=False)  # the control: packing cuts samples (the test can fail)
    assert sum(not _whole(tok, s, task) for s in packed) > 100


def test_pad_refuses_samples_longer_than_the_sequence(megatron_single_process, data_cache):
    with pytest.raises(DataError, match="raise model.seq_length to at least"):
        _windows(data_cache, pad=True, seq=16)
    cfg = load_config(None, [f"data.cache_dir={data_cache}"])
    for bad in ({"builtin": "stdlib-docs", "pad": True}, {"procedural": "addition", "pad": "yes"}):
        cfg.data.sources = [bad]
        with pytest.raises(ConfigError, match="pad"):
            cfg.validate()
