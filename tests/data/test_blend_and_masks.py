"""Blending through megatron's BlendedDataset, answer-only loss masks reaching the loss, and the sample
stream after a resume."""

import collections

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.data.pipeline import build_datasets, micro_batches

SOURCES = [{"builtin": "stdlib-docs", "weight": 0.6}, {"procedural": "addition", "n": 3000, "weight": 0.25},
           {"procedural": "sort", "n": 3000, "weight": 0.15}]


@pytest.fixture(scope="module")
def blended(megatron_single_process, data_cache):
    cfg = load_config(None, ["model.seq_length=64", f"data.cache_dir={data_cache}"])
    cfg.data.sources = SOURCES
    cfg.validate()
    return cfg, build_datasets(cfg, 20000, 200)


def test_blend_shares_match_weights(blended):
    _, ds = blended
    counts = collections.Counter(int(ds.train.dataset_index[i]) for i in range(20000))
    for i, src in enumerate(SOURCES):
        assert abs(counts[i] / 20000 - src["weight"]) < 0.01, (i, counts)


def test_blend_is_deterministic_and_cache_keyed_on_contents(blended, data_cache):
    cfg, ds = blended
    again = build_datasets(cfg, 20000, 200)
    for i in (0, 17, 4999, 19999):
        assert torch.equal(ds.train[i]["tokens"], again.train[i]["tokens"])


def test_procedural_prompts_are_masked_out(blended):
    _, ds = blended
    tok = ds.tokenizer
    seen = 0
    for i in range(200):
        if int(ds.train.dataset_index[i]) != 1:
            continue
        s = ds.train[i]
        text = tok.detokenize(s["tokens"])
        targets = tok.detokenize([int(t) for t, m in zip(s["labels"], s["loss_mask"]) if m > 0])
        assert "What is" in text and "What is" not in targets and "Answer" not in targets
        assert targets and all(c.isdigit() or c == " " for c in targets), targets
        assert 0 < float(s["loss_mask"].sum()) < 0.5 * len(s["loss_mask"])
        seen += 1
    assert seen > 20


def test_prompt_tokens_contribute_zero_gradient(blended):
    """Through the trainer's own loss: changing the labels of masked (prompt) positions changes no gradient,
    changing an answer label does."""
    from recurdepth.model.build import build_model
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.objectives import masked_loss_sum

    cfg, ds = blended
    cfg = load_config(None, ["model.seq_length=64", "model.hidden_size=32", "model.num_heads=4"])
    model = build_model(cfg, ds.tokenizer.vocab_size)
    procedural = [i for i in range(300) if int(ds.train.dataset_index[i]) == 1][:4]
    batch = [ds.train[i] for i in procedural]
    tokens = torch.stack([b["tokens"] for b in batch])
    labels = torch.stack([b["labels"] for b in batch])
    mask = torch.stack([b["loss_mask"] for b in batch])

    def grads(lab):
        model.zero_grad()
        loss = masked_loss_sum(model(tokens, labels=lab, window=BackpropWindow.of(2, 2), sample_ids=procedural), mask)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    base = grads(labels)
    scrambled = labels.clone()
    scrambled[mask == 0] = (scrambled[mask == 0] + 7) % 256
    assert torch.equal(grads(scrambled), base)
    answer = labels.clone()
    answer[mask == 1] = (answer[mask == 1] + 7) % 256
    assert not torch.allclose(grads(answer), base)


def test_sample_stream_after_resume_equals_uninterrupted(blended):
    _, ds = blended
    full = [mb.tokens for step in range(6) for mb in micro_batches(ds.train, step * 8, 8, 4, 0, 1)]
    resumed = [mb.tokens for step in range(3, 6) for mb in micro_batches(ds.train, step * 8, 8, 4, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(full[6:], resumed)) and len(resumed) == 6
    # the two data-parallel halves of a global batch are the single-process batch
    one = torch.cat([mb.tokens for mb in micro_batches(ds.train, 16, 8, 4, 0, 1)])
    two = torch.cat([mb.tokens for r in range(2) for mb in micro_batches(ds.train, 16, 8, 4, r, 2)])
    assert torch.equal(one, two)


def test_index_cache_key_follows_file_contents(blended, tmp_path):
    import shutil

    from recurdepth.data.pipeline import content_fingerprint, resolve_sources

    cfg, ds = blended
    prefix = resolve_sources(cfg, ds.tokenizer)[1]
    from recurdepth.data.masked import mask_prefix

    copy = str(tmp_path / "corpus")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, copy + ext)
        shutil.copy(mask_prefix(prefix) + ext, mask_prefix(copy) + ext)
    before = content_fingerprint([copy])
    assert before == content_fingerprint([prefix])  # same contents, other name: same key
    data = bytearray(open(copy + ".bin", "rb").read())
    data[10] ^= 0xFF  # same name, same size, other contents
    open(copy + ".bin", "wb").write(bytes(data))
    assert content_fingerprint([copy]) != before
