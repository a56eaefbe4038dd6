"""Raw text → megatron-core indexed datasets (`.bin`/`.idx`), and the checks a trainer runs before using one.

Inputs are JSONL files (one JSON object per line, the document in a text field), plain-text files (by
default one document per blank-line-separated paragraph) or folders of them. They are streamed: the
reader yields one document at a time, worker processes tokenize chunks of documents, and the chunks are
appended in input order to megatron-core's `IndexedDatasetBuilder`, so memory does not grow with the size
of the text (only megatron's index grows, by a few bytes per document) and the output does not depend on
the number of workers. Every document ends with the tokenizer's EOD token. Outputs are written under
temporary names and renamed into place at the end, so a failed run leaves nothing behind; next to them,
`<prefix>.json` records token counts, the inputs (size and sha256) and the tokenizer's fingerprint.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import multiprocessing
import os
import struct
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from recurdepth.data.tokenizer import tokenizer_from_spec
from recurdepth.errors import DataError

PathLike = Union[str, Path]

TEXT_DOCS = ("paragraph", "line", "file")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # an explicitly named file with one of these is JSONL
FOLDER_SUFFIXES = (".jsonl", ".ndjson", ".txt", ".text")  # files picked up when a folder is given
_MAX_EXAMPLES = 5

# megatron-core's .idx layout (megatron/core/datasets/indexed_dataset.py): 9-byte magic, u64 version (1),
# u8 dtype code, u64 sequence count, u64 document count, then int32 lengths, int64 pointers, int64
# document indices (and int8 modes for multimodal datasets).
_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 34
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
                8: np.uint16}
_REBUILD = "rebuild it with `recurdepth data preprocess`"


# --------------------------------------------------------------------------------------------- reading


@dataclass
class ReadStats:
    """What `iter_documents` saw; `files` gets each file's size and sha256 once it has been read to the end."""

    files: list = field(default_factory=list)
    bytes_read: int = 0
    lines: int = 0
    documents: int = 0
    skipped_lines: int = 0
    skipped_examples: list = field(default_factory=list)
    empty_documents: int = 0


def resolve_inputs(inputs: Union[PathLike, Sequence[PathLike]]) -> list:
    """The input files, in order: each file as given, each folder's .jsonl/.ndjson/.txt/.text files
    (recursively, sorted, hidden ones skipped). DataError for a missing path or a folder with no such file."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs or [])
    if not inputs:
        raise DataError("no input given; pass --input FILE_OR_FOLDER (JSONL, plain text, or a folder of them)")
    files, seen = [], set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix.lower() in FOLDER_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise DataError(f"input folder {str(p)!r} has no {'/'.join(FOLDER_SUFFIXES)} files; "
                                f"point --input at a folder or file with the corpus")
        elif p.is_file():
            found = [p]
        else:
            raise DataError(f"input {str(p)!r} not found; pass an existing JSONL or text file, or a folder of "
                            f"them, with --input")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                files.append(f)
    return files


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def _file_lines(path: Path, stats: ReadStats) -> Iterator:
    """(line number, raw bytes) of one file; records its size and sha256 when read to the end."""
    digest, size = hashlib.sha256(), 0
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            for no, raw in enumerate(f, 1):
                digest.update(raw)
                size += len(raw)
                stats.bytes_read += len(raw)
                stats.lines += 1
                if no == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8):]
                yield no, raw
    except OSError as exc:
        raise DataError(f"cannot read input {str(path)!r} ({exc.strerror or exc}); check the path and its "
                        f"permissions") from None
    stats.files.append({"path": str(path.resolve()), "bytes": size, "sha256": digest.hexdigest()})


def iter_records(inputs: Union[PathLike, Sequence[PathLike]], text_docs: str = "paragraph",
                 skip_bad_lines: bool = False, stats: Optional[ReadStats] = None) -> Iterator:
    """Yield `(path, line_no, payload, is_json)` for every candidate document, streaming: for JSONL the raw
    line (bytes; parse it with `parse_jsonl_line`), for plain text the document's text (see `iter_documents`).
    This is the cheap half of reading; `preprocess` parses JSON in its worker processes."""
    if text_docs not in TEXT_DOCS:
        raise DataError(f"unknown text document mode {text_docs!r}; use one of {', '.join(TEXT_DOCS)}")
    stats = stats if stats is not None else ReadStats()
    for path in resolve_inputs(inputs):
        name = str(path)
        if _is_jsonl(path):
            for no, raw in _file_lines(path, stats):
                if raw.strip():
                    yield name, no, raw, True
        else:
            for no, text in _text_documents(path, text_docs, skip_bad_lines, stats):
                yield name, no, text, False


def parse_jsonl_line(path: str, line_no: int, raw: bytes, text_key: str) -> tuple:
    """`(text, None)` for a good JSONL line, `(None, message)` naming the file, line and problem otherwise."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"malformed JSONL line {path}:{line_no} (not valid UTF-8 at byte {exc.start + 1})"
    except ValueError as exc:
        reason = getattr(exc, "msg", None) or " ".join(str(exc).split())
        col = f", column {exc.colno}" if hasattr(exc, "colno") else ""
        return None, f"malformed JSONL line {path}:{line_no} ({reason}{col})"
    if not isinstance(obj, dict):
        return None, (f"malformed JSONL line {path}:{line_no} (a JSON {type(obj).__name__}, not an object with a "
                      f"{text_key!r} field)")
    if text_key not in obj:
        fields = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        return None, (f"JSONL line {path}:{line_no} has no {text_key!r} text field (fields: {fields}); name the "
                      f"right one with --text-key")
    text = obj[text_key]
    if not isinstance(text, str):
        return None, f"JSONL line {path}:{line_no} has a {type(text).__name__} in text field {text_key!r}, not a string"
    return text, None


def iter_documents(inputs: Union[PathLike, Sequence[PathLike]], text_key: str = "text",
                   skip_bad_lines: bool = False, text_docs: str = "paragraph",
                   stats: Optional[ReadStats] = None) -> Iterator:
    """Yield `(path, line_no, text)` for every document of the inputs, streaming.

    JSONL (.jsonl/.ndjson/.json): one JSON object per line, the document in `text_key`; blank lines are
    ignored. Plain text (any other file): `text_docs="paragraph"` makes each run of non-blank lines one
    document (lines joined by "\\n"), `"line"` each non-blank line, `"file"` the whole file. Empty documents
    are skipped (and counted). A malformed line (bad JSON, not an object, no or non-string text field,
    invalid UTF-8) raises a one-line DataError naming the file and line, or with `skip_bad_lines` is
    skipped and counted in `stats`.
    """
    stats = stats if stats is not None else ReadStats()
    for path, no, payload, is_json in iter_records(inputs, text_docs, skip_bad_lines, stats):
        if is_json:
            text, problem = parse_jsonl_line(path, no, payload, text_key)
            if problem is not None:
                _bad_line(stats, skip_bad_lines, problem)
                continue
        else:
            text = payload
        if not text:
            stats.empty_documents += 1
            continue
        stats.documents += 1
        yield path, no, text


def _bad_line(stats: ReadStats, skip: bool, message: str) -> None:
    if not skip:
        raise DataError(f"{message}; fix it or pass --skip-bad-lines (skip_bad_lines=True) to skip bad lines")
    stats.skipped_lines += 1
    if len(stats.skipped_examples) < _MAX_EXAMPLES:
        stats.skipped_examples.append(message)


def _text_documents(path: Path, mode: str, skip: bool, stats: ReadStats) -> Iterator:
    para, start = [], 0
    for no, raw in _file_lines(path, stats):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            _bad_line(stats, skip, f"text line {path}:{no} is not valid UTF-8 (byte {exc.start + 1})")
            continue
        if mode == "file":
            para.append(line)
            start = start or no
            continue
        line = line.rstrip("\r\n")
        if mode == "line":
            if line.strip():
                yield no, line
        elif line.strip():
            if not para:
                start = no
            para.append(line)
        elif para:
            yield start, "\n".join(para)
            para = []
    if para:
        yield start, ("".join(para) if mode == "file" else "\n".join(para))


def empty_corpus_error(inputs, stats: ReadStats, text_key: str) -> DataError:
    """The one-line DataError for inputs that held no document."""
    names = ", ".join(str(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))
    if stats.skipped_lines:
        return DataError(f"empty corpus: all {stats.skipped_lines} non-blank lines of {names} were skipped "
                         f"(first: {stats.skipped_examples[0]}); check --text-key ({text_key!r}) and the input format")
    return DataError(f"empty corpus: {names} holds no documents ({stats.lines} lines, {stats.empty_documents} "
                     f"empty documents); point --input at the text to use")


# --------------------------------------------------------------------------------------------- encoding

_WORKER_TOKENIZER = None


def _init_worker(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    try:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
    except (ImportError, ValueError):
        pass


def _encode_records(records: list, text_key: str, dtype) -> tuple:
    """Parse and tokenize a chunk of `iter_records` records: (all ids, with an EOD after each document;
    per-document lengths; [(record index, problem)] for bad lines; number of empty documents)."""
    tok = _WORKER_TOKENIZER
    texts, bad, empty = [], [], 0
    for i, (path, no, payload, is_json) in enumerate(records):
        if is_json:
            payload, problem = parse_jsonl_line(path, no, payload, text_key)
            if problem is not None:
                bad.append((i, problem))
                continue
        if payload:
            texts.append(payload)
        else:
            empty += 1
    batch = getattr(tok, "tokenize_batch", None)
    seqs = batch(texts) if batch is not None else [tok.tokenize(t) for t in texts]
    eod = tok.eod
    lengths = np.empty(len(seqs), dtype=np.int64)
    for i, seq in enumerate(seqs):
        if not isinstance(seq, list):
            seq = seqs[i] = list(seq)
        seq.append(eod)
        lengths[i] = len(seq)
    ids = np.fromiter(chain.from_iterable(seqs), dtype=dtype, count=int(lengths.sum()))
    return ids, lengths, bad, empty


def _chunked(records: Iterator, chunk_chars: int, chunk_docs: int) -> Iterator:
    chunk, size = [], 0
    for rec in records:
        chunk.append(rec)
        size += len(rec[2])
        if size >= chunk_chars or len(chunk) >= chunk_docs:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encoded_chunks(chunks: Iterator, tokenizer, text_key: str, dtype, workers: int) -> Iterator:
    """Encoded chunks in input order; with workers > 1 a process pool keeps a bounded number in flight."""
    if workers <= 1:
        _init_worker_inline(tokenizer)
        for chunk in chunks:
            yield _encode_records(chunk, text_key, dtype)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_records, (chunk, text_key, dtype)))
            if len(pending) >= 2 * workers + 2:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
        pool.join()
    finally:
        pool.terminate()


def _init_worker_inline(tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def index_dtype(vocab_size: int):
    """The token dtype of the .bin file: megatron-core's choice (`DType.optimal_dtype`)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def preprocess(inputs: Union[PathLike, Sequence[PathLike]], output_prefix: PathLike,
               tokenizer_path_or_kind="byte", text_key: str = "text", workers: int = 2,
               skip_bad_lines: bool = False, progress: bool = True, text_docs: str = "paragraph",
               chunk_chars: int = 1 << 18, chunk_docs: int = 4096) -> dict:
    """Tokenize `inputs` into `<output_prefix>.bin/.idx` (megatron-core indexed dataset) plus a
    `<output_prefix>.json` manifest; returns the manifest, with `seconds`, `tokens_per_s` and `workers`
    of this run added (those three are not written to the file, which stays reproducible).

    `tokenizer_path_or_kind` is "byte", a sentencepiece `.model` path (or its prefix), or a tokenizer
    object. Bad input raises a one-line DataError and leaves no output (nor temporary) file behind.
    """
    tokenizer = tokenizer_from_spec(tokenizer_path_or_kind)
    if text_docs not in TEXT_DOCS:
        raise DataError(f"unknown text document mode {text_docs!r}; use one of {', '.join(TEXT_DOCS)}")
    files = resolve_inputs(inputs)
    total_bytes = sum(f.stat().st_size for f in files)
    prefix = Path(output_prefix)
    if not prefix.name or str(output_prefix).endswith(("/", os.sep)):
        raise DataError(f"output prefix {str(output_prefix)!r} names a folder; give a path prefix such as "
                        f"data/corpus (writes data/corpus.bin, .idx and .json)")
    made_dirs = _make_parents(prefix.parent)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = index_dtype(tokenizer.vocab_size)
    tmp = prefix.parent / f".{prefix.name}.tmp-{os.getpid()}"
    tmp_paths = [Path(str(tmp) + ext) for ext in (".bin", ".idx", ".json")]
    final_paths = [Path(str(prefix) + ext) for ext in (".bin", ".idx", ".json")]
    stats = ReadStats()
    docs = tokens = 0
    bar = builder = encoded = None
    t0 = time.perf_counter()
    try:
        builder = IndexedDatasetBuilder(str(tmp_paths[0]), dtype=dtype)
        _compact_index_lists(builder)
        bar = _progress_bar(total_bytes, progress)
        chunks = _chunked(iter_records(files, text_docs, skip_bad_lines, stats), chunk_chars, chunk_docs)
        encoded = _encoded_chunks(chunks, tokenizer, text_key, dtype, max(1, int(workers)))
        last_postfix = 0.0
        for ids, lengths, bad, empty in encoded:
            for _, problem in bad:
                _bad_line(stats, skip_bad_lines, problem)
            stats.empty_documents += empty
            stats.documents += len(lengths)
            start = 0
            for n in lengths.tolist():
                builder.add_document(ids[start:start + n], [n])
                start += n
            docs += len(lengths)
            tokens += int(ids.size)
            if bar is not None:
                bar.update(stats.bytes_read - bar.n)
                now = time.perf_counter()
                if now - last_postfix >= 0.5:
                    bar.set_postfix_str(f"{tokens / max(now - t0, 1e-9):,.0f} tok/s, {docs} docs", refresh=False)
                    last_postfix = now
        if bar is not None:
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s, {docs} docs",
                                refresh=False)
        if docs == 0:
            raise empty_corpus_error([str(f) for f in files], stats, text_key)
        builder.finalize(str(tmp_paths[1]))
        seconds = time.perf_counter() - t0
        manifest = {
            "format": "megatron-core indexed dataset",
            "prefix": prefix.name,
            "documents": docs,
            "tokens": tokens,
            "text_tokens": tokens - docs,
            "dtype": np.dtype(dtype).name,
            "eod": int(tokenizer.eod),
            "pad": int(tokenizer.pad),
            "tokenizer": tokenizer_info(tokenizer),
            "inputs": stats.files,
            "input_bytes": stats.bytes_read,
            "text_key": text_key,
            "text_docs": text_docs,
            "skipped_lines": stats.skipped_lines,
            "skipped_examples": stats.skipped_examples,
            "empty_documents": stats.empty_documents,
            "bin_bytes": tmp_paths[0].stat().st_size,
        }
        tmp_paths[2].write_text(json.dumps(manifest, indent=1) + "\n")
        check_indexed_dataset(str(tmp))
        final_paths[2].unlink(missing_ok=True)  # never a new .bin/.idx next to an old manifest
        for src, dst in zip(tmp_paths, final_paths):  # the manifest last: it marks a complete dataset
            os.replace(src, dst)
    except BaseException:
        if builder is not None:
            builder.data_file.close()
        for p in tmp_paths:
            p.unlink(missing_ok=True)
        for d in reversed(made_dirs):
            try:
                d.rmdir()
            except OSError:
                pass
        raise
    finally:
        if encoded is not None:
            encoded.close()  # stops the worker pool now, not when the traceback is freed
        if bar is not None:
            bar.close()
    return dict(manifest, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9), workers=max(1, int(workers)))


def _make_parents(folder: Path) -> list:
    missing = []
    d = folder
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except OSError as exc:
            raise DataError(f"cannot create output folder {str(d)!r} ({exc.strerror or exc}); choose a writable "
                            f"--output-prefix") from None
    return list(reversed(missing))


def _compact_index_lists(builder) -> None:
    """megatron's builder keeps the per-sequence index in Python lists (~36 bytes per entry); typed arrays
    hold the same at 8 bytes and are accepted wherever the builder and its index writer use them."""
    if isinstance(getattr(builder, "sequence_lengths", None), list) and not builder.sequence_lengths:
        builder.sequence_lengths = array("q")
    if isinstance(getattr(builder, "document_indices", None), list) and builder.document_indices == [0]:
        builder.document_indices = array("q", [0])


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="preprocess",
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def tokenizer_info(tokenizer) -> dict:
    """What a dataset manifest records about the tokenizer that made it."""
    path = getattr(tokenizer, "model_path", None)
    return {
        "kind": "sentencepiece" if path else getattr(tokenizer, "unique_description", type(tokenizer).__name__),
        "path": str(Path(path).resolve()) if path and Path(path).is_file() else path,
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": int(tokenizer.vocab_size),
        "special_ids": {k: int(v) for k, v in tokenizer.special_ids.items()},
    }


# --------------------------------------------------------------------------------------------- checks


def _strip_prefix(prefix: PathLike) -> str:
    s = str(prefix)
    for ext in (".bin", ".idx", ".json"):
        if s.endswith(ext):
            return s[: -len(ext)]
    return s


def check_indexed_dataset(prefix: PathLike) -> None:
    """Raise a one-line DataError unless `<prefix>.idx` is a whole megatron-core index whose sequences
    exactly fill `<prefix>.bin`. Reads the header and streams the index; never crashes on a truncated file."""
    prefix = _strip_prefix(prefix)
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for p in (idx_path, bin_path):
        if not os.path.isfile(p):
            raise DataError(f"indexed dataset file {p!r} not found; run `recurdepth data preprocess "
                            f"--output-prefix {prefix}` or fix data.paths")
    idx_size, bin_size = os.path.getsize(idx_path), os.path.getsize(bin_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        raise DataError(f"index {idx_path!r} is truncated ({idx_size} bytes, shorter than its {_HEADER_BYTES}-byte "
                        f"header); {_REBUILD}")
    if head[:9] != _INDEX_HEADER:
        raise DataError(f"{idx_path!r} is not a megatron-core index (bad magic bytes); {_REBUILD}")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPE_CODES:
        raise DataError(f"index {idx_path!r} has an unknown version ({version}) or dtype code ({code}); {_REBUILD}")
    expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if idx_size not in (expected, expected + n_seq):  # + one int8 mode per sequence for multimodal data
        raise DataError(f"index {idx_path!r} is {idx_size} bytes but its header describes {n_seq} sequences and "
                        f"{n_doc} document boundaries ({expected} bytes): it is truncated or corrupt; {_REBUILD}")
    if n_doc < 1:
        raise DataError(f"index {idx_path!r} has no document boundaries; {_REBUILD}")
    itemsize = np.dtype(_DTYPE_CODES[code]).itemsize
    total = 0
    if n_seq:
        lengths = np.memmap(idx_path, dtype=np.int32, mode="r", offset=_HEADER_BYTES, shape=(n_seq,))
        pointers = np.memmap(idx_path, dtype=np.int64, mode="r", offset=_HEADER_BYTES + 4 * n_seq, shape=(n_seq,))
        doc_idx = np.memmap(idx_path, dtype=np.int64, mode="r", offset=_HEADER_BYTES + 12 * n_seq, shape=(n_doc,))
        step = 1 << 22
        for i in range(0, n_seq, step):
            block = np.asarray(lengths[i:i + step], dtype=np.int64)
            if block.size and block.min() < 0:
                raise DataError(f"index {idx_path!r} has negative sequence lengths: it is corrupt; {_REBUILD}")
            total += int(block.sum())
        first_doc, last_doc = int(doc_idx[0]), int(doc_idx[-1])
        first_ptr, last_end = int(pointers[0]), int(pointers[-1]) + int(lengths[-1]) * itemsize
        del lengths, pointers, doc_idx
        if first_doc != 0 or last_doc != n_seq:
            raise DataError(f"index {idx_path!r} has document boundaries {first_doc}..{last_doc} for {n_seq} "
                            f"sequences: it is corrupt; {_REBUILD}")
        if first_ptr != 0 or last_end != total * itemsize:
            raise DataError(f"index {idx_path!r} has sequence offsets that disagree with its lengths: it is "
                            f"corrupt; {_REBUILD}")
    if bin_size != total * itemsize:
        raise DataError(f"{bin_path!r} is {bin_size} bytes but {idx_path!r} indexes {total} tokens of "
                        f"{np.dtype(_DTYPE_CODES[code]).name} ({total * itemsize} bytes): the .bin/.idx pair is "
                        f"truncated or mismatched; {_REBUILD}")


def _index_header(prefix: str) -> tuple:
    """(dtype of the tokens, sequence count, document count) from `<prefix>.idx`'s header (checked already)."""
    with open(prefix + ".idx", "rb") as f:
        head = f.read(_HEADER_BYTES)
    _, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    return _DTYPE_CODES[code], n_seq, n_doc


def sequence_lengths(prefix: PathLike) -> np.ndarray:
    """The token count of every sequence (= document, as `preprocess` writes them) of an indexed dataset,
    memory-mapped from its .idx; megatron's GPT splits count these."""
    prefix = _strip_prefix(prefix)
    check_indexed_dataset(prefix)
    _, n_seq, _ = _index_header(prefix)
    if n_seq == 0:
        return np.zeros(0, dtype=np.int32)
    return np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=_HEADER_BYTES, shape=(n_seq,))


def token_id_range(prefix: PathLike, block_tokens: int = 1 << 24) -> tuple[int, int]:
    """(smallest, largest) token id in `<prefix>.bin` ((0, -1) when it holds none), streamed in blocks: one pass
    over the file at disk speed, for a dataset whose manifest does not say which tokenizer made it."""
    prefix = _strip_prefix(prefix)
    dtype, _, _ = _index_header(prefix)
    size = os.path.getsize(prefix + ".bin") // np.dtype(dtype).itemsize
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
    prefix = _strip_prefix(prefix)
    st = os.stat(prefix + ".bin")
    key = (os.path.abspath(prefix), st.st_size, st.st_mtime_ns)
    if key not in _ID_RANGES:  # build_datasets resolves the sources twice on rank 0: scan once
        _ID_RANGES[key] = token_id_range(prefix)
    low, top = _ID_RANGES[key]
    if low < 0:
        raise DataError(f"dataset {prefix!r} holds the negative token id {low}: it is corrupt; {_REBUILD}")
    if top >= int(vocab_size):
        raise DataError(f"dataset {prefix!r} holds token id {top} but the tokenizer has {vocab_size} ids (0.."
                        f"{int(vocab_size) - 1}) and the dataset has no manifest ({prefix}.json) naming the "
                        f"tokenizer that made it; {_REBUILD} using the run's tokenizer (or set data.tokenizer to "
                        f"the one that made it)")


def read_manifest(prefix: PathLike) -> Optional[dict]:
    """The manifest of an indexed dataset: `<prefix>.json` (written by `preprocess`), or the builtin
    corpus's `manifest.json` next to it; None if there is none."""
    prefix = _strip_prefix(prefix)
    for p in (Path(prefix + ".json"), Path(prefix).parent / "manifest.json"):
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except (ValueError, OSError) as exc:
                raise DataError(f"dataset manifest {str(p)!r} is unreadable ({' '.join(str(exc).split())}); "
                                f"{_REBUILD}") from None
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
        name = _strip_prefix(manifest_or_prefix)
        manifest = read_manifest(name)
        if manifest is None:  # nothing says which tokenizer made it: at least every id must be one of ours
            check_token_ids(name, vocab)
        if manifest is None and require_manifest:
            raise DataError(f"dataset {name!r} has no manifest ({name}.json), so the tokenizer that made it is "
                            f"unknown; {_REBUILD} with the tokenizer the run uses")
    if manifest is not None:
        info = manifest.get("tokenizer")
        if isinstance(info, str):  # the builtin corpus records the fingerprint only
            info = {"fingerprint": info}
        if not isinstance(info, dict) or "fingerprint" not in info:
            raise DataError(f"the manifest of dataset {name!r} does not record its tokenizer; {_REBUILD}")
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
    """Each document of an indexed dataset as a numpy array (for inspection and tests)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(_strip_prefix(prefix))
    for d in range(len(ds.document_indices) - 1):
        lo, hi = int(ds.document_indices[d]), int(ds.document_indices[d + 1])
        yield np.concatenate([ds[i] for i in range(lo, hi)]) if hi - lo != 1 else ds[lo]
