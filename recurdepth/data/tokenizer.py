"""Tokenizers behind one small interface (`vocab_size`, `eod`, `pad`, `tokenize`, `detokenize`), which is
also what megatron-core's GPTDataset reads from a tokenizer."""

from __future__ import annotations

import hashlib


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


def build_tokenizer(kind: str) -> ByteTokenizer:
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}")
