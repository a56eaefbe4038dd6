"""The offline quickstart corpus: docstrings harvested from the installed Python standard library.

It exists on every machine with Python, needs no download, and is real English technical prose. The
harvest is deterministic (sorted files, bounded size) and written once as a megatron-core indexed
dataset (.bin/.idx) under the cache directory (`data.cache_dir`, by default data/prepared/), keyed by
Python version, size and tokenizer.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from recurdepth.atomic import fsync_dir, write_atomically
from recurdepth.atomic import fsync_file
from recurdepth.data.tokenizer import ByteTokenizer


def stdlib_documents(max_bytes: int) -> Iterator[str]:
    """Module, class and function docstrings of the standard library, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo") for p in rel):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    yield doc
                    total += len(doc.encode("utf-8"))
                    if total >= max_bytes:
                        return


def prepare_builtin_corpus(cache_dir: str, max_mb: float, tokenizer: ByteTokenizer) -> str:
    """Write (once) the stdlib-docs corpus as an indexed dataset; returns its path prefix."""
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    key = hashlib.sha256(json.dumps([sys.version_info[:2], max_mb, tokenizer.fingerprint()]).encode()).hexdigest()[:12]
    final_dir = Path(cache_dir) / f"stdlib-docs-{key}"
    prefix = final_dir / "corpus"
    if (final_dir / "manifest.json").is_file():
        return str(prefix)
    tmp_dir = Path(cache_dir) / f".stdlib-docs-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    builder = IndexedDatasetBuilder(str(tmp_dir / "corpus.bin"), dtype=np.uint16)
    docs = tokens = 0
    for doc in stdlib_documents(int(max_mb * 1e6)):
        ids = tokenizer.tokenize(doc) + [tokenizer.eod]
        builder.add_document(np.asarray(ids, dtype=np.uint16), [len(ids)])
        docs, tokens = docs + 1, tokens + len(ids)
    builder.finalize(str(tmp_dir / "corpus.idx"))
    for name in ("corpus.bin", "corpus.idx"):
        fsync_file(tmp_dir / name)
    write_atomically(tmp_dir / "manifest.json", json.dumps(  # fsynced, with the staging folder
        {"source": "python stdlib docstrings", "documents": docs, "tokens": tokens,
         "tokenizer": tokenizer.fingerprint()}, indent=1))
    try:
        os.rename(tmp_dir, final_dir)  # atomic: a reader sees the whole corpus or none
    except OSError:  # another rank or process won the race
        shutil.rmtree(tmp_dir, ignore_errors=True)
    else:
        fsync_dir(final_dir.parent)  # the rename survives a crash
    return str(prefix)
