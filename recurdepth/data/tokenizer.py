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


def require_special_tokens(tokenizer, tokens, purpose: str) -> dict[str, int]:
    """The ids of the special `tokens` that `purpose` (e.g. "objective.kind=coconut") needs; DataError naming
    exactly the missing ones and the command that adds them when the tokenizer lacks any."""
    ids = getattr(tokenizer, "special_ids", {})
    missing = [tok for tok in tokens if tok not in ids]
    if missing:
        name = getattr(tokenizer, "model_path", "MODEL")
        raise DataError(f"{purpose} needs the special tokens {' '.join(missing)}, which tokenizer {name!r} lacks; "
                        f"add them (existing ids are kept) with `recurdepth data tokenizer --add-specials {name} "
                        f"--output-prefix NEW_PREFIX` and set data.tokenizer_model=NEW_PREFIX.model")
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
    """`"byte"` (needs no model) or `"sentencepiece"` (needs `model_path`, a `.model` file or its prefix)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        if not model_path:
            raise DataError("the sentencepiece tokenizer needs a model path; train one with "
                            "`recurdepth data tokenizer --input CORPUS --output-prefix PREFIX`")
        return SentencePieceTokenizer(model_path)
    raise ValueError(f"unknown tokenizer {kind!r}")


def tokenizer_from_spec(spec: Union[str, Path, ByteTokenizer, SentencePieceTokenizer]):
    """A tokenizer from what a command line names: "byte", a sentencepiece `.model` path (or its prefix),
    or an already built tokenizer (returned as is)."""
    if not isinstance(spec, (str, Path)):
        return spec
    if str(spec) == "byte":
        return ByteTokenizer()
    if str(spec) == "sentencepiece":
        return build_tokenizer("sentencepiece")  # raises: a model path is needed
    return SentencePieceTokenizer(spec)
