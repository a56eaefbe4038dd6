"""Reading a text corpus: JSONL files (one JSON object per line, the document in a text field), plain-text files
(by default one document per blank-line-separated paragraph) or folders of them, streamed one document at a
time. `recurdepth data preprocess` (preprocess.py) and `recurdepth data tokenizer` (tokenizer_train.py) read
their inputs with it. Bad input (a missing path, a malformed line, an empty corpus) is a one-line DataError
naming the file and line, or with `skip_bad_lines` a counted skip.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from recurdepth.errors import DataError

__all__ = ["FOLDER_SUFFIXES", "JSONL_SUFFIXES", "TEXT_DOCS", "PathLike", "ReadStats", "empty_corpus_error",
           "handle_bad_line", "iter_documents", "iter_records", "parse_jsonl_line", "resolve_inputs"]

PathLike = Union[str, Path]

TEXT_DOCS = ("paragraph", "line", "file")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # an explicitly named file with one of these is JSONL
FOLDER_SUFFIXES = (".jsonl", ".ndjson", ".txt", ".text")  # files picked up when a folder is given
_MAX_EXAMPLES = 5


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
                handle_bad_line(stats, skip_bad_lines, problem)
                continue
        else:
            text = payload
        if not text:
            stats.empty_documents += 1
            continue
        stats.documents += 1
        yield path, no, text


def handle_bad_line(stats: ReadStats, skip: bool, message: str) -> None:
    """A malformed input line: the one-line DataError `message` (with the fix), or with `skip` counted in `stats`
    (the first few messages kept as examples)."""
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
            handle_bad_line(stats, skip, f"text line {path}:{no} is not valid UTF-8 (byte {exc.start + 1})")
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
