"""Train a sentencepiece tokenizer (BPE or unigram) on a corpus, reserving the special tokens the
training objectives use, or add those tokens to an existing model.

Documents are streamed with the same reader as `recurdepth data preprocess` and split into lines (the
sentences sentencepiece learns from); a seeded, shuffled reservoir sample of at most `input_sentence_size`
of them is what sentencepiece trains on, so memory is bounded however large the corpus. Layout of the model:
`<pad>`=0, `<unk>`=1, the other specials as control symbols 2..8 (never produced by encoding text), then
the 256 byte-fallback pieces and the learned pieces. Whitespace is kept as written (NFKC normalisation,
no collapsing of spaces; newlines and tabs are encoded through byte fallback), so detokenizing gives the
text back. Writes `<prefix>.model`, `<prefix>.vocab` and a `<prefix>.json` manifest, atomically.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Optional, Sequence, Union

from recurdepth.atomic import write_atomically
from recurdepth.data.readers import ReadStats, empty_corpus_error, iter_documents, resolve_inputs
from recurdepth.atomic import commit_staged
from recurdepth.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, resolve_model_path
from recurdepth.errors import DataError

PathLike = Union[str, Path]
MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = ("nfkc", "identity", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")


def train_tokenizer(inputs: Union[PathLike, Sequence[PathLike]], out_prefix: PathLike, vocab_size: int = 8000,
                    model_type: str = "bpe", byte_fallback: bool = True, input_sentence_size: int = 1_000_000,
                    seed: int = 0, text_key: str = "text", skip_bad_lines: bool = False,
                    text_docs: str = "paragraph", normalization: str = "nfkc", character_coverage: float = 0.9995,
                    num_threads: Optional[int] = None, max_sentence_length: int = 16384,
                    verbose: bool = False) -> dict:
    """Train `<out_prefix>.model` on `inputs` (JSONL/text files or folders); returns the manifest also
    written to `<out_prefix>.json` (vocab size, special ids, model type, fingerprint, inputs)."""
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise DataError(f"unknown sentencepiece model type {model_type!r}; use --model-type bpe or unigram")
    if normalization not in NORMALIZATIONS:
        raise DataError(f"unknown normalization {normalization!r}; use one of {', '.join(NORMALIZATIONS)}")
    specials = ByteTokenizer.SPECIALS
    reserved = 1 + len(specials) + (256 if byte_fallback else 1)  # unk + specials + bytes (or "\n")
    if int(vocab_size) <= reserved:
        raise DataError(f"--vocab-size {vocab_size} is too small: the unknown piece, {len(specials)} special tokens"
                        f"{' and 256 byte-fallback pieces' if byte_fallback else ''} already take {reserved} ids; "
                        f"use at least {reserved + 100}")
    if int(input_sentence_size) < 0:
        raise DataError(f"--input-sentence-size must be >= 0 (0 = every sentence), not {input_sentence_size}")
    files = resolve_inputs(inputs)
    stats = ReadStats()
    docs = iter_documents(files, text_key, skip_bad_lines, text_docs, stats)
    first = next(docs, None)  # reader errors for the first lines and an empty corpus surface here
    if first is None:
        raise empty_corpus_error([str(f) for f in files], stats, text_key)

    failure: list = []
    counts = {"sentences": 0, "sampled": 0}

    def lines():
        for doc in _chain_first(first, docs):
            for line in doc[2].split("\n"):
                if line.strip():
                    counts["sentences"] += 1
                    yield line

    def sentences():
        try:
            if input_sentence_size:
                sample = reservoir_sample(lines(), int(input_sentence_size), int(seed))
            else:
                sample = lines()
            for line in sample:
                counts["sampled"] += 1
                yield line
        except BaseException as exc:  # noqa: BLE001 - re-raised after sentencepiece returns
            failure.append(exc)

    kwargs = dict(
        model_type=model_type, vocab_size=int(vocab_size), byte_fallback=bool(byte_fallback),
        character_coverage=float(character_coverage),
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="<pad>", unk_piece="<unk>",
        control_symbols=[t for t in specials if t != "<pad>"],
        normalization_rule_name=normalization, remove_extra_whitespaces=False,
        # the bounded, shuffled sample is drawn above (seeded: sentencepiece's own sampler ignores
        # set_random_generator_seed in 0.2.x), so sentencepiece takes every sentence it is given, in order
        allow_whitespace_only_pieces=True, input_sentence_size=0,
        shuffle_input_sentence=False, max_sentence_length=int(max_sentence_length),
        num_threads=int(num_threads or min(os.cpu_count() or 1, 16)), minloglevel=0 if verbose else 2,
    )
    if not byte_fallback:
        kwargs["user_defined_symbols"] = ["\n"]  # newlines cannot be learned from lines; keep them one piece
    spm.set_random_generator_seed(int(seed))  # for what else in sentencepiece is random
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=writer, **kwargs)
    except RuntimeError as exc:
        if failure:
            raise failure[0] from None
        raise _training_error(exc, model_type, vocab_size) from None
    if failure:
        raise failure[0]
    proto = writer.getvalue()
    if counts["sentences"] == 0 or not proto:
        raise empty_corpus_error([str(f) for f in files], stats, text_key)
    tokenizer = SentencePieceTokenizer.from_bytes(proto, str(out_prefix) + ".model")
    manifest = {
        "kind": "sentencepiece",
        "model_type": model_type,
        "vocab_size": tokenizer.vocab_size,
        "byte_fallback": bool(byte_fallback),
        "normalization": normalization,
        "character_coverage": float(character_coverage),
        "input_sentence_size": int(input_sentence_size),
        "seed": int(seed),
        "documents": stats.documents,
        "sentences": counts["sentences"],
        "sampled_sentences": counts["sampled"],
        "skipped_lines": stats.skipped_lines,
        "inputs": stats.files,
        "text_key": text_key,
        "text_docs": text_docs,
    }
    return _write_model(proto, tokenizer, out_prefix, manifest)


def reservoir_sample(items, k: int, seed: int) -> list:
    """A uniform random sample of at most `k` of `items` (streamed; memory bounded by `k`), shuffled,
    the same for the same seed and input."""
    rng = random.Random(seed)
    sample: list = []
    for i, item in enumerate(items):
        if i < k:
            sample.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                sample[j] = item
    rng.shuffle(sample)
    return sample


def _chain_first(first, rest):
    yield first
    yield from rest


def _training_error(exc: Exception, model_type: str, vocab_size: int) -> DataError:
    msg = " ".join(str(exc).split())
    msg = msg.rsplit("] ", 1)[-1] if "] " in msg else msg  # drop sentencepiece's "INTERNAL: file.cc(N) [cond]"
    if "required_chars" in msg:
        hint = "raise --vocab-size or lower --character-coverage"
    elif "too high" in msg:
        hint = "lower --vocab-size or give more text"
    else:
        hint = "check the corpus and the tokenizer options"
    return DataError(f"sentencepiece could not train a {model_type} model with vocab size {vocab_size} ({msg}); {hint}")


def _write_model(proto: bytes, tokenizer: SentencePieceTokenizer, out_prefix: PathLike, manifest: dict) -> dict:
    """Write `<out_prefix>.model/.vocab/.json` under temporary names, then rename them into place."""
    prefix = Path(out_prefix)
    if not prefix.name or str(out_prefix).endswith(("/", os.sep)):
        raise DataError(f"output prefix {str(out_prefix)!r} names a folder; give a path prefix such as "
                        f"data/tok/spm8k (writes .model, .vocab and .json)")
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {str(prefix.parent)!r} ({exc.strerror or exc}); choose a "
                        f"writable --output-prefix") from None
    sp = tokenizer.processor
    manifest = dict(manifest, model=prefix.name + ".model", vocab=prefix.name + ".vocab",
                    fingerprint=tokenizer.fingerprint(), special_ids=dict(tokenizer.special_ids),
                    pad=tokenizer.pad, eod=tokenizer.eod, vocab_size=tokenizer.vocab_size)
    vocab_lines = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    tmp = prefix.parent / f".{prefix.name}.tmp-{os.getpid()}"
    items = [(".model", proto), (".vocab", vocab_lines.encode("utf-8"))]
    written = []
    try:
        for ext, data in items:
            p = Path(str(tmp) + ext)
            written.append(p)
            p.write_bytes(data)
        Path(str(prefix) + ".json").unlink(missing_ok=True)  # never a new model next to an old manifest
        commit_staged((str(tmp) + ext, str(prefix) + ext) for ext, _ in items)  # fsynced, renamed, dir fsynced
        write_atomically(str(prefix) + ".json",  # the manifest last
                         (json.dumps(manifest, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return manifest


def add_special_tokens(model_path: PathLike, out_prefix: PathLike) -> dict:
    """Write a copy of a sentencepiece model in which every special token is one control piece: ordinary
    or user-defined pieces spelling a special become control pieces, missing ones are appended at the end.
    Existing ids do not change (data tokenized with the old model keeps its meaning, though its manifest
    names the old fingerprint). Needs the `protobuf` package."""
    path = resolve_model_path(model_path)
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise DataError("adding special tokens to a sentencepiece model needs the protobuf package; "
                        "`pip install protobuf`, or train a new model with `recurdepth data tokenizer`") from None
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise DataError(f"{str(path)!r} is not a sentencepiece model ({' '.join(str(exc).split())}); pass the "
                        f".model file written by sentencepiece") from None
    index = {p.piece: i for i, p in enumerate(proto.pieces)}
    added, converted = [], []
    for tok in ByteTokenizer.SPECIALS:
        i = index.get(tok)
        if i is None:
            proto.pieces.add(piece=tok, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
            added.append(tok)
        elif proto.pieces[i].type != pb.ModelProto.SentencePiece.CONTROL:
            if proto.pieces[i].type in (pb.ModelProto.SentencePiece.UNKNOWN, pb.ModelProto.SentencePiece.BYTE):
                raise DataError(f"{tok} is the unknown or a byte piece of {str(path)!r} and cannot become a special "
                                f"token; train a new model with `recurdepth data tokenizer`")
            proto.pieces[i].type = pb.ModelProto.SentencePiece.CONTROL
            converted.append(tok)
    data = proto.SerializeToString()
    tokenizer = SentencePieceTokenizer.from_bytes(data, str(out_prefix) + ".model")
    manifest = {"kind": "sentencepiece", "source_model": str(path.resolve()), "added_specials": added,
                "converted_specials": converted,
                "model_type": pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type).lower(),
                "byte_fallback": bool(proto.trainer_spec.byte_fallback)}
    return _write_model(data, tokenizer, out_prefix, manifest)
