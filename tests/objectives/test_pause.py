"""Pause tokens: where they go in the data, that a pause label never reaches the loss, determinism, the
finetuning layout (M pauses between prompt and answer), the supervised filler variant, and the one-line error
for a tokenizer without the special tokens an objective needs."""

from __future__ import annotations

import pytest
import torch

from recurdepth.config import load_config
from recurdepth.data.pauses import PauseInserted, insert_pauses
from recurdepth.data.pipeline import build_datasets, micro_batches
from recurdepth.data.procedural import Sample, encode_with_mask
from recurdepth.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, require_special_tokens
from recurdepth.errors import DataError
from recurdepth.objectives import build_objective

PAUSE = ByteTokenizer().special_ids["<pause>"]
SEQ = 64


def pause_config(data_cache, *extra):
    return load_config(None, [f"model.seq_length={SEQ}", "objective.kind=pause", "objective.pause_fraction=0.25",
                              "objective.pause_count=3", "data.builtin_max_mb=0.5", f"data.cache_dir={data_cache}",
                              "data.sources=[{builtin: stdlib-docs}, {procedural: addition, n: 300, weight: 0.5}]",
                              *extra])


@pytest.fixture(scope="module")
def pause_data(data_cache, megatron_single_process):
    cfg = pause_config(data_cache)
    return cfg, build_datasets(cfg, 64, 16)


def test_pause_labels_never_reach_the_loss(pause_data):
    cfg, data = pause_data
    objective = build_objective(cfg, data.tokenizer)
    n = round(0.25 * SEQ)
    batches = micro_batches(data.train, 0, 32, 8, 0, 1)
    saw_pause_labels = 0
    for mb in batches:
        assert mb.tokens.shape == (8, SEQ)
        full = torch.cat([mb.tokens, mb.labels[:, -1:]], dim=1)
        assert ((full == PAUSE).sum(1) >= n).all()  # n inserted (procedural samples carry 3 more each)
        # the gradient of the objective's loss wrt each per-token loss is 0 wherever the label is a pause
        per_token = torch.rand(mb.tokens.shape, dtype=torch.float64, requires_grad=True)
        objective.pipeline_loss(per_token, mb).backward()
        is_pause = mb.labels == PAUSE
        saw_pause_labels += int(is_pause.sum())
        assert (per_token.grad[is_pause] == 0).all()
        assert (mb.loss_mask[is_pause] == 0).all()  # the data says so already
        assert objective.loss_tokens(mb) == per_token.grad.sum() == mb.loss_mask.sum()
        assert per_token.grad[~is_pause].sum() > 0
    assert saw_pause_labels > 8 * n


def test_objective_masks_pauses_even_when_the_data_does_not(pause_data):
    cfg, data = pause_data
    objective = build_objective(cfg, data.tokenizer)
    mb = micro_batches(data.train, 0, 8, 8, 0, 1)[0]
    mb.loss_mask = torch.ones_like(mb.loss_mask)  # a corpus that was written with pauses in it, unmasked
    assert objective.loss_tokens(mb) == (mb.labels != PAUSE).sum()


def test_insertion_keeps_the_text_and_is_deterministic(pause_data):
    cfg, data = pause_data
    assert isinstance(data.train, PauseInserted)
    inner = data.train.dataset
    for i in (0, 5, 17):
        raw, sample = inner[i], data.train[i]
        text = torch.cat([raw["tokens"], raw["labels"][-1:]])
        full = torch.cat([sample["tokens"], sample["labels"][-1:]])
        raw_pauses = int((text == PAUSE).sum())  # procedural samples hold pauses before their answers
        torch.testing.assert_close(full[full != PAUSE], text[text != PAUSE])
        assert int((full == PAUSE).sum()) == raw_pauses + round(0.25 * SEQ)
        assert torch.equal(data.train[i]["tokens"], sample["tokens"])  # the same draw every time
    assert not torch.equal(data.train.positions(0, SEQ - 15), data.train.positions(1, SEQ - 15))
    # data-parallel halves are the one-process batch
    whole = micro_batches(data.train, 8, 8, 4, 0, 1)
    halves = [micro_batches(data.train, 8, 8, 4, r, 2)[0] for r in range(2)]
    assert torch.equal(torch.cat([whole[0].tokens, whole[1].tokens]), torch.cat([h.tokens for h in halves]))


def test_insert_pauses_masks():
    tokens, labels = torch.tensor([10, 11, 12]), torch.tensor([11, 12, 13])
    mask = torch.tensor([1.0, 0.0, 1.0])  # label 12 (an unsupervised prompt token) carries no loss
    out = insert_pauses(tokens, labels, mask, torch.tensor([0, 3]), PAUSE, supervised=False)
    assert out["tokens"].tolist() == [PAUSE, 10, 11, PAUSE, 12]
    assert out["labels"].tolist() == [10, 11, PAUSE, 12, 13]
    assert out["loss_mask"].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]  # 10 was no target, pause none, 12 masked
    filler = insert_pauses(tokens, labels, mask, torch.tensor([0, 3]), 46, supervised=True)
    assert filler["loss_mask"].tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_finetuning_pauses_sit_between_prompt_and_answer():
    tok = ByteTokenizer()
    sample = Sample("addition", "What is 1 + 2?\nAnswer:", "3")
    ids, mask = encode_with_mask(sample, tok, filler=(PAUSE,) * 4)
    head = len(tok.tokenize(sample.prompt + " "))
    assert ids[head:head + 4] == [PAUSE] * 4 and ids[head + 4:] == [ord("3"), tok.eod]
    assert mask == [0] * (head + 4) + [1, 1]
    _, supervised = encode_with_mask(sample, tok, filler=(46,) * 4, filler_target=True)
    assert supervised == [0] * head + [1] * 6


def test_filler_variant_supervises_dots(data_cache, megatron_single_process):
    cfg = pause_config(data_cache, "objective.pause_variant=filler")
    data = build_datasets(cfg, 16, 8)
    objective = build_objective(cfg, data.tokenizer)
    mb = micro_batches(data.train, 0, 8, 8, 0, 1)[0]
    for row, i in enumerate(mb.sample_ids):  # every inserted filler is a "." and a target
        inserted = data.train.positions(i, SEQ - round(0.25 * SEQ) + 1)
        inserted = inserted[inserted > 0] - 1  # as label positions
        assert (mb.labels[row, inserted] == ord(".")).all() and (mb.loss_mask[row, inserted] == 1).all()
    assert objective.loss_tokens(mb) == mb.loss_mask.sum()


# ------------------------------------------------------------------------------------- special tokens


@pytest.fixture(scope="module")
def spm_without_thought_tokens(tmp_path_factory):
    """A sentencepiece model with <pad> and <eod> only (control pieces), none of the thought-token specials."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    text = [f"line {i} of some text with words, numbers {i * 7} and more words" for i in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(folder / "m"), vocab_size=320,
                                   model_type="bpe", pad_id=0, pad_piece="<pad>", unk_id=1, bos_id=-1, eos_id=-1,
                                   control_symbols=["<eod>"], byte_fallback=True, minloglevel=2)
    return str(folder / "m.model")


def test_tokenizer_loads_without_thought_tokens_and_each_objective_names_what_it_lacks(spm_without_thought_tokens):
    tok = SentencePieceTokenizer(spm_without_thought_tokens)
    assert "<eod>" in tok.special_ids and "<pause>" not in tok.special_ids
    with pytest.raises(DataError) as err:
        require_special_tokens(tok, ("<bot>", "<eot>", "<latent>"), "objective.kind=coconut")
    msg = str(err.value)
    assert "\n" not in msg and "objective.kind=coconut needs the special tokens <bot> <eot> <latent>" in msg
    assert f"recurdepth data tokenizer --add-specials {spm_without_thought_tokens}" in msg


@pytest.mark.parametrize("kind,missing", [("pause", "<pause>"), ("coconut", "<bot> <eot> <latent>")])
def test_training_data_with_a_tokenizer_lacking_the_objectives_tokens(spm_without_thought_tokens, data_cache,
                                                                      kind, missing):
    cfg = load_config(None, [f"objective.kind={kind}", "data.tokenizer=sentencepiece",
                             f"data.tokenizer_model={spm_without_thought_tokens}", f"data.cache_dir={data_cache}",
                             "data.sources=[{procedural: addition, n: 50}]"])
    with pytest.raises(DataError, match=f"objective.kind={kind} needs the special tokens {missing}, which tokenizer"
                                        ".*--add-specials"):
        build_datasets(cfg, 8, 8)
