"""`recurdepth data tokenizer` / `recurdepth data preprocess`: a sentencepiece model with the special tokens
as single ids, indexed datasets that megatron-core reads back into the input text, identical output for
any number of workers, and bad input that fails with one DataError line and leaves nothing behind."""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from recurdepth.data.builtin_corpus import stdlib_documents
from recurdepth.data.preprocess import (check_indexed_dataset, check_tokenizer_matches, iter_documents,
                                        iter_indexed_documents, preprocess, read_manifest)
from recurdepth.data.tokenizer import (ByteTokenizer, SentencePieceTokenizer, build_tokenizer,
                                       tokenizer_from_spec)
from recurdepth.data.tokenizer_train import add_special_tokens, train_tokenizer
from recurdepth.errors import DataError

VOCAB = 400
# Text that tokenizers get wrong: a literal special token, runs of spaces, tabs, newlines, NFKC-changed and
# non-Latin characters, leading/trailing spaces.
TRICKY = ["a literal <eod> and <pad> inside a document must not end it",
          "  two  spaces,\ttabs\tand\nnew\n\nlines  ",
          "ligature \ufb01ne, full-width \uff21\uff22, caf\u00e9, \u65e5\u672c\u8a9e, emoji \U0001f600"]


@pytest.fixture(scope="module")
def docs() -> list:
    return TRICKY + list(stdlib_documents(120_000))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs) -> dict:
    """The same documents as JSONL, as a plain-text file (paragraphs) and as a folder of both."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl = root / "docs.jsonl"
    half = len(docs) // 2
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[:half]):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
            if i == 3:
                f.write("\n")  # blank lines are ignored
                f.write(json.dumps({"id": -1, "text": ""}) + "\n")  # empty documents are skipped, counted
    # paragraphs: no blank line inside a document, documents separated by blank lines
    paras = [" ".join(d.split()) for d in docs[half:]]
    txt = root / "docs.txt"
    txt.write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    folder = root / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "b.jsonl").write_bytes(jsonl.read_bytes())
    (folder / "a.txt").write_bytes(txt.read_bytes())
    (folder / "notes.md").write_text("not a corpus file: ignored\n")
    (folder / ".hidden.txt").write_text("hidden files are ignored\n")
    return {"jsonl": jsonl, "txt": txt, "folder": folder, "jsonl_docs": docs[:half], "txt_docs": paras}


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("tok") / "spm"
    manifest = train_tokenizer([corpus["jsonl"], corpus["txt"]], out, vocab_size=VOCAB, model_type="bpe",
                               input_sentence_size=100_000, seed=0)
    assert manifest["vocab_size"] == VOCAB
    return Path(str(out) + ".model")


def _normalised(sp_tok: SentencePieceTokenizer, text: str) -> str:
    return sp_tok.processor.decode(sp_tok.processor.encode(text))


def _documents(prefix) -> list:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    out = []
    for d in range(len(ds.document_indices) - 1):
        lo, hi = int(ds.document_indices[d]), int(ds.document_indices[d + 1])
        out.append(np.concatenate([ds[i] for i in range(lo, hi)]))
    return out


def _listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------------------------------ tokenizer


def test_special_tokens_are_single_control_ids(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    sp = tok.processor
    assert tuple(tok.special_ids) == ByteTokenizer.SPECIALS
    ids = list(tok.special_ids.values())
    assert len(set(ids)) == len(ids) and all(0 <= i < tok.vocab_size for i in ids)
    for piece, i in tok.special_ids.items():
        assert sp.id_to_piece(i) == piece and sp.is_control(i)
        assert tok.tokenize(piece) != [i]  # text spelling a special token is ordinary text
    assert tok.pad == tok.special_ids["<pad>"] and tok.eod == tok.special_ids["<eod>"]
    assert tok.vocab_size == VOCAB == sp.get_piece_size()
    text = " ".join(ByteTokenizer.SPECIALS) + " " + TRICKY[1]
    encoded = tok.tokenize(text)
    assert not set(encoded) & set(ids)
    assert tok.detokenize(encoded) == text  # whitespace and the literal specials survive exactly
    # specials (and ids past the vocabulary, e.g. a padded model vocab) decode to nothing, like ByteTokenizer
    assert tok.detokenize([tok.special_ids["<bot>"], *encoded, tok.eod, tok.vocab_size + 5]) == text
    assert tok.fingerprint() == hashlib.sha256(spm_model.read_bytes()).hexdigest()[:16]
    assert tok.unique_identifiers["fingerprint"] == tok.fingerprint() and tok.fingerprint() in tok.unique_description
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint() == tok.fingerprint() and clone.tokenize(text) == encoded

    manifest = json.loads(spm_model.with_suffix(".json").read_text())
    assert manifest["vocab_size"] == VOCAB and manifest["special_ids"] == tok.special_ids
    assert manifest["fingerprint"] == tok.fingerprint() and manifest["model_type"] == "bpe"
    vocab_lines = spm_model.with_suffix(".vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == VOCAB and vocab_lines[tok.eod].startswith("<eod>\t")
    assert sorted(p.name for p in spm_model.parent.iterdir()) == ["spm.json", "spm.model", "spm.vocab"]


def test_build_tokenizer_kinds_and_missing_model(spm_model, tmp_path):
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    assert build_tokenizer("sentencepiece", spm_model).fingerprint() == SentencePieceTokenizer(spm_model).fingerprint()
    assert tokenizer_from_spec(str(spm_model)[: -len(".model")]).vocab_size == VOCAB  # a prefix works too
    assert tokenizer_from_spec("byte").vocab_size == ByteTokenizer().vocab_size
    with pytest.raises(DataError, match="recurdepth data tokenizer"):
        build_tokenizer("sentencepiece", tmp_path / "nope.model")
    with pytest.raises(DataError, match="recurdepth data tokenizer"):
        build_tokenizer("sentencepiece")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


def test_model_without_specials_is_refused_then_fixed_by_add_specials(corpus, tmp_path, docs):
    import sentencepiece as spm

    plain = tmp_path / "plain.model"
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines),
                                   model_prefix=str(plain)[: -len(".model")], vocab_size=300, model_type="bpe",
                                   user_defined_symbols=["<pause>"], minloglevel=2)
    with pytest.raises(DataError) as err:
        SentencePieceTokenizer(plain)
    msg = str(err.value)
    assert "\n" not in msg and "<eod>" in msg and "<latent>" in msg and "<|start_thought|>" in msg
    assert "--add-specials" in msg
    before = spm.SentencePieceProcessor(model_file=str(plain))
    manifest = add_special_tokens(plain, tmp_path / "fixed")
    fixed = SentencePieceTokenizer(tmp_path / "fixed.model")
    assert "<pause>" in manifest["converted_specials"] and "<eod>" in manifest["added_specials"]
    assert fixed.vocab_size == before.get_piece_size() + len(manifest["added_specials"])
    for i in range(before.get_piece_size()):  # existing ids keep their pieces
        assert fixed.processor.id_to_piece(i) == before.id_to_piece(i)
    sample = "plain text <pause> here"
    assert fixed.special_ids["<pause>"] not in fixed.tokenize(sample)  # user-defined became control
    assert fixed.detokenize(fixed.tokenize(docs[0])) == _normalised(fixed, docs[0])


def test_training_sample_is_seeded_and_bounded(corpus, tmp_path):
    kw = dict(vocab_size=VOCAB, input_sentence_size=300, num_threads=1)
    a = train_tokenizer(corpus["jsonl"], tmp_path / "a", seed=1, **kw)
    b = train_tokenizer(corpus["jsonl"], tmp_path / "b", seed=1, **kw)
    c = train_tokenizer(corpus["jsonl"], tmp_path / "c", seed=2, **kw)
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]
    assert a["sentences"] > 300  # every line was streamed, only a sample of 300 was kept
    u = train_tokenizer(corpus["txt"], tmp_path / "u", vocab_size=VOCAB, model_type="unigram", byte_fallback=False)
    tok = SentencePieceTokenizer(tmp_path / "u.model")
    assert u["model_type"] == "unigram" and tok.vocab_size == VOCAB
    assert tok.detokenize(tok.tokenize("line one\nline two")) == "line one\nline two"  # "\n" is a piece


def test_tokenizer_training_bad_input(tmp_path, corpus):
    with pytest.raises(DataError, match="not found"):
        train_tokenizer(tmp_path / "missing.jsonl", tmp_path / "t")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(tmp_path / "empty.txt", tmp_path / "t")
    with pytest.raises(DataError, match="vocab-size"):
        train_tokenizer(corpus["jsonl"], tmp_path / "t", vocab_size=100)
    with pytest.raises(DataError, match="--vocab-size"):
        train_tokenizer(corpus["jsonl"], tmp_path / "t", vocab_size=300)  # fewer ids than required characters
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        train_tokenizer(bad, tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.txt"]


# ------------------------------------------------------------------------------------------ preprocess


def test_preprocess_reads_back_through_megatron(spm_model, corpus, tmp_path):
    tok = SentencePieceTokenizer(spm_model)
    inputs = [corpus["jsonl"], corpus["txt"], corpus["folder"]]
    expected = corpus["jsonl_docs"] + corpus["txt_docs"] + corpus["txt_docs"] + corpus["jsonl_docs"]
    prefix = tmp_path / "out" / "data"
    m = preprocess(inputs, prefix, spm_model, workers=2, progress=False, chunk_chars=8192)
    docs = _documents(prefix)
    assert len(docs) == len(expected) == m["documents"]
    assert [d.tolist() for d in iter_indexed_documents(prefix)] == [d.tolist() for d in docs]
    for got, text in zip(docs, expected):
        assert got.dtype == np.uint16 and got[-1] == tok.eod and tok.eod not in got[:-1].tolist()
        assert tok.detokenize(got[:-1].tolist()) == _normalised(tok, text)
    assert [tok.detokenize(d[:-1].tolist()) for d in docs[:3]] == [unicodedata.normalize("NFKC", t) for t in TRICKY]
    assert tok.detokenize(docs[1][:-1].tolist()) == TRICKY[1]  # whitespace exactly as written

    assert m["tokens"] == sum(len(d) for d in docs) and m["text_tokens"] == m["tokens"] - m["documents"]
    assert m["eod"] == tok.eod and m["dtype"] == "uint16" and m["empty_documents"] == 2
    assert m["tokenizer"]["fingerprint"] == tok.fingerprint() and m["tokenizer"]["vocab_size"] == VOCAB
    files = [corpus["jsonl"], corpus["txt"], corpus["folder"] / "a.txt", corpus["folder"] / "sub" / "b.jsonl"]
    assert [Path(i["path"]) for i in m["inputs"]] == [f.resolve() for f in files]
    for entry, f in zip(m["inputs"], files):
        assert entry["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and entry["bytes"] == f.stat().st_size
    on_disk = read_manifest(prefix)
    assert on_disk == {k: v for k, v in m.items() if k not in ("seconds", "tokens_per_s", "workers")}
    assert m["tokens_per_s"] > 0 and m["workers"] == 2
    assert _listing(prefix.parent) == ["data.bin", "data.idx", "data.json"]
    check_indexed_dataset(prefix)
    check_tokenizer_matches(prefix, tok, model_vocab_size=512)


def test_two_workers_write_the_same_bytes_as_one(spm_model, corpus, tmp_path):
    inputs = [corpus["folder"]]
    one = preprocess(inputs, tmp_path / "w1" / "d", spm_model, workers=1, progress=False, chunk_chars=4096)
    two = preprocess(inputs, tmp_path / "w2" / "d", spm_model, workers=2, progress=True, chunk_chars=4096)
    for ext in (".bin", ".idx", ".json"):
        assert (tmp_path / "w1" / f"d{ext}").read_bytes() == (tmp_path / "w2" / f"d{ext}").read_bytes(), ext
    assert one["documents"] == two["documents"] > 20


def test_byte_tokenizer_round_trips_exactly(corpus, tmp_path):
    m = preprocess(corpus["jsonl"], tmp_path / "b", "byte", workers=1, progress=False)
    tok = ByteTokenizer()
    docs = _documents(tmp_path / "b")
    assert [tok.detokenize(d[:-1].tolist()) for d in docs] == corpus["jsonl_docs"]
    assert all(d[-1] == tok.eod for d in docs) and m["tokenizer"]["fingerprint"] == tok.fingerprint()


def test_text_document_modes(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes(b"\xef\xbb\xbffirst line\nsecond line\r\n\n\nthird\n")
    para = [(no, t) for _, no, t in iter_documents(f)]
    assert para == [(1, "first line\nsecond line"), (5, "third")]
    assert [t for _, _, t in iter_documents(f, text_docs="line")] == ["first line", "second line", "third"]
    assert [t for _, _, t in iter_documents(f, text_docs="file")] == ["first line\nsecond line\r\n\n\nthird\n"]


@pytest.mark.parametrize("workers", [1, 2])
def test_malformed_jsonl_line(spm_model, tmp_path, workers):
    src = tmp_path / "in" / "corpus.jsonl"
    src.parent.mkdir()
    good = [json.dumps({"text": f"document number {i} " * 20}) for i in range(60)]
    src.write_text("\n".join(good[:40] + ['{"text": "unterminated'] + good[40:]) + "\n")
    out = tmp_path / "out" / "sub" / "d"
    with pytest.raises(DataError) as err:
        preprocess(src, out, spm_model, workers=workers, progress=False, chunk_chars=512)
    msg = str(err.value)
    assert "\n" not in msg and "corpus.jsonl:41" in msg and "--skip-bad-lines" in msg
    assert not (tmp_path / "out").exists()  # not even the folders it created

    m = preprocess(src, out, spm_model, workers=workers, skip_bad_lines=True, progress=False, chunk_chars=512)
    assert m["skipped_lines"] == 1 and m["documents"] == 60 and "corpus.jsonl:41" in m["skipped_examples"][0]
    assert len(_documents(out)) == 60


@pytest.mark.parametrize("content,needle", [
    ("", "empty corpus"),
    ("\n   \n\n", "empty corpus"),
    ('{"text": ""}\n{"text": ""}\n', "empty corpus"),
    ('{"body": "x"}\n', "no 'text' text field"),
    ('{"text": 3}\n', "not a string"),
    ('["text"]\n', "not an object"),
    (b'{"text": "\xff"}\n', "not valid UTF-8"),
])
def test_bad_corpus_leaves_nothing_behind(spm_model, tmp_path, content, needle):
    src = tmp_path / "in.jsonl"
    src.write_bytes(content if isinstance(content, bytes) else content.encode())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(DataError) as err:
        preprocess(src, out_dir / "d", spm_model, workers=1, progress=False)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert _listing(out_dir) == []


def test_missing_field_names_the_fix_and_text_key_selects_it(spm_model, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text('{"body": "hello there"}\n{"body": "general kenobi"}\n')
    with pytest.raises(DataError, match=r"in.jsonl:1 has no 'text' text field \(fields: 'body'\).*--text-key"):
        preprocess(src, tmp_path / "d", spm_model, workers=1, progress=False)
    with pytest.raises(DataError, match="all 2 non-blank lines .* were skipped"):
        preprocess(src, tmp_path / "d", spm_model, workers=1, progress=False, skip_bad_lines=True)
    assert _listing(tmp_path) == ["in.jsonl"]
    m = preprocess(src, tmp_path / "d", spm_model, text_key="body", workers=1, progress=False)
    assert m["documents"] == 2


def test_missing_inputs(spm_model, tmp_path):
    with pytest.raises(DataError, match="not found"):
        preprocess(tmp_path / "nope.jsonl", tmp_path / "d", spm_model, progress=False)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(DataError, match="has no .jsonl"):
        preprocess(tmp_path / "empty_folder", tmp_path / "d", spm_model, progress=False)
    with pytest.raises(DataError, match="recurdepth data tokenizer"):
        preprocess(tmp_path / "empty_folder", tmp_path / "d", tmp_path / "missing.model", progress=False)
    assert _listing(tmp_path) == ["empty_folder"]


# ------------------------------------------------------------------------------------------ reader checks


@pytest.fixture
def dataset(spm_model, corpus, tmp_path) -> Path:
    prefix = tmp_path / "ds"
    preprocess(corpus["txt"], prefix, spm_model, workers=1, progress=False)
    check_indexed_dataset(prefix)
    return prefix


@pytest.mark.parametrize("damage,needle", [
    (lambda p: _truncate(p.with_suffix(".idx"), 20), "truncated"),
    (lambda p: _truncate(p.with_suffix(".idx"), -8), "truncated or corrupt"),
    (lambda p: _truncate(p.with_suffix(".bin"), -2), ".bin/.idx pair is truncated or mismatched"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes() + b"\0\0"), "mismatched"),
    (lambda p: p.with_suffix(".idx").write_bytes(b"NOTANIDX" * 8), "not a megatron-core index"),
    (lambda p: p.with_suffix(".bin").unlink(), "not found"),
])
def test_check_indexed_dataset_catches_damage(dataset, damage, needle):
    damage(dataset)
    with pytest.raises(DataError) as err:
        check_indexed_dataset(dataset)
    assert needle in str(err.value) and "recurdepth data preprocess" in str(err.value)


def test_check_indexed_dataset_catches_a_swapped_bin(dataset, spm_model, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("a much shorter corpus\n\nof two documents\n")
    preprocess(other / "x.txt", other / "x", spm_model, workers=1, progress=False)
    dataset.with_suffix(".bin").write_bytes((other / "x.bin").read_bytes())
    with pytest.raises(DataError, match="mismatched"):
        check_indexed_dataset(dataset)


def _truncate(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:n])


def test_check_tokenizer_matches(dataset, spm_model, tmp_path):
    tok = SentencePieceTokenizer(spm_model)
    check_tokenizer_matches(dataset, tok)
    check_tokenizer_matches(read_manifest(dataset), tok)
    with pytest.raises(DataError) as err:
        check_tokenizer_matches(dataset, ByteTokenizer())
    assert "recurdepth data preprocess" in str(err.value) and tok.fingerprint() in str(err.value)
    with pytest.raises(DataError, match="model.vocab_size"):
        check_tokenizer_matches(dataset, tok, model_vocab_size=VOCAB - 1)
    dataset.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="no manifest"):
        check_tokenizer_matches(dataset, tok)
    check_tokenizer_matches(dataset, tok, require_manifest=False)


# ------------------------------------------------------------------------------------------ command line


def test_cli_subcommands(corpus, tmp_path, capsys):
    from recurdepth.data.cli import add_data_parser

    parser = argparse.ArgumentParser(prog="recurdepth")
    add_data_parser(parser.add_subparsers(dest="verb", required=True))

    def run(*argv) -> int:
        args = parser.parse_args(list(map(str, argv)))
        return args.func(args)

    tok = tmp_path / "tok"
    assert run("data", "tokenizer", "--input", corpus["jsonl"], "--input", corpus["txt"], "--output-prefix", tok,
               "--vocab-size", VOCAB, "--model-type", "bpe") == 0
    assert "special ids: <pad>=0 <eod>=2" in capsys.readouterr().out
    assert run("data", "preprocess", "--input", corpus["jsonl"], "--output-prefix", tmp_path / "d",
               "--tokenizer", f"{tok}.model", "--workers", 2, "--no-progress") == 0
    assert "tokens/s on 2 workers" in capsys.readouterr().out
    assert run("data", "check", tmp_path / "d", "--tokenizer", f"{tok}.model") == 0
    with pytest.raises(DataError, match="was tokenized with"):
        run("data", "check", tmp_path / "d", "--tokenizer", "byte")
    with pytest.raises(DataError, match="not found"):
        run("data", "preprocess", "--input", tmp_path / "missing", "--output-prefix", tmp_path / "e")
    with pytest.raises(DataError, match="no corpus given"):
        run("data", "tokenizer", "--output-prefix", tmp_path / "t")
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "tokenizer", "--input", "x", "--output-prefix", "y", "--model-type", "wordpiece"])
