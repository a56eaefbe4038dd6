"""Offline generator of `words.txt`, the anagram task's word list (run once; the output is shipped).

    python -m recurdepth.data.procedural.make_words > recurdepth/data/procedural/words.txt

Words are taken from the prose of the installed Python standard library (docstrings and comments),
lowercase alphabetic, 4-9 letters, seen in at least 3 files, ranked by frequency. Words used in code far
more than in prose (identifiers such as `kwargs`, `stdout`, `environ`), builtins, keywords, stdlib module
names and a few hand-picked jargon words are dropped. The list depends on the Python version it was built
with, which is why it is generated offline and shipped rather than built at run time.
"""

from __future__ import annotations

import ast
import builtins
import collections
import io
import keyword
import re
import sys
import sysconfig
import tokenize
from pathlib import Path

MAX_WORDS = 3000
_WORD = re.compile(r"(?<![\w.'`_-])[a-z]+(?![\w'`_(-]|\.\w)")
_SKIP_DIRS = ("test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo")
_JARGON = {"libc", "epoll", "kqueue", "fredrik", "lundh", "cpython", "unicode", "utf", "ascii", "posix",
           "tuple", "tuples", "stdin", "stderr", "stdout", "mutex", "regexp", "fileno", "getattr", "setattr",
           "kwargs", "args", "repr", "sqlite", "mmap", "iterable", "iterables", "dict", "dicts", "bool",
           "codec", "codecs", "readline", "submodule", "tzinfo", "noqa", "todo", "xxx", "http", "https",
           "html", "xml", "json", "eintr", "errno", "sizeof", "mixin", "mixins", "pathname", "pathnames"}


def _files(root: Path):
    for path in sorted(root.rglob("*.py")):
        if any(p in _SKIP_DIRS for p in path.relative_to(root).parts):
            continue
        try:
            src = path.read_text(encoding="utf-8")
            yield path, src, ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue


def build_words(max_words: int = MAX_WORDS) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    prose = collections.Counter()
    code = collections.Counter()
    seen_in = collections.defaultdict(set)
    for path, src, tree in _files(root):
        texts = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
            if isinstance(node, ast.Name):
                code[node.id] += 1
            elif isinstance(node, ast.Attribute):
                code[node.attr] += 1
            elif isinstance(node, ast.arg):
                code[node.arg] += 1
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                code[node.name] += 1
        try:
            texts += [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                      if t.type == tokenize.COMMENT]
        except (tokenize.TokenError, SyntaxError):
            pass
        for text in texts:
            for w in _WORD.findall(text):
                prose[w] += 1
                seen_in[w].add(path)
    banned = set(dir(builtins)) | set(keyword.kwlist) | set(sys.stdlib_module_names) | _JARGON
    words = [w for w, n in prose.most_common()
             if 4 <= len(w) <= 9 and len(seen_in[w]) >= 3 and re.search("[aeiouy]", w)
             and w not in banned and code[w] <= 4 * n]
    return words[:max_words]


if __name__ == "__main__":
    sys.stdout.write("\n".join(build_words()) + "\n")
