"""Putting a set of staged data files into place durably: the multi-file counterpart of
`recurdepth.atomic.write_atomically` for files another writer produced (megatron's `IndexedDatasetBuilder`
writes a .bin and an .idx, sentencepiece a .model) under temporary names next to their final ones.

`commit_staged` fsyncs every staged file, renames them in the given order (callers put the file that marks the
set complete last) and fsyncs the folders, so after a crash a reader sees the old set, a partial set without
its marker, or the new set, never a torn file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

from recurdepth.atomic import fsync_dir

__all__ = ["commit_staged", "fsync_file"]

PathLike = Union[str, Path]


def fsync_file(path: PathLike) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_staged(moves: Iterable[tuple[PathLike, PathLike]]) -> None:
    """fsync each staged file, `os.replace` each `(staged, final)` in order, then fsync the final folders."""
    moves = [(Path(src), Path(dst)) for src, dst in moves]
    for src, _ in moves:
        fsync_file(src)
    for src, dst in moves:
        os.replace(src, dst)
    for folder in dict.fromkeys(dst.parent for _, dst in moves):
        fsync_dir(folder)
