"""A directory tree as data, so a test can assert that a refused command left it byte-identical."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_snapshot(root: Path) -> dict:
    """{relative path: sha256 of the file's bytes | 'dir' | 'link -> target'} for everything under `root`
    (`{}` when `root` does not exist; {'.': 'file <sha>'} when it is a regular file)."""
    root = Path(root)
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": "file " + hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link -> {path.readlink()}"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_unchanged(before: dict, root: Path) -> None:
    """`root` holds exactly what `before` recorded: no file added, removed or changed."""
    after = tree_snapshot(root)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"{root} changed: added {added}, removed {removed}, changed {changed}"
