"""The one way recurdepth writes a file that matters: complete or not at all, and still there after a crash.

`write_atomically(path, data)` writes `data` (str or bytes) to a temporary file next to `path`, fsyncs it,
renames it over `path` and fsyncs the directory, so a reader (or a run after a power loss) sees the old file
or the new one, never a torn one. `fsync_dir` is the last step alone, for callers that rename directories; `commit_staged` is the multi-file
form for files another writer produced under temporary names (megatron's .bin/.idx, sentencepiece's .model):
fsync each, rename them in order (the file marking the set complete last), fsync the folders.
Torch-free: the launcher, the exit records and the checkpoint manifests all use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

__all__ = ["commit_staged", "fsync_dir", "fsync_file", "write_atomically"]


def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Union[str, Path], data: Union[str, bytes], mode: int | None = None) -> Path:
    """Replace `path` by `data` atomically (tmp file, fsync, rename, fsync dir); returns `path`. `mode` sets the
    file's permission bits (default: the umask's)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def fsync_file(path: Union[str, Path]) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_staged(moves: Iterable[tuple[Union[str, Path], Union[str, Path]]]) -> None:
    """fsync each staged file, `os.replace` each `(staged, final)` in order, then fsync the final folders: after
    a crash a reader sees the old set, a partial set without its marker, or the new set, never a torn file."""
    moves = [(Path(src), Path(dst)) for src, dst in moves]
    for src, _ in moves:
        fsync_file(src)
    for src, dst in moves:
        os.replace(src, dst)
    for folder in dict.fromkeys(dst.parent for _, dst in moves):
        fsync_dir(folder)
