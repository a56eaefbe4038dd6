"""Tokenizers behind one small interface (`vocab_size`, `eod`, `pad`, `tokenize`, `detokenize`), which is
also what megatron-core's GPTDataset reads from a tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

from recurdepth.errors import DataError


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the special tokens (pad, eod, ...) from id 256 on. Needs no
    training and round-trips any text exactly; the default for the bundled quickstart corpus."""

    SPECIALS = ("<pad>", "<eod>", "<pause>", "<|start_thought|>", "<|end_thought|>", "<bot>", "<eot>", "<latent>")

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.pad = self.special_ids["<pad>"]
        self.eod = self.special_ids["<eod>"]
        self.unique_identifiers = {"class": type(self).__name__}
        self.unique_description = "byte"

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """A short hash naming the tokenizer, stored next to data tokenized with it."""
        return hashlib.sha256(("byte:" + ",".join(self.SPECIALS)).encode()).hexdigest()[:16]


class SentencePieceTokenizer:
    """A trained sentencepiece model (BPE or unigram) behind the `ByteTokenizer` interface.

    The special tokens (`ByteTokenizer.SPECIALS`) are each one *control* piece of the model: control
    pieces are never produced by encoding text (a document containing the literal string "<eod>" does not
    end early) and decode to nothing. `recurdepth data tokenizer` trains models laid out that way
    (pad=0, unk=1, the other specials 2..8, then the byte-fallback pieces), and
    `recurdepth data tokenizer --add-specials MODEL` converts or appends them in an existing model.
    Loading needs `<pad>` and `<eod>` (`REQUIRED`); the thought-token specials are checked by the objective
    that uses them (`require_special_tokens`), so its error names exactly the ones it lacks.
    """

    SPECIALS = ByteTokenizer.SPECIALS
    REQUIRED = ("<pad>", "<eod>")

    def __init__(self, model_path: Union[str, Path]):
        path = resolve_model_path(model_path)
        self._setup(path.read_bytes(), str(path))

    @classmethod
    def from_bytes(cls, model_proto: bytes, name: str = "<memory>") -> "SentencePieceTokenizer":
        self = cls.__new__(cls)
        self._setup(bytes(model_proto), name)
        return self

    def _setup(self, model_proto: bytes, name: str) -> None:
        import sentencepiece as spm

        self.model_path = name
        self._proto = model_proto
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError with C++ text
            detail = " ".join(str(exc).split())[:200]
            raise DataError(f"{name!r} is not a sentencepiece model ({detail}); train one with "
                            f"`recurdepth data tokenizer --input CORPUS --output-prefix PREFIX`") from None
        self._sp = sp
        n = sp.get_piece_size()
        ids, missing, not_control = {}, [], []
        for tok in self.SPECIALS:
            i = sp.piece_to_id(tok)
            if i < 0 or i >= n or sp.id_to_piece(i) != tok or sp.is_unknown(i):
                missing.append(tok)
            elif not sp.is_control(i):
                not_control.append(tok)
            ids[tok] = i
        fix = (f"add them (existing ids are kept) with `recurdepth data tokenizer --add-specials {name} "
               f"--output-prefix NEW_PREFIX`, or train a model that reserves them with `recurdepth data tokenizer`")
        if any(tok in missing for tok in self.REQUIRED):
            raise DataError(f"sentencepiece model {name!r} lacks the special tokens {' '.join(missing)}; {fix}")
        if not_control:
            raise DataError(f"special tokens {' '.join(not_control)} are ordinary pieces in sentencepiece model "
                            f"{name!r}, so encoding text that contains them would produce them; make them "
                            f"control symbols with `recurdepth data tokenizer --add-specials {name} "
                            f"--output-prefix NEW_PREFIX`")
        self.special_ids = {tok: i for tok, i in ids.items() if tok not in missing}
        self.missing_specials = tuple(missing)
        self.vocab_size = n
        self.pad = ids["<pad>"]
        self.eod = ids["<eod>"]
        self._special_set = frozenset(self.special_ids.values())
        self._fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
        self.unique_identifiers = {"class": type(self).__name__, "fingerprint": self._fingerprint}
        self.unique_description = f"sentencepiece:{self._fingerprint}"

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list, num_threads: int = 1) -> list:
        """`tokenize` over a list of texts in one call (what preprocess workers use)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def detokenize(self, ids) -> str:
        n, special = self.vocab_size, self._special_set
        return self._sp.decode([i for i in map(int, ids) if 0 <= i < n and i not in special])

    def fingerprint(self) -> str:
        """sha256 of the model file's bytes (16 hex digits), stored next to data tokenized with it."""
        return self._fingerprint

    @property
    def processor(self):
        """The underlying `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    def __getstate__(self):  # picklable (dataloader workers, spawn): ship the model bytes, not the processor
        return {"proto": self._proto, "name": self.model_path}

    def __setstate__(self, state):
        self._setup(state["proto"], state["name"])


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer (the `tokenizer.json` that Llama, Qwen, Huginn and other
    transformers checkpoints ship) behind the `ByteTokenizer` interface, so an imported model keeps its ids.

    `path` is a `tokenizer.json` file or the folder holding one; that folder's `tokenizer_config.json`, else
    its `special_tokens_map.json`, names the source's end-of-text and pad tokens (`eos_token`, `pad_token`: a
    string or a dict with "content"). The special tokens (`ByteTokenizer.SPECIALS`) get their ids so:
      1. `<eod>` is the source's eos token and `<pad>` its pad token when one is named and is a token of the
         vocabulary; `<pad>` only when that is not the eos token as well (megatron's GPTDataset drops the loss
         on every pad id and zeroes it, which would erase the document boundaries);
      2. a SPECIALS string that already is a token of the vocabulary keeps its id;
      3. every other one is added as a special token after the vocabulary, from its largest id + 1 on (that is
         `get_vocab_size(with_added_tokens=True)` for the usual gap-free vocabulary), in SPECIALS order.
    Existing ids never change and the result depends on the files alone; `vocab_size` counts the added ones.
    Every special token, ours and the source's, is encoded as ordinary text when a document spells it
    (`encode_special_tokens`): a document holding the literal "<eod>" or "<|endoftext|>" does not end early,
    as with the sentencepiece control pieces. No BOS (nor anything else of the tokenizer's post-processor
    template) is added: documents are joined by `<eod>` alone, as with the other tokenizers.
    """

    SPECIALS = ByteTokenizer.SPECIALS
    FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, path: Union[str, Path]):
        paths = hf_tokenizer_files(path)
        files = {}
        for name, f in paths.items():
            try:
                files[name] = f.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read {str(f)!r} ({exc.strerror or exc}); make it readable or pass "
                                f"another tokenizer.json") from None
        self._setup(files, str(paths["tokenizer.json"]))

    def _setup(self, files: dict, name: str) -> None:
        from tokenizers import AddedToken, Tokenizer

        self.model_path = name
        self._files = dict(files)
        try:
            tok = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception with serde's text
            detail = " ".join(str(exc).split())[:200]
            raise DataError(f"{name!r} is not a Hugging Face tokenizer.json ({detail}); pass the tokenizer.json "
                            f"written by transformers' save_pretrained or tokenizers' Tokenizer.save") from None
        ids = {}
        for piece, key in (("<eod>", "eos_token"), ("<pad>", "pad_token")):
            i = next((tok.token_to_id(t) for t in _named_tokens(files, key, name)
                      if tok.token_to_id(t) is not None), None)
            if i is not None and i != ids.get("<eod>"):
                ids[piece] = i
        next_id = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        for piece in self.SPECIALS:
            if piece not in ids and tok.token_to_id(piece) is None:
                tok.add_special_tokens([AddedToken(piece, special=True, normalized=False)])
                if tok.token_to_id(piece) != next_id:  # tokenizers numbers added tokens after the largest id
                    raise DataError(f"tokenizers gave the added special token {piece} id {tok.token_to_id(piece)} "
                                    f"instead of {next_id} in {name!r}; report this with the tokenizer.json")
                next_id += 1
            ids.setdefault(piece, tok.token_to_id(piece))
        if len(set(ids.values())) < len(ids):
            same = " ".join(f"{p}={i}" for p, i in ids.items() if list(ids.values()).count(i) > 1)
            raise DataError(f"special tokens share ids in {name!r} ({same}) because its eos_token or pad_token is "
                            f"one of them; name distinct tokens in its tokenizer_config.json")
        # ours and the source's specials stay special (a plain token among them is made one, its id kept), so
        # that with encode_special_tokens no text is split into one of them and detokenize skips them all
        special = {i: t.content for i, t in tok.get_added_tokens_decoder().items() if t.special}
        plain = {i: tok.id_to_token(i) for i in ids.values() if i not in special}
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in plain.values()])
        special.update(plain)
        tok.encode_special_tokens = True
        self._tok = tok
        unk = getattr(tok.model, "unk_token", None)
        spelled = [t for i, t in special.items() if t != unk and self.tokenize(t) == [i]]
        if spelled:  # an ordinary piece of the model's vocabulary that encoding its own text produces
            raise DataError(f"special tokens {' '.join(spelled)} of {name!r} are ordinary pieces of its vocabulary, "
                            f"so encoding text that contains them would produce them; use a tokenizer.json whose "
                            f"model does not produce them")
        self.special_ids = {piece: int(ids[piece]) for piece in self.SPECIALS}
        self.missing_specials = ()
        self.vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.pad = self.special_ids["<pad>"]
        self.eod = self.special_ids["<eod>"]
        self._special_set = frozenset(special)
        self._fingerprint = hf_fingerprint(files)
        self.unique_identifiers = {"class": type(self).__name__, "fingerprint": self._fingerprint}
        self.unique_description = f"hf:{self._fingerprint}"

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list, num_threads: int = 1) -> list:
        """`tokenize` over a list of texts (what preprocess workers use). num_threads > 1 uses tokenizers' own
        thread pool (sized by its RAYON_NUM_THREADS, not num_threads); 1 encodes one text at a time, so a
        forked preprocess worker never inherits a pool. The ids are the same either way."""
        if num_threads > 1:
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        return [self._tok.encode(t, add_special_tokens=False).ids for t in texts]

    def detokenize(self, ids) -> str:
        n, special = self.vocab_size, self._special_set
        return self._tok.decode([i for i in map(int, ids) if 0 <= i < n and i not in special],
                                skip_special_tokens=False)

    def fingerprint(self) -> str:
        """`hf_fingerprint` of the files read (16 hex digits), stored next to data tokenized with it."""
        return self._fingerprint

    @property
    def tokenizer(self):
        """The underlying `tokenizers.Tokenizer` (specials added, `encode_special_tokens` set)."""
        return self._tok

    def __getstate__(self):  # picklable (dataloader workers, spawn): ship the files' bytes, not the Tokenizer
        return {"files": self._files, "name": self.model_path}

    def __setstate__(self, state):
        self._setup(state["files"], state["name"])


def hf_fingerprint(files: dict) -> str:
    """sha256 (16 hex digits) over tokenizer.json, tokenizer_config.json and special_tokens_map.json, in that
    order, each one that was read as its name, a NUL byte, its size in bytes (decimal), a NUL byte and its
    bytes. The two config files are in it because they decide which tokens `<eod>` and `<pad>` alias."""
    h = hashlib.sha256()
    for name in HFTokenizer.FILES:
        if name in files:
            h.update(b"%s\0%d\0" % (name.encode(), len(files[name])) + files[name])
    return h.hexdigest()[:16]


def _named_tokens(files: dict, key: str, name: str) -> list:
    """The tokens `key` (eos_token, pad_token) names in tokenizer_config.json, then special_tokens_map.json."""
    import json

    found = []
    for fname in HFTokenizer.FILES[1:]:
        if fname not in files:
            continue
        try:
            config = json.loads(files[fname].decode("utf-8"))
        except ValueError as exc:  # also UnicodeDecodeError
            raise DataError(f"{fname} next to {name!r} is not JSON ({' '.join(str(exc).split())[:120]}); fix or "
                            f"remove it") from None
        value = config.get(key) if isinstance(config, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str) and value:
            found.append(value)
    return found


def hf_tokenizer_files(path: Union[str, Path]) -> dict[str, Path]:
    """The files an `HFTokenizer` at `path` reads (name -> file): the tokenizer.json `path` names, then those of
    its tokenizer_config.json and special_tokens_map.json that are beside it (what an import or export copies)."""
    main = resolve_hf_path(path)
    return {"tokenizer.json": main, **{name: main.parent / name for name in HFTokenizer.FILES[1:]
                                       if (main.parent / name).is_file()}}


def tokenizer_kind(spec: Union[str, Path]) -> str:
    """The tokenizer a command line names: "byte", "hf" (a path ending in .json, or a folder: the folder of a
    transformers tokenizer) or "sentencepiece" (a `.model` path or its prefix)."""
    if str(spec) == "byte":
        return "byte"
    return "hf" if str(spec).endswith(".json") or Path(spec).is_dir() else "sentencepiece"


def resolve_hf_path(path: Union[str, Path]) -> Path:
    """The tokenizer.json `path` names (the file, or a folder holding it); DataError naming the fix if none."""
    p = Path(path)
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return p / "tokenizer.json"
        hint = (" (its tokenizer.model is a sentencepiece model: use data.tokenizer=sentencepiece)"
                if (p / "tokenizer.model").is_file() else "")
        raise DataError(f"folder {str(path)!r} has no tokenizer.json{hint}; pass a tokenizer.json file or the "
                        f"folder of a tokenizer saved with transformers' save_pretrained")
    if p.is_file():
        return p
    raise DataError(f"Hugging Face tokenizer {str(path)!r} not found; pass a tokenizer.json file or the folder "
                    f"holding one (e.g. a downloaded model's folder)")


def require_special_tokens(tokenizer, tokens, purpose: str) -> dict[str, int]:
    """The ids of the special `tokens` that `purpose` (e.g. "objective.kind=coconut") needs; DataError naming
    exactly the missing ones and the command that adds them when the tokenizer lacks any."""
    ids = getattr(tokenizer, "special_ids", {})
    missing = [tok for tok in tokens if tok not in ids]
    if missing:
        name = getattr(tokenizer, "model_path", "MODEL")
        fix = (f"add them (existing ids are kept) with `recurdepth data tokenizer --add-specials {name} "
               f"--output-prefix NEW_PREFIX` and set data.tokenizer_model=NEW_PREFIX.model")
        if isinstance(tokenizer, HFTokenizer):  # cannot happen as built: HFTokenizer adds every missing one
            fix = f"load it with HFTokenizer({name!r}), which adds the missing ones after its vocabulary"
        raise DataError(f"{purpose} needs the special tokens {' '.join(missing)}, which tokenizer {name!r} lacks; "
                        f"{fix}")
    return {tok: ids[tok] for tok in tokens}


def resolve_model_path(model_path: Union[str, Path]) -> Path:
    """`model_path` itself, or `model_path + ".model"` for a prefix; DataError naming the fix if neither exists."""
    path = Path(model_path)
    if path.is_file():
        return path
    with_suffix = Path(str(model_path) + ".model")
    if with_suffix.is_file():
        return with_suffix
    raise DataError(f"sentencepiece model {str(model_path)!r} not found; create one with `recurdepth data tokenizer "
                    f"--input CORPUS --output-prefix PREFIX` (writes PREFIX.model) or pass its path")


def build_tokenizer(kind: str, model_path: Optional[Union[str, Path]] = None):
    """`"byte"` (needs no model), `"sentencepiece"` (needs `model_path`, a `.model` file or its prefix) or
    `"hf"` (needs `model_path`, a Hugging Face `tokenizer.json` or the folder holding it)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if not model_path:
            raise DataError("the sentencepiece tokenizer needs a model path; train one with "
                            "`recurdepth data tokenizer --input CORPUS --output-prefix PREFIX`")
        return SentencePieceTokenizer(model_path)
    if kind == "hf":
        if not model_path:
            raise DataError("the hf tokenizer needs a path; set data.tokenizer_model to a tokenizer.json file or "
                            "the folder holding it")
        return HFTokenizer(model_path)
    raise ValueError(f"unknown tokenizer {kind!r}")


def tokenizer_from_spec(spec: Union[str, Path, ByteTokenizer, SentencePieceTokenizer, HFTokenizer]):
    """A tokenizer from what a command line names: "byte", a Hugging Face `tokenizer.json` (a path ending in
    .json, or a folder: the folder of a transformers tokenizer), a sentencepiece `.model` path (or its
    prefix), or an already built tokenizer (returned as is)."""
    if not isinstance(spec, (str, Path)):
        return spec
    if str(spec) in ("sentencepiece", "hf"):
        return build_tokenizer(str(spec))  # raises: a model path is needed
    return build_tokenizer(tokenizer_kind(spec), spec)
