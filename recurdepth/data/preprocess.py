"""Raw text -> megatron-core indexed datasets (`.bin`/`.idx`): `recurdepth data preprocess`.

The inputs are read by `readers.py` (JSONL, plain text, folders; streamed one document at a time); worker
processes tokenize chunks of documents, and the chunks are appended in input order to megatron-core's
`IndexedDatasetBuilder`, so memory does not grow with the size of the text (only megatron's index grows, by
a few bytes per document: `recurdepth.compat.datasets`) and the output does not depend on the number of
workers. Every document ends with the tokenizer's EOD token. Outputs are written under temporary names,
checked (`indexed.py`, megatron's reader) and moved into place at the end (fsynced), so a failed run leaves
nothing behind; next to them, `<prefix>.json` records token counts, the inputs (size and sha256) and the
tokenizer's fingerprint, written last (atomically): it marks a complete dataset.

The readers and the checks were split out of this module; their names are re-exported here, so
`from recurdepth.data.preprocess import check_indexed_dataset, iter_documents, ...` keeps working.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from collections import deque
from itertools import chain
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from recurdepth.atomic import write_atomically
from recurdepth.data.indexed import (REBUILD, check_indexed_dataset, check_token_ids, check_tokenizer_matches,
                                     iter_indexed_documents, read_index, read_manifest, sequence_lengths,
                                     strip_prefix, token_id_range)
from recurdepth.data.readers import (FOLDER_SUFFIXES, JSONL_SUFFIXES, TEXT_DOCS, PathLike, ReadStats,
                                     empty_corpus_error, handle_bad_line, iter_documents, iter_records,
                                     parse_jsonl_line, resolve_inputs)
from recurdepth.atomic import commit_staged
from recurdepth.data.tokenizer import HFTokenizer, tokenizer_from_spec
from recurdepth.errors import DataError

__all__ = [  # this module's own, then the readers' and the checks' (re-exported)
    "index_dtype", "preprocess", "tokenizer_info",
    "FOLDER_SUFFIXES", "JSONL_SUFFIXES", "TEXT_DOCS", "PathLike", "ReadStats", "empty_corpus_error",
    "iter_documents", "iter_records", "parse_jsonl_line", "resolve_inputs",
    "REBUILD", "check_indexed_dataset", "check_token_ids", "check_tokenizer_matches", "iter_indexed_documents",
    "read_index", "read_manifest", "sequence_lengths", "strip_prefix", "token_id_range",
]


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
    """The token dtype of the .bin file: megatron-core's choice (`DType.optimal_dtype`: uint16 below 65500 ids,
    else int32)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(int(vocab_size))


def preprocess(inputs: Union[PathLike, Sequence[PathLike]], output_prefix: PathLike,
               tokenizer_path_or_kind="byte", text_key: str = "text", workers: int = 2,
               skip_bad_lines: bool = False, progress: bool = True, text_docs: str = "paragraph",
               chunk_chars: int = 1 << 18, chunk_docs: int = 4096) -> dict:
    """Tokenize `inputs` into `<output_prefix>.bin/.idx` (megatron-core indexed dataset) plus a
    `<output_prefix>.json` manifest; returns the manifest, with `seconds`, `tokens_per_s` and `workers`
    of this run added (those three are not written to the file, which stays reproducible).

    `tokenizer_path_or_kind` is "byte", a sentencepiece `.model` path (or its prefix), a Hugging Face
    `tokenizer.json` (or its folder), or a tokenizer object. Bad input raises a one-line DataError and leaves
    no output (nor temporary) file behind.
    """
    tokenizer = tokenizer_from_spec(tokenizer_path_or_kind)
    if text_docs not in TEXT_DOCS:
        raise DataError(f"unknown text document mode {text_docs!r}; use one of {', '.join(TEXT_DOCS)}")
    files = resolve_inputs(inputs)
    total_bytes = sum(f.stat().st_size for f in files)
    prefix = Path(output_prefix)
    if not prefix.name or str(output_prefix).endswith(("/", os.sep)):
        raise DataError(f"output prefix {str(output_prefix)!r} names a folder; give a path prefix such as "
                        f"data/corpus/mytext (writes data/corpus/mytext.bin, .idx and .json)")
    made_dirs = _make_parents(prefix.parent)

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from recurdepth.compat.datasets import compact_index_lists

    dtype = index_dtype(tokenizer.vocab_size)
    tmp = prefix.parent / f".{prefix.name}.tmp-{os.getpid()}"
    tmp_paths = [Path(str(tmp) + ext) for ext in (".bin", ".idx")]
    final_paths = [Path(str(prefix) + ext) for ext in (".bin", ".idx", ".json")]
    stats = ReadStats()
    docs = tokens = 0
    committed = False
    bar = builder = encoded = None
    t0 = time.perf_counter()
    try:
        builder = IndexedDatasetBuilder(str(tmp_paths[0]), dtype=dtype)
        compact_index_lists(builder)  # megatron's index lists -> typed arrays (recurdepth/compat/datasets.py)
        bar = _progress_bar(total_bytes, progress)
        chunks = _chunked(iter_records(files, text_docs, skip_bad_lines, stats), chunk_chars, chunk_docs)
        encoded = _encoded_chunks(chunks, tokenizer, text_key, dtype, max(1, int(workers)))
        last_postfix = 0.0
        for ids, lengths, bad, empty in encoded:
            for _, problem in bad:
                handle_bad_line(stats, skip_bad_lines, problem)
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
        check_indexed_dataset(str(tmp))
        final_paths[2].unlink(missing_ok=True)  # never a new .bin/.idx next to an old manifest
        commit_staged(zip(tmp_paths, final_paths))  # fsynced, renamed, folder fsynced
        committed = True
        write_atomically(final_paths[2], json.dumps(manifest, indent=1) + "\n")  # last: marks a complete dataset
    except BaseException:
        if builder is not None:
            builder.data_file.close()
        for p in tmp_paths + (final_paths[:2] if committed else []):  # no .bin/.idx without their manifest
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
        "kind": ("hf" if isinstance(tokenizer, HFTokenizer) else "sentencepiece" if path
                 else getattr(tokenizer, "unique_description", type(tokenizer).__name__)),
        "path": str(Path(path).resolve()) if path and Path(path).is_file() else path,
        "fingerprint": tokenizer.fingerprint(),
        "vocab_size": int(tokenizer.vocab_size),
        "special_ids": {k: int(v) for k, v in tokenizer.special_ids.items()},
    }
