"""Checks of a megatron-core indexed dataset (`<prefix>.bin` + `<prefix>.idx`) before a run or `recurdepth data
check` uses it: the index is whole and fills the .bin exactly, every token id fits the tokenizer, and the
manifest (`<prefix>.json`, written by `recurdepth data preprocess`) names the tokenizer the run uses.

The .idx is read by megatron-core's own reader (`megatron.core.datasets.indexed_dataset._IndexReader`, what
`IndexedDataset` opens), so the format is megatron's definition, not a copy of it. What the reader refuses
(bad magic, version or dtype code, a file shorter than its header or than the arrays its header describes)
and what it does not check (document boundaries, offsets, the .bin's size) become one-line DataErrors that
name the file and the fix; nothing here crashes with a traceback on a truncated or corrupt file.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from recurdepth.errors import DataError

__all__ = ["REBUILD", "check_indexed_dataset", "check_token_ids", "check_tokenizer_matches",
           "iter_indexed_documents", "read_index", "read_manifest", "sequence_lengths", "strip_prefix",
           "token_id_range"]

PathLike = Union[str, Path]

# megatron's .idx header: 9-byte magic, u64 version, u8 dtype code, u64 sequence count, u64 document count (its
# reader hard-codes the same 34 when given the counts); then int32 lengths, int64 pointers, int64 document
# indices, and for multimodal datasets one int8 mode per sequence.
_HEADER_BYTES = 34
REBUILD = "rebuild it with `recurdepth data preprocess`"


def strip_prefix(prefix: PathLike) -> str:
    """The dataset prefix of `prefix`, with a trailing .bin, .idx or .json removed."""
    s = str(prefix)
    for ext in (".bin", ".idx", ".json"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


def _require_files(prefix: str) -> None:
    for p in (prefix + ".idx", prefix + ".bin"):
        if not os.path.isfile(p):
            raise DataError(f"indexed dataset file {p!r} not found; run `recurdepth data preprocess "
                            f"--output-prefix {prefix}` or fix data.paths")


def read_index(prefix: PathLike):
    """megatron-core's `_IndexReader` of `<prefix>.idx`; whatever it refuses is a one-line DataError.

    Its arrays (`sequence_lengths`, `sequence_pointers`, `document_indices`) are views of a memory map that the
    reader closes when it is freed: keep the reader while using them, and copy what must outlive it."""
    from recurdepth.compat.private import index_reader_class

    _IndexReader = index_reader_class()
    idx_path = strip_prefix(prefix) + ".idx"
    reader = _IndexReader.__new__(_IndexReader)  # so the counts it has read survive a failed __init__
    try:
        reader.__init__(idx_path, multimodal=False)
    except Exception as exc:  # noqa: BLE001 - megatron asserts, numpy/struct errors: all mean a bad file
        raise _unreadable(idx_path, reader, exc) from None
    return reader


def _unreadable(idx_path: str, reader, exc: Exception) -> DataError:
    """The DataError for an .idx that megatron's reader refused with `exc`."""
    try:
        idx_size = os.path.getsize(idx_path)
    except OSError:
        idx_size = None
    reason = " ".join(str(exc).replace(idx_path, "").split()).rstrip(":, ")
    if isinstance(exc, OSError):
        return DataError(f"cannot read index {idx_path!r} ({exc.strerror or reason}); check the path and its "
                         f"permissions, or {REBUILD}")
    if isinstance(exc, struct.error) or (idx_size is not None and idx_size < _HEADER_BYTES):  # header cut short
        return DataError(f"index {idx_path!r} is truncated ({idx_size} bytes, shorter than its {_HEADER_BYTES}-byte "
                         f"header); {REBUILD}")
    if isinstance(exc, AssertionError) and "header" in reason:
        return DataError(f"{idx_path!r} is not a megatron-core index (bad magic bytes); {REBUILD}")
    if not hasattr(reader, "dtype"):  # the version assertion, or DType(code) of an unknown code
        return DataError(f"index {idx_path!r} has an unknown version or dtype code (megatron-core: {reason}); "
                         f"{REBUILD}")
    n_seq, n_doc = getattr(reader, "sequence_count", None), getattr(reader, "document_count", None)
    if n_seq is not None and n_doc is not None:  # the header's arrays do not fit in the file
        expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
        return DataError(f"index {idx_path!r} is {idx_size} bytes but its header describes {n_seq} sequences and "
                         f"{n_doc} document boundaries ({expected} bytes): it is truncated or corrupt; {REBUILD}")
    return DataError(f"megatron-core cannot read index {idx_path!r} ({type(exc).__name__}: {reason}); {REBUILD}")


def check_indexed_dataset(prefix: PathLike) -> None:
    """Raise a one-line DataError unless `<prefix>.idx` is a whole megatron-core index whose sequences
    exactly fill `<prefix>.bin`. Reads the index with megatron's reader and streams its lengths; never crashes
    on a truncated file."""
    prefix = strip_prefix(prefix)
    _require_files(prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    index = read_index(prefix)
    n_seq, n_doc, dtype = int(index.sequence_count), int(index.document_count), np.dtype(index.dtype)
    expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_size not in (expected, expected + n_seq):  # + one int8 mode per sequence for multimodal data
        raise DataError(f"index {idx_path!r} is {idx_size} bytes but its header describes {n_seq} sequences and "
                        f"{n_doc} document boundaries ({expected} bytes): it is truncated or corrupt; {REBUILD}")
    if n_doc < 1:
        raise DataError(f"index {idx_path!r} has no document boundaries; {REBUILD}")
    total = 0
    if n_seq:
        lengths = index.sequence_lengths
        step = 1 << 22
        for i in range(0, n_seq, step):
            block = np.asarray(lengths[i:i + step], dtype=np.int64)
            if block.size and block.min() < 0:
                raise DataError(f"index {idx_path!r} has negative sequence lengths: it is corrupt; {REBUILD}")
            total += int(block.sum())
        first_doc, last_doc = int(index.document_indices[0]), int(index.document_indices[-1])
        first_ptr = int(index.sequence_pointers[0])
        last_end = int(index.sequence_pointers[-1]) + int(lengths[-1]) * dtype.itemsize
        del lengths, block
        if first_doc != 0 or last_doc != n_seq:
            raise DataError(f"index {idx_path!r} has document boundaries {first_doc}..{last_doc} for {n_seq} "
                            f"sequences: it is corrupt; {REBUILD}")
        if first_ptr != 0 or last_end != total * dtype.itemsize:
            raise DataError(f"index {idx_path!r} has sequence offsets that disagree with its lengths: it is "
                            f"corrupt; {REBUILD}")
    if bin_size != total * dtype.itemsize:
        raise DataError(f"{bin_path!r} is {bin_size} bytes but {idx_path!r} indexes {total} tokens of "
                        f"{dtype.name} ({total * dtype.itemsize} bytes): the .bin/.idx pair is truncated or "
                        f"mismatched; {REBUILD}")


def sequence_lengths(prefix: PathLike) -> np.ndarray:
    """The token count of every sequence (= document, as `preprocess` writes them) of an indexed dataset, read
    from its .idx by megatron's reader (a copy: 4 bytes per document); megatron's GPT splits count these."""
    prefix = strip_prefix(prefix)
    check_indexed_dataset(prefix)
    index = read_index(prefix)
    return np.array(index.sequence_lengths, dtype=np.int32)


def token_id_range(prefix: PathLike, block_tokens: int = 1 << 24) -> tuple[int, int]:
    """(smallest, largest) token id in `<prefix>.bin` ((0, -1) when it holds none), streamed in blocks: one pass
    over the file at disk speed, for a dataset whose manifest does not say which tokenizer made it."""
    prefix = strip_prefix(prefix)
    _require_files(prefix)
    dtype = np.dtype(read_index(prefix).dtype)
    size = os.path.getsize(prefix + ".bin") // dtype.itemsize
    if size == 0:
        return 0, -1
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(size,))
    low, top = 0, -1
    for i in range(0, size, block_tokens):
        block = data[i:i + block_tokens]
        low, top = min(low, int(block.min())), max(top, int(block.max()))
    del data
    return low, top


_ID_RANGES: dict = {}


def check_token_ids(prefix: PathLike, vocab_size: int) -> None:
    """Raise a one-line DataError when the dataset holds a token id outside a vocabulary of `vocab_size` ids
    (it was tokenized by another tokenizer; the embedding lookup would fail on it)."""
    prefix = strip_prefix(prefix)
    st = os.stat(prefix + ".bin")
    key = (os.path.abspath(prefix), st.st_size, st.st_mtime_ns)
    if key not in _ID_RANGES:  # build_datasets resolves the sources twice on rank 0: scan once
        _ID_RANGES[key] = token_id_range(prefix)
    low, top = _ID_RANGES[key]
    if low < 0:
        raise DataError(f"dataset {prefix!r} holds the negative token id {low}: it is corrupt; {REBUILD}")
    if top >= int(vocab_size):
        raise DataError(f"dataset {prefix!r} holds token id {top} but the tokenizer has {vocab_size} ids (0.."
                        f"{int(vocab_size) - 1}) and the dataset has no manifest ({prefix}.json) naming the "
                        f"tokenizer that made it; {REBUILD} using the run's tokenizer (or set data.tokenizer to "
                        f"the one that made it)")


def read_manifest(prefix: PathLike) -> Optional[dict]:
    """The manifest of an indexed dataset: `<prefix>.json` (written by `preprocess`), or the builtin
    corpus's `manifest.json` next to it; None if there is none."""
    prefix = strip_prefix(prefix)
    for p in (Path(prefix + ".json"), Path(prefix).parent / "manifest.json"):
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except (ValueError, OSError) as exc:
                raise DataError(f"dataset manifest {str(p)!r} is unreadable ({' '.join(str(exc).split())}); "
                                f"{REBUILD}") from None
    return None


def check_tokenizer_matches(manifest_or_prefix, tokenizer, model_vocab_size: Optional[int] = None,
                            require_manifest: bool = True) -> None:
    """Raise a one-line DataError unless the dataset was tokenized by `tokenizer` (same fingerprint and
    vocabulary size, per its manifest) and, if given, `model_vocab_size` holds every id of `tokenizer`.

    `manifest_or_prefix` is a manifest dict or a dataset prefix. A dataset without a manifest is an error
    unless `require_manifest=False`; either way its token ids are then scanned once (`check_token_ids`), so an
    id the tokenizer does not have is refused before training."""
    fp, vocab = tokenizer.fingerprint(), int(tokenizer.vocab_size)
    if isinstance(manifest_or_prefix, dict):
        manifest, name = manifest_or_prefix, str(manifest_or_prefix.get("prefix", "dataset"))
    else:
        name = strip_prefix(manifest_or_prefix)
        manifest = read_manifest(name)
        if manifest is None:  # nothing says which tokenizer made it: at least every id must be one of ours
            check_token_ids(name, vocab)
        if manifest is None and require_manifest:
            raise DataError(f"dataset {name!r} has no manifest ({name}.json), so the tokenizer that made it is "
                            f"unknown; {REBUILD} with the tokenizer the run uses")
    if manifest is not None:
        info = manifest.get("tokenizer")
        if isinstance(info, str):  # the builtin corpus records the fingerprint only
            info = {"fingerprint": info}
        if not isinstance(info, dict) or "fingerprint" not in info:
            raise DataError(f"the manifest of dataset {name!r} does not record its tokenizer; {REBUILD}")
        data_fp, data_vocab = info.get("fingerprint"), info.get("vocab_size")
        if data_fp != fp or (data_vocab is not None and int(data_vocab) != vocab):
            made = f"{info.get('path') or info.get('kind') or 'tokenizer'} ({data_fp}, vocab {data_vocab or '?'})"
            raise DataError(f"dataset {name!r} was tokenized with {made} but the run uses "
                            f"{getattr(tokenizer, 'model_path', None) or tokenizer.unique_description} ({fp}, vocab "
                            f"{vocab}); use that tokenizer or re-run `recurdepth data preprocess --tokenizer ...` "
                            f"with this one")
    if model_vocab_size is not None and int(model_vocab_size) < vocab:
        raise DataError(f"the tokenizer has {vocab} ids but model.vocab_size is {model_vocab_size}; set "
                        f"model.vocab_size >= {vocab} or leave it unset to use the tokenizer's")


def iter_indexed_documents(prefix: PathLike) -> Iterable:
    """Each document of an indexed dataset as a numpy array (a copy: it outlives megatron's memory map), read
    with megatron's `IndexedDataset` (for inspection and tests)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(strip_prefix(prefix))
    for d in range(len(ds.document_indices) - 1):
        lo, hi = int(ds.document_indices[d]), int(ds.document_indices[d + 1])
        yield np.concatenate([ds[i] for i in range(lo, hi)]) if hi - lo != 1 else np.array(ds[lo])
