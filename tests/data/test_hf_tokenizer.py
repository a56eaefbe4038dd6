"""`data.tokenizer: hf`: a Hugging Face tokenizer.json (built and trained here, no downloads) behind the tokenizer
interface. The source's ids never change, `<eod>`/`<pad>` alias the source's eos/pad tokens named by its config,
the other specials are appended in SPECIALS order, text spelling a special token stays text, transformers'
own AutoTokenizer gives the same ids, and `recurdepth data preprocess --tokenizer DIR` makes a dataset that
`data check` ties to exactly that tokenizer."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from recurdepth.data.builtin_corpus import stdlib_documents
from recurdepth.data.indexed import check_tokenizer_matches, iter_indexed_documents, read_manifest
from recurdepth.data.tokenizer import (ByteTokenizer, HFTokenizer, SentencePieceTokenizer, build_tokenizer,
                                       require_special_tokens, tokenizer_from_spec)
from recurdepth.errors import DataError
from tests.conftest import assert_one_error

SPECIALS = ByteTokenizer.SPECIALS
SOURCE_SPECIALS = ["<|endoftext|>", "<|padding|>", "<pause>"]  # the trained tokenizer's own: ids 0, 1, 2
TRICKY = ["  two  spaces,\ttabs\tand\nnew\n\nlines  ",
          "caf\u00e9, \u65e5\u672c\u8a9e, full-width \uff21\uff22, emoji \U0001f600",
          "def f(x):\n    return x ** 2  # a comment"]


@pytest.fixture(scope="module")
def docs() -> list:
    return TRICKY + list(stdlib_documents(60_000))


def _train(docs: list, out: Path, vocab_size: int = 600) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2 style: exact round trip) with SOURCE_SPECIALS as its specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SOURCE_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([line for d in docs for line in d.splitlines() if line.strip()], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def _config(folder: Path, **keys) -> Path:
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **keys}))
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory, docs) -> Path:
    """The tokenizer.json alone (no config: nothing to alias)."""
    return _train(docs, tmp_path_factory.mktemp("hf") / "bare")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, source) -> Path:
    """A transformers-style folder: tokenizer.json + tokenizer_config.json naming <|endoftext|> as eos."""
    d = tmp_path_factory.mktemp("hf") / "model"
    d.mkdir()
    shutil.copy(source / "tokenizer.json", d / "tokenizer.json")
    return _config(d, eos_token="<|endoftext|>")


def _raw(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def _copy(src: Path, dst: Path, **config) -> Path:
    dst.mkdir(parents=True)
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    return _config(dst, **config) if config else dst


def _plain(docs: list) -> list:
    return [d for d in docs if not any(s in d for s in SOURCE_SPECIALS + list(SPECIALS))]


# ------------------------------------------------------------------------------------------ ids


def test_source_ids_are_kept_eod_aliased_and_the_rest_appended(hf_dir, docs):
    raw = _raw(hf_dir)
    n = raw.get_vocab_size(with_added_tokens=True)
    tok = HFTokenizer(hf_dir)
    assert tok.special_ids["<eod>"] == tok.eod == raw.token_to_id("<|endoftext|>") == 0  # aliased (config)
    assert tok.special_ids["<pause>"] == raw.token_to_id("<pause>") == 2  # already a token: keeps its id
    appended = [p for p in SPECIALS if p not in ("<eod>", "<pause>")]  # <pad> first: SPECIALS order
    assert [tok.special_ids[p] for p in appended] == list(range(n, n + len(appended)))
    assert tok.pad == tok.special_ids["<pad>"] == n
    assert tuple(tok.special_ids) == SPECIALS and tok.missing_specials == ()
    assert tok.vocab_size == n + len(appended)
    for i in range(n):  # every id of the source names the same token
        assert tok.tokenizer.id_to_token(i) == raw.id_to_token(i)
    for text in _plain(docs)[:40]:
        assert tok.tokenize(text) == raw.encode(text, add_special_tokens=False).ids
    assert tok.model_path == str(hf_dir / "tokenizer.json")


def test_without_a_config_eod_and_pad_are_appended(source, hf_dir):
    n = _raw(source).get_vocab_size(with_added_tokens=True)
    tok = HFTokenizer(source / "tokenizer.json")
    appended = [p for p in SPECIALS if p != "<pause>"]
    assert [tok.special_ids[p] for p in appended] == list(range(n, n + len(appended)))
    assert (tok.pad, tok.eod) == (n, n + 1) and tok.special_ids["<pause>"] == 2
    assert tok.fingerprint() != HFTokenizer(hf_dir).fingerprint()  # the config decides the aliases: in it


@pytest.mark.parametrize("files,eod,pad", [
    ({"tokenizer_config.json": {"eos_token": {"__type": "AddedToken", "content": "<|endoftext|>"},
                                "pad_token": "<|padding|>"}}, 0, 1),
    ({"tokenizer_config.json": {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}}, 0, "n"),
    ({"tokenizer_config.json": {"eos_token": "<|endoftext|>", "pad_token": None}}, 0, "n"),
    ({"special_tokens_map.json": {"eos_token": {"content": "<|endoftext|>", "lstrip": False}}}, 0, "n"),
    ({"tokenizer_config.json": {"eos_token": "<|endoftext|>"},  # both name one: tokenizer_config.json wins
      "special_tokens_map.json": {"eos_token": "<|padding|>"}}, 0, "n"),
    ({"tokenizer_config.json": {"eos_token": "</s>"},  # not a token of this vocabulary: the map's is used
      "special_tokens_map.json": {"eos_token": "<|padding|>"}}, 1, "n"),
    ({"tokenizer_config.json": {"eos_token": "</s>", "pad_token": "[PAD]"}}, "n+1", "n"),
])
def test_aliases_named_by_the_config_files(source, tmp_path, files, eod, pad):
    n = _raw(source).get_vocab_size(with_added_tokens=True)
    d = _copy(source, tmp_path / "t")
    for name, content in files.items():
        (d / name).write_text(json.dumps(content))
    tok = HFTokenizer(d)
    expect = {"n": n, "n+1": n + 1}
    assert (tok.eod, tok.pad) == (expect.get(eod, eod), expect.get(pad, pad))
    assert len(set(tok.special_ids.values())) == len(SPECIALS)


def test_a_plain_added_token_keeps_its_id_and_becomes_special(source, tmp_path):
    raw = _raw(source)
    raw.add_tokens(["<latent>"])  # an ordinary (non-special) added token: the text "<latent>" encodes to it
    d = tmp_path / "t"
    d.mkdir()
    raw.save(str(d / "tokenizer.json"))
    latent = raw.token_to_id("<latent>")
    assert latent in raw.encode("a <latent> b", add_special_tokens=False).ids
    tok = HFTokenizer(d)
    assert tok.special_ids["<latent>"] == latent
    assert latent not in tok.tokenize("a <latent> b")
    assert tok.detokenize([latent, *tok.tokenize("a b")]) == "a b"


def test_special_text_is_ordinary_text(hf_dir):
    tok, raw = HFTokenizer(hf_dir), _raw(hf_dir)
    assert raw.encode("<|endoftext|>", add_special_tokens=False).ids == [0]  # what a plain encode would do
    special = set(tok.special_ids.values()) | {raw.token_to_id(t) for t in SOURCE_SPECIALS}
    text = "a literal <eod> and <|endoftext|> inside, " + " ".join(SPECIALS + tuple(SOURCE_SPECIALS)) + "<eod>"
    for ids in (tok.tokenize(text), tok.tokenize_batch([text])[0], tok.tokenize_batch([text], num_threads=2)[0]):
        assert not set(ids) & special
        assert tok.detokenize(ids) == text
    assert pickle.loads(pickle.dumps(tok)).tokenize(text) == tok.tokenize(text)


def test_detokenize_round_trips_and_skips_specials(hf_dir, docs):
    tok = HFTokenizer(hf_dir)
    texts = _plain(docs)[:60]
    assert tok.tokenize_batch(texts) == [tok.tokenize(t) for t in texts] == tok.tokenize_batch(texts, 2)
    for text in texts:
        assert tok.detokenize(tok.tokenize(text)) == text
    ids = tok.tokenize(TRICKY[0])
    noise = [tok.special_ids["<bot>"], 1, 2, tok.vocab_size, tok.vocab_size + 7, -1]  # ours, the source's, past
    assert tok.detokenize([tok.eod, *ids[:3], *noise, *ids[3:], tok.pad]) == TRICKY[0]
    assert tok.detokenize(np.array([tok.eod, *ids])) == TRICKY[0]


def test_fingerprint_and_pickle(hf_dir, tmp_path):
    tok = HFTokenizer(hf_dir)
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as documented: name NUL size NUL bytes
        data = (hf_dir / name).read_bytes()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    assert tok.fingerprint() == h.hexdigest()[:16]
    assert tok.unique_description == f"hf:{tok.fingerprint()}"
    assert tok.unique_identifiers == {"class": "HFTokenizer", "fingerprint": tok.fingerprint()}
    assert HFTokenizer(hf_dir / "tokenizer.json").fingerprint() == tok.fingerprint()  # the file or its folder

    changed = _copy(hf_dir, tmp_path / "changed", eos_token="<|endoftext|>")
    raw = _raw(changed)
    raw.add_tokens(["zzz"])
    raw.save(str(changed / "tokenizer.json"))
    assert HFTokenizer(changed).fingerprint() != tok.fingerprint()
    same_vocab = _copy(hf_dir, tmp_path / "cfg", eos_token="<|endoftext|>", model_max_length=7)
    assert HFTokenizer(same_vocab).fingerprint() != tok.fingerprint()

    clone = pickle.loads(pickle.dumps(tok))
    assert type(clone) is HFTokenizer and clone.fingerprint() == tok.fingerprint()
    assert clone.special_ids == tok.special_ids and clone.vocab_size == tok.vocab_size
    assert clone.model_path == tok.model_path and clone.tokenize(TRICKY[1]) == tok.tokenize(TRICKY[1])


def test_same_ids_as_transformers_autotokenizer(hf_dir, docs):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    tok = HFTokenizer(hf_dir)
    for text in TRICKY + _plain(docs)[:30]:
        assert tok.tokenize(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert ref.eos_token_id == tok.eod


# ------------------------------------------------------------------------------------------ errors


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def test_bad_paths_name_the_file_and_the_fix(tmp_path, source):
    with pytest.raises(DataError) as err:
        HFTokenizer(tmp_path / "nope")
    assert "nope" in _one_line(err) and "tokenizer.json" in _one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"folder '.*empty' has no tokenizer.json; pass"):
        tokenizer_from_spec(tmp_path / "empty")  # a folder is an hf tokenizer, never a sentencepiece prefix
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(b"x")
    with pytest.raises(DataError, match="data.tokenizer=sentencepiece"):
        HFTokenizer(tmp_path / "spm")
    for name, content in (("junk.json", b"not json"), ("empty.json", b"{}"), ("latin1.json", b"\xff\xfe")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            tokenizer_from_spec(str(tmp_path / name))
        assert f"{name}' is not a Hugging Face tokenizer.json" in _one_line(err)
    d = _copy(source, tmp_path / "badcfg")
    (d / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(DataError) as err:
        HFTokenizer(d)
    assert "tokenizer_config.json next to" in _one_line(err) and "is not JSON" in _one_line(err)
    with pytest.raises(DataError, match="hf tokenizer needs a path"):
        build_tokenizer("hf")
    with pytest.raises(DataError, match="hf tokenizer needs a path"):
        tokenizer_from_spec("hf")


def test_specials_sharing_an_id_are_refused(source, tmp_path):
    d = _copy(source, tmp_path / "t", eos_token="<|endoftext|>", pad_token="<pause>")  # <pad> = <pause>'s id
    with pytest.raises(DataError) as err:
        HFTokenizer(d)
    assert "share ids" in _one_line(err) and "<pad>=2 <pause>=2" in _one_line(err)


def test_a_special_the_model_itself_produces_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"<pad>": 0, "a": 1, "[UNK]": 2}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.save(str(tmp_path / "tokenizer.json"))
    assert raw.encode("a <pad>").ids == [1, 0]  # an ordinary word of the vocabulary
    with pytest.raises(DataError) as err:
        HFTokenizer(tmp_path)
    assert "<pad>" in _one_line(err) and "ordinary pieces" in _one_line(err)


# ------------------------------------------------------------------------------------------ wiring


def test_build_tokenizer_spec_config_and_objectives(hf_dir, tmp_path):
    from recurdepth.config import load_config
    from recurdepth.errors import ConfigError

    fp = HFTokenizer(hf_dir).fingerprint()
    assert build_tokenizer("hf", hf_dir).fingerprint() == fp
    assert tokenizer_from_spec(str(hf_dir)).fingerprint() == fp
    assert tokenizer_from_spec(hf_dir / "tokenizer.json").fingerprint() == fp
    with pytest.raises(DataError, match="sentencepiece model"):  # .model paths and prefixes stay sentencepiece
        tokenizer_from_spec(tmp_path / "spm")
    assert SentencePieceTokenizer.SPECIALS == HFTokenizer.SPECIALS
    tok = HFTokenizer(hf_dir)
    ids = require_special_tokens(tok, ("<bot>", "<eot>", "<latent>"), "objective.kind=coconut")
    assert ids == {t: tok.special_ids[t] for t in ("<bot>", "<eot>", "<latent>")}

    with pytest.raises(ConfigError, match="tokenizer=hf needs a Hugging Face tokenizer.json"):
        load_config(None, ["data.tokenizer=hf"])
    cfg = load_config(None, ["data.tokenizer=hf", f"data.tokenizer_model={hf_dir}"])
    assert build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_model).fingerprint() == fp


def test_missing_checkpoint_tokenizer_names_the_flag(hf_dir, tmp_path):
    from recurdepth.config import load_config
    from recurdepth.infer.loading import load_tokenizer

    cfg = load_config(None, ["data.tokenizer=hf", f"data.tokenizer_model={tmp_path / 'gone'}"])
    with pytest.raises(DataError) as err:
        load_tokenizer(cfg)
    assert "is missing; pass --tokenizer PATH/tokenizer.json" in _one_line(err)
    assert load_tokenizer(cfg, str(hf_dir)).fingerprint() == HFTokenizer(hf_dir).fingerprint()
    ok = load_config(None, ["data.tokenizer=hf", f"data.tokenizer_model={hf_dir / 'tokenizer.json'}"])
    assert load_tokenizer(ok).fingerprint() == HFTokenizer(hf_dir).fingerprint()


def _cli(args: list, capsys) -> subprocess.CompletedProcess:
    """`recurdepth ARGS` through cli.main in this process (as tests/compare/test_cli.py does), leaving the
    session's torch.distributed group alone."""
    import recurdepth.distributed
    from recurdepth.cli import main

    real = recurdepth.distributed.shutdown_distributed
    recurdepth.distributed.shutdown_distributed = lambda: None
    try:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
    finally:
        recurdepth.distributed.shutdown_distributed = real
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, exc.value.code, out.out, out.err)


def test_preprocess_with_an_hf_folder_and_check_the_match(hf_dir, source, docs, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    texts = TRICKY + ["a document that says <eod> and <|endoftext|> in its text"] + _plain(docs)[:50]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = tmp_path / "out" / "d"
    out = _cli(["data", "preprocess", "--input", corpus, "--output-prefix", prefix, "--tokenizer", hf_dir,
                "--workers", 2, "--no-progress"], capsys)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "on 2 workers" in out.stdout

    tok = HFTokenizer(hf_dir)
    m = read_manifest(prefix)
    assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["fingerprint"] == tok.fingerprint()
    assert m["tokenizer"]["path"] == str((hf_dir / "tokenizer.json").resolve())
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size and m["tokenizer"]["special_ids"] == tok.special_ids
    assert m["eod"] == tok.eod == 0 and m["pad"] == tok.pad and m["documents"] == len(texts)
    got = [d.tolist() for d in iter_indexed_documents(prefix)]
    assert got == [tok.tokenize(t) + [tok.eod] for t in texts]
    assert all(tok.eod not in d[:-1] for d in got)  # the literal <eod> / <|endoftext|> did not end a document
    assert [tok.detokenize(d) for d in got] == texts

    check_tokenizer_matches(prefix, tok)
    check_tokenizer_matches(prefix, HFTokenizer(hf_dir / "tokenizer.json"))
    assert _cli(["data", "check", prefix, "--tokenizer", hf_dir / "tokenizer.json"], capsys).returncode == 0
    other = HFTokenizer(source)  # the same tokenizer.json, no config: <eod> is another id
    with pytest.raises(DataError) as err:
        check_tokenizer_matches(prefix, other)
    assert "was tokenized with" in _one_line(err) and tok.fingerprint() in _one_line(err)
    assert other.fingerprint() in _one_line(err)
    assert_one_error(_cli(["data", "check", prefix, "--tokenizer", source], capsys), "was tokenized with",
                     tok.fingerprint())
    assert_one_error(_cli(["data", "check", prefix, "--tokenizer", "byte"], capsys), "was tokenized with")
