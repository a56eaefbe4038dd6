"""The own procedural tasks. Every prompt is plain text ending in "\\nAnswer:"; every answer is a short
canonical string; every verifier parses the prompt and re-derives the answer (see `Task.verify`).

Difficulty knobs are listed in each task's `difficulty_keys`; `min_*`/`max_*` pairs are inclusive ranges,
so train and test splits can be drawn at different difficulties (e.g. short lists for train, long for test).
"""

from __future__ import annotations

import random
import re
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

from recurdepth.data.procedural.base import (DIGITS, Sample, Task, change_digit, corrupt_generic,
                                             corrupt_tokens)
from recurdepth.errors import DataError

ANSWER = "\nAnswer:"


def _body(prompt: str, pattern: re.Pattern) -> Optional[re.Match]:
    return pattern.fullmatch(prompt) if isinstance(prompt, str) else None


def _positive(task: Task, d: Mapping[str, Any], *keys: str, minimum: int = 1) -> None:
    for k in keys:
        if d[k] < minimum:
            raise DataError(f"difficulty {k}={d[k]} for task {task.name!r} must be >= {minimum}")


# ---------------------------------------------------------------------------------------------------------
class SortTask(Task):
    name = "sort"
    description = "sort a list of non-negative integers ascending"
    default_difficulty = {"min_len": 3, "max_len": 8, "max_value": 99}
    difficulty_keys = {"min_len": "shortest list", "max_len": "longest list",
                       "max_value": "largest value (values are 0..max_value)"}
    _re = re.compile(r"Sort these numbers in ascending order: (\d+(?: \d+)*)" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_len")
        _positive(self, d, "max_value", minimum=0)

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        values = [rng.randint(0, d["max_value"]) for _ in range(rng.randint(d["min_len"], d["max_len"]))]
        out = sorted(values)
        steps = tuple(" ".join(map(str, out[:i])) for i in range(1, len(out)))
        return Sample(self.name, f"Sort these numbers in ascending order: {' '.join(map(str, values))}{ANSWER}",
                      " ".join(map(str, out)), steps)

    def solve(self, prompt):
        m = _body(prompt, self._re)
        return " ".join(map(str, sorted(int(v) for v in m.group(1).split()))) if m else None

    def corrupt(self, sample, rng):
        tokens = sample.answer.split()
        if len(set(tokens)) > 1:
            return " ".join(corrupt_tokens(tokens, rng))
        i = rng.randrange(len(tokens))
        tokens[i] = change_digit(tokens[i], rng)
        return " ".join(tokens)


# ---------------------------------------------------------------------------------------------------------
WORDS_FILE = Path(__file__).with_name("words.txt")


@lru_cache(maxsize=1)
def word_list() -> tuple[frozenset, dict, dict]:
    """(all words, sorted-letters key -> words, length -> words whose letters no other word shares)."""
    try:
        words = [w.strip() for w in WORDS_FILE.read_text(encoding="utf-8").split()]
    except OSError as exc:
        raise DataError(f"anagram word list {WORDS_FILE} is missing ({exc}); regenerate it with "
                        f"python -m recurdepth.data.procedural.make_words") from exc
    words = [w for w in words if w.isalpha() and w.islower()]
    by_key: dict[str, list[str]] = {}
    for w in words:
        by_key.setdefault("".join(sorted(w)), []).append(w)
    unique_by_len: dict[int, list[str]] = {}
    for w in words:  # file order = frequency order, so generation is deterministic
        if len(by_key["".join(sorted(w))]) == 1 and len(set(w)) > 1:
            unique_by_len.setdefault(len(w), []).append(w)
    return frozenset(words), {k: tuple(v) for k, v in by_key.items()}, unique_by_len


class AnagramTask(Task):
    """Backtranslation of an anagram: the prompt scrambles a word, the answer is the word. Only words whose
    letters form no other listed word are generated (so the target is unique); the verifier accepts any
    listed word that is a permutation of the given letters."""

    name = "anagram"
    description = "unscramble a common English word"
    default_difficulty = {"min_len": 4, "max_len": 9}
    difficulty_keys = {"min_len": "shortest word (letters, >= 4)", "max_len": "longest word (letters, <= 9)"}
    _re = re.compile(r"Unscramble the letters '([a-z]+)' to form a common English word\." + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _, _, by_len = word_list()
        if not any(by_len.get(n) for n in range(d["min_len"], d["max_len"] + 1)):
            raise DataError(f"anagram: no words of {d['min_len']}-{d['max_len']} letters in the word list "
                            f"(lengths {min(by_len)}-{max(by_len)} exist)")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        _, _, by_len = word_list()
        pool = [n for n in range(d["min_len"], d["max_len"] + 1) if by_len.get(n)]
        word = rng.choice(by_len[rng.choice(pool)])
        letters = list(word)
        while "".join(letters) == word:
            rng.shuffle(letters)
        return Sample(self.name, f"Unscramble the letters '{''.join(letters)}' to form a common English word."
                                 f"{ANSWER}", word)

    def solve(self, prompt):
        m = _body(prompt, self._re)
        if not m:
            return None
        _, by_key, _ = word_list()
        found = by_key.get("".join(sorted(m.group(1))))
        return found[0] if found else None

    def verify(self, prompt, answer):
        m = _body(prompt, self._re)
        if not m or not isinstance(answer, str):
            return False
        words, _, _ = word_list()
        a = answer.strip().lower()
        return a in words and sorted(a) == sorted(m.group(1))

    def corrupt(self, sample, rng):
        w = list(sample.answer)
        pairs = [(i, j) for i in range(len(w)) for j in range(i + 1, len(w)) if w[i] != w[j]]
        i, j = rng.choice(pairs)
        w[i], w[j] = w[j], w[i]
        return "".join(w)


# ---------------------------------------------------------------------------------------------------------
def _rand_digits(rng: random.Random, digits: int) -> int:
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


class _TwoOperandTask(Task):
    """`What is a <symbol> b?` over random multi-digit operands; subclasses give the operation and its steps."""

    symbol = ""
    difficulty_keys = {"min_digits": "fewest digits of each operand", "max_digits": "most digits of each operand"}

    @staticmethod
    def apply(a: int, b: int) -> int:
        raise NotImplementedError

    def __init__(self):
        self._re = re.compile(rf"What is (\d+) {re.escape(self.symbol)} (\d+)\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_digits")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        a = _rand_digits(rng, rng.randint(d["min_digits"], d["max_digits"]))
        b = _rand_digits(rng, rng.randint(d["min_digits"], d["max_digits"]))
        return Sample(self.name, f"What is {a} {self.symbol} {b}?{ANSWER}", str(self.apply(a, b)), self.steps(a, b))

    def solve(self, prompt):
        m = _body(prompt, self._re)
        return str(self.apply(int(m.group(1)), int(m.group(2)))) if m else None

    def corrupt(self, sample, rng):
        return change_digit(sample.answer, rng)


class AdditionTask(_TwoOperandTask):
    name = "addition"
    description = "add two multi-digit non-negative integers"
    default_difficulty = {"min_digits": 1, "max_digits": 5}
    symbol = "+"
    apply = staticmethod(lambda a, b: a + b)

    @staticmethod
    def steps(a: int, b: int) -> tuple[str, ...]:
        """Column-wise from the right: 'x+y+carry=s' and the digits of the sum written so far."""
        sa, sb = str(a)[::-1], str(b)[::-1]
        carry, written, out = 0, "", []
        for i in range(max(len(sa), len(sb))):
            x = int(sa[i]) if i < len(sa) else 0
            y = int(sb[i]) if i < len(sb) else 0
            s = x + y + carry
            written = str(s % 10) + written
            out.append(f"{x}+{y}+{carry}={s}, write {written}")
            carry = s // 10
        if carry:
            out.append(f"carry {carry}, write {carry}{written}")
        return tuple(out)


class MultiplicationTask(_TwoOperandTask):
    name = "multiplication"
    description = "multiply two multi-digit non-negative integers"
    default_difficulty = {"min_digits": 1, "max_digits": 3}
    symbol = "*"
    apply = staticmethod(lambda a, b: a * b)

    @staticmethod
    def steps(a: int, b: int) -> tuple[str, ...]:
        """One partial product per digit of b (right to left) with the running total."""
        out, total = [], 0
        for i, ch in enumerate(reversed(str(b))):
            part = a * int(ch) * 10 ** i
            total += part
            out.append(f"{a}*{int(ch) * 10 ** i}={part}, total {total}")
        return tuple(out)


# ---------------------------------------------------------------------------------------------------------
class ParityTask(Task):
    name = "parity"
    description = "is the number of 1s in a bit string even or odd"
    default_difficulty = {"min_len": 4, "max_len": 16}
    difficulty_keys = {"min_len": "shortest bit string", "max_len": "longest bit string"}
    _re = re.compile(r"Is the number of 1s in ([01]+) even or odd\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_len")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        n = rng.randint(d["min_len"], d["max_len"])
        bits = format(rng.getrandbits(n), f"0{n}b")
        steps, p = [], 0
        for ch in bits:
            p ^= ch == "1"
            steps.append("odd" if p else "even")
        return Sample(self.name, f"Is the number of 1s in {bits} even or odd?{ANSWER}", steps[-1], tuple(steps))

    def normalize(self, answer):
        return answer.strip().lower()

    def solve(self, prompt):
        m = _body(prompt, self._re)
        return ("odd" if m.group(1).count("1") % 2 else "even") if m else None

    def corrupt(self, sample, rng):
        return "even" if sample.answer == "odd" else "odd"


# ---------------------------------------------------------------------------------------------------------
class _SequenceTask(Task):
    default_difficulty = {"min_len": 3, "max_len": 10, "vocab": 26}
    difficulty_keys = {"min_len": "shortest sequence", "max_len": "longest sequence",
                       "vocab": f"number of distinct symbols (1-{len(DIGITS)}: a-z then 0-9)"}
    SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789"
    verb = ""

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_len", "vocab")
        if d["vocab"] > len(self.SYMBOLS):
            raise DataError(f"difficulty vocab={d['vocab']} for task {self.name!r} must be <= {len(self.SYMBOLS)}")

    def transform(self, seq: list[str]) -> list[str]:
        raise NotImplementedError

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        symbols = self.SYMBOLS[:d["vocab"]]
        seq = [rng.choice(symbols) for _ in range(rng.randint(d["min_len"], d["max_len"]))]
        out = self.transform(seq)
        return Sample(self.name, f"{self.verb}: {' '.join(seq)}{ANSWER}", " ".join(out), self.steps(seq))

    def steps(self, seq):
        return ()

    def solve(self, prompt):
        m = _body(prompt, self._re_compiled)
        return " ".join(self.transform(m.group(1).split())) if m else None

    def corrupt(self, sample, rng):
        return " ".join(corrupt_tokens(sample.answer.split(), rng, self.SYMBOLS))


class CopyTask(_SequenceTask):
    name = "copy"
    description = "copy a sequence of symbols"
    verb = "Copy this sequence exactly"
    _re_compiled = re.compile(re.escape(verb) + r": ([a-z0-9](?: [a-z0-9])*)" + ANSWER)

    def transform(self, seq):
        return list(seq)


class ReverseTask(_SequenceTask):
    name = "reverse"
    description = "reverse a sequence of symbols"
    verb = "Reverse this sequence"
    _re_compiled = re.compile(re.escape(verb) + r": ([a-z0-9](?: [a-z0-9])*)" + ANSWER)

    def transform(self, seq):
        return seq[::-1]

    def steps(self, seq):
        rev = seq[::-1]
        return tuple(" ".join(rev[:i]) for i in range(1, len(rev)))


# ---------------------------------------------------------------------------------------------------------
BRACKETS = ("()", "[]", "{}", "<>")
_CLOSE_TO_OPEN = {b[1]: b[0] for b in BRACKETS}
_OPENERS = {b[0] for b in BRACKETS}


def bracket_trace(tokens: list[str]) -> tuple[bool, list[str]]:
    """(balanced?, stack after each token; stops with 'mismatch at i' on the first error)."""
    stack, trace = [], []
    for i, t in enumerate(tokens):
        if t in _OPENERS:
            stack.append(t)
        elif stack and stack[-1] == _CLOSE_TO_OPEN[t]:
            stack.pop()
        else:
            trace.append(f"mismatch at {i + 1}")
            return False, trace
        trace.append(" ".join(stack) if stack else "empty")
    if stack:
        trace.append("unclosed " + " ".join(stack))
    return not stack, trace


class BracketsTask(Task):
    name = "brackets"
    description = "is a bracket sequence balanced (yes/no)"
    default_difficulty = {"min_len": 2, "max_len": 12, "types": 3, "p_balanced": 0.5}
    difficulty_keys = {"min_len": "shortest sequence (even lengths only, so parity gives nothing away)",
                       "max_len": "longest sequence", "types": "bracket kinds used, 1-4: () [] {} <>",
                       "p_balanced": "probability that a sample is balanced"}
    _re = re.compile(r"Is this bracket sequence balanced\? ([()\[\]{}<>](?: [()\[\]{}<>])*)" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_len")
        if not 1 <= d["types"] <= 4:
            raise DataError(f"difficulty types={d['types']} for task 'brackets' must be 1-4")
        if not 0.0 <= d["p_balanced"] <= 1.0:
            raise DataError(f"difficulty p_balanced={d['p_balanced']} for task 'brackets' must be in [0, 1]")
        if max(2, d["min_len"] + d["min_len"] % 2) > d["max_len"] - d["max_len"] % 2:
            raise DataError(f"task 'brackets' needs an even length in [{d['min_len']}, {d['max_len']}]")

    @staticmethod
    def _balanced(rng: random.Random, n: int, kinds: tuple[str, ...]) -> list[str]:
        out, stack = [], []
        while len(out) < n:
            remaining = n - len(out)
            if stack and (remaining == len(stack) or rng.random() < 0.5):
                out.append(stack.pop())
            else:
                pair = rng.choice(kinds)
                out.append(pair[0])
                stack.append(pair[1])
        return out

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        kinds = BRACKETS[:d["types"]]
        lo, hi = max(2, d["min_len"] + d["min_len"] % 2), d["max_len"] - d["max_len"] % 2
        n = 2 * rng.randint(lo // 2, hi // 2)
        seq = self._balanced(rng, n, kinds)
        if rng.random() >= d["p_balanced"]:
            symbols = "".join(kinds)
            while bracket_trace(seq)[0]:
                mode = rng.randrange(3)
                if mode == 0:      # change one bracket into another symbol
                    i = rng.randrange(n)
                    seq[i] = rng.choice([s for s in symbols if s != seq[i]])
                elif mode == 1:    # swap two different symbols
                    i, j = rng.randrange(n), rng.randrange(n)
                    seq[i], seq[j] = seq[j], seq[i]
                else:              # a random sequence
                    seq = [rng.choice(symbols) for _ in range(n)]
        ok, trace = bracket_trace(seq)
        return Sample(self.name, f"Is this bracket sequence balanced? {' '.join(seq)}{ANSWER}",
                      "yes" if ok else "no", tuple(trace))

    def normalize(self, answer):
        return answer.strip().lower()

    def solve(self, prompt):
        m = _body(prompt, self._re)
        return ("yes" if bracket_trace(m.group(1).split())[0] else "no") if m else None

    def corrupt(self, sample, rng):
        return "no" if sample.answer == "yes" else "yes"


# ---------------------------------------------------------------------------------------------------------
class ModularTask(Task):
    """(a op b op c ...) mod m with + - * and the usual precedence; the answer is the residue in [0, m)."""

    name = "modular"
    description = "evaluate an integer expression modulo m"
    default_difficulty = {"min_terms": 2, "max_terms": 4, "min_modulus": 2, "max_modulus": 23, "max_value": 50}
    difficulty_keys = {"min_terms": "fewest operands", "max_terms": "most operands",
                       "min_modulus": "smallest modulus", "max_modulus": "largest modulus",
                       "max_value": "largest operand (operands are 0..max_value)"}
    _re = re.compile(r"What is \((\d+(?: [-+*] \d+)*)\) mod (\d+)\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_terms")
        _positive(self, d, "min_modulus", minimum=2)
        _positive(self, d, "max_value", minimum=0)

    @staticmethod
    def evaluate(tokens: list[str], m: int) -> tuple[int, tuple[str, ...]]:
        """Value mod m of `n op n op n ...` (* binds tighter), with the steps: each product, then the
        running sum, reduced mod m."""
        groups: list[tuple[int, list[int]]] = [(1, [int(tokens[0])])]
        for op, num in zip(tokens[1::2], tokens[2::2]):
            if op == "*":
                groups[-1][1].append(int(num))
            else:
                groups.append((1 if op == "+" else -1, [int(num)]))
        steps, acc = [], 0
        for i, (sign, factors) in enumerate(groups):
            raw = 1
            for f in factors:
                raw *= f
            value = raw % m
            if len(factors) > 1 or raw >= m:
                product = "*".join(map(str, factors)) + "=" if len(factors) > 1 else ""
                steps.append(f"{product}{raw}={value} mod {m}")
            if i == 0:
                acc = value
            else:
                new = (acc + sign * value) % m
                steps.append(f"{acc}{'+' if sign > 0 else '-'}{value}={acc + sign * value}={new} mod {m}")
                acc = new
        return acc, tuple(steps)

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        m = rng.randint(d["min_modulus"], d["max_modulus"])
        tokens = [str(rng.randint(0, d["max_value"]))]
        for _ in range(rng.randint(d["min_terms"], d["max_terms"]) - 1):
            tokens += [rng.choice("+-*"), str(rng.randint(0, d["max_value"]))]
        value, steps = self.evaluate(tokens, m)
        return Sample(self.name, f"What is ({' '.join(tokens)}) mod {m}?{ANSWER}", str(value), steps)

    def solve(self, prompt):
        m = _body(prompt, self._re)
        if not m or int(m.group(2)) < 1:
            return None
        return str(self.evaluate(m.group(1).split(), int(m.group(2)))[0])

    def corrupt(self, sample, rng):
        return change_digit(sample.answer, rng)


# ---------------------------------------------------------------------------------------------------------
def bfs_path(n: int, edges: list[tuple[int, int]], src: int, dst: int) -> Optional[list[int]]:
    """A shortest path src..dst in the undirected graph (lowest-numbered neighbours first), or None."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    parent = {src: src}
    queue = deque([src])
    while queue:
        u = queue.popleft()
        if u == dst:
            path = [u]
            while path[-1] != src:
                path.append(parent[path[-1]])
            return path[::-1]
        for v in sorted(adj[u]):
            if v not in parent:
                parent[v] = u
                queue.append(v)
    return None


class ShortestPathTask(Task):
    name = "shortest_path"
    description = "shortest path length in a small undirected graph, or 'unreachable'"
    default_difficulty = {"min_nodes": 5, "max_nodes": 10, "edge_ratio": 1.0}
    difficulty_keys = {"min_nodes": "fewest nodes", "max_nodes": "most nodes",
                       "edge_ratio": "edges per node (edges = round(ratio * nodes), capped at a complete graph)"}
    _re = re.compile(r"An undirected graph has nodes 0 to (\d+) and edges: ((?:\d+-\d+(?:, \d+-\d+)*)?)\. "
                     r"What is the length of the shortest path from node (\d+) to node (\d+)\? "
                     r"Answer 'unreachable' if there is no path\." + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_nodes", minimum=2)
        if d["edge_ratio"] < 0:
            raise DataError(f"difficulty edge_ratio={d['edge_ratio']} for task 'shortest_path' must be >= 0")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        n = rng.randint(d["min_nodes"], d["max_nodes"])
        n_edges = min(n * (n - 1) // 2, round(d["edge_ratio"] * n))
        edges: set[tuple[int, int]] = set()
        while len(edges) < n_edges:
            u, v = rng.sample(range(n), 2)
            edges.add((min(u, v), max(u, v)))
        edge_list = sorted(edges)
        rng.shuffle(edge_list)
        src, dst = rng.sample(range(n), 2)
        path = bfs_path(n, edge_list, src, dst)
        text = ", ".join(f"{u}-{v}" for u, v in edge_list)
        prompt = (f"An undirected graph has nodes 0 to {n - 1} and edges: {text}. What is the length of the "
                  f"shortest path from node {src} to node {dst}? Answer 'unreachable' if there is no path.{ANSWER}")
        if path is None:
            return Sample(self.name, prompt, "unreachable", (f"no path from {src}",))
        return Sample(self.name, prompt, str(len(path) - 1), tuple(map(str, path)))

    def normalize(self, answer):
        return answer.strip().lower()

    def solve(self, prompt):
        m = _body(prompt, self._re)
        if not m:
            return None
        n = int(m.group(1)) + 1
        edges = [tuple(map(int, e.split("-"))) for e in m.group(2).split(", ")] if m.group(2) else []
        src, dst = int(m.group(3)), int(m.group(4))
        if any(not (0 <= x < n) for e in edges for x in e) or not (0 <= src < n and 0 <= dst < n):
            return None
        path = bfs_path(n, edges, src, dst)
        return "unreachable" if path is None else str(len(path) - 1)

    def corrupt(self, sample, rng):
        if sample.answer == "unreachable":
            return str(rng.randint(1, 9))
        return change_digit(sample.answer, rng) if rng.random() < 0.8 else "unreachable"


# ---------------------------------------------------------------------------------------------------------
_VARS = "abcdef"
_STMT = re.compile(r"([a-f]) = ([a-f]|\d+)(?: ([-+*]) ([a-f]|\d+))?")
_LOOP = re.compile(r"repeat (\d+) times: (.+)")


def _exec_stmt(stmt: str, env: dict) -> bool:
    m = _STMT.fullmatch(stmt)
    if not m:
        return False
    target, x, op, y = m.groups()
    if (x.isalpha() and x not in env) or (y is not None and y.isalpha() and y not in env):
        return False
    vx = env[x] if x.isalpha() else int(x)
    if op is None:
        env[target] = vx
    else:
        vy = env[y] if y.isalpha() else int(y)
        env[target] = vx + vy if op == "+" else vx - vy if op == "-" else vx * vy
    return True


def run_program(lines: list[str], max_repeat: int = 100) -> Optional[tuple[dict, list[str]]]:
    """Execute the tiny language (assignments, single-line `repeat N times: s1; s2` loops); returns the
    final variables and the state after each line, or None if a line does not parse."""
    env: dict[str, int] = {}
    trace = []
    for line in lines:
        loop = _LOOP.fullmatch(line)
        if loop:
            times = int(loop.group(1))
            if times > max_repeat:
                return None
            body = loop.group(2).split("; ")
            for _ in range(times):
                for stmt in body:
                    if not _exec_stmt(stmt, env):
                        return None
        elif not _exec_stmt(line, env):
            return None
        trace.append(" ".join(f"{k}={env[k]}" for k in sorted(env)))
    return env, trace


class ProgramTraceTask(Task):
    name = "program_trace"
    description = "final value of a variable after a tiny program (assignments and short loops)"
    default_difficulty = {"min_len": 3, "max_len": 8, "num_vars": 3, "max_const": 9, "loop_prob": 0.2,
                          "max_repeat": 3, "max_abs": 999}
    difficulty_keys = {"min_len": "fewest statements after the initial assignments",
                       "max_len": "most statements after the initial assignments",
                       "num_vars": "variables (1-6, named a..f)", "max_const": "largest constant",
                       "loop_prob": "probability that a statement is a `repeat N times:` loop",
                       "max_repeat": "most loop iterations", "max_abs": "bound on every intermediate |value|"}
    _re = re.compile(r"Run this program:\n((?:[^\n]+\n)+)What is the final value of ([a-f])\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_len", minimum=0)
        _positive(self, d, "max_const", "max_abs")
        _positive(self, d, "max_repeat", minimum=2)
        if not 1 <= d["num_vars"] <= len(_VARS):
            raise DataError(f"difficulty num_vars={d['num_vars']} for task 'program_trace' must be 1-6")
        if d["max_const"] > d["max_abs"]:
            raise DataError("task 'program_trace': max_const must be <= max_abs")

    @staticmethod
    def _stmt(rng: random.Random, names: str, d: dict) -> str:
        target = rng.choice(names)
        kind = rng.random()
        if kind < 0.15:
            return f"{target} = {rng.randint(0, d['max_const'])}"
        x = rng.choice(names)
        op = rng.choice("+-*") if kind < 0.85 else rng.choice("+-")
        y = str(rng.randint(1, 3)) if op == "*" else (rng.choice(names) if rng.random() < 0.6
                                                       else str(rng.randint(1, d["max_const"])))
        return f"{target} = {x} {op} {y}"

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        names = _VARS[:d["num_vars"]]
        lines = [f"{v} = {rng.randint(0, d['max_const'])}" for v in names]
        env = {v: int(line.split(" = ")[1]) for v, line in zip(names, lines)}
        bound = d["max_abs"]
        for _ in range(rng.randint(d["min_len"], d["max_len"])):
            for _attempt in range(20):
                if rng.random() < d["loop_prob"]:
                    body = [self._stmt(rng, names, d) for _ in range(rng.randint(1, 2))]
                    line = f"repeat {rng.randint(2, d['max_repeat'])} times: {'; '.join(body)}"
                else:
                    line = self._stmt(rng, names, d)
                trial = dict(env)
                if self._within(line, trial, bound):
                    env = trial
                    break
            else:  # nothing fitted the bound: a constant assignment always does
                line = f"{rng.choice(names)} = {rng.randint(0, d['max_const'])}"
                self._within(line, env, bound)
            lines.append(line)
        query = rng.choice(names)
        _, trace = run_program(lines)
        prompt = "Run this program:\n" + "".join(line + "\n" for line in lines) + \
                 f"What is the final value of {query}?{ANSWER}"
        return Sample(self.name, prompt, str(env[query]), tuple(trace))

    @staticmethod
    def _within(line: str, env: dict, bound: int) -> bool:
        loop = _LOOP.fullmatch(line)
        body, times = (loop.group(2).split("; "), int(loop.group(1))) if loop else ([line], 1)
        for _ in range(times):
            for stmt in body:
                _exec_stmt(stmt, env)
                if any(abs(v) > bound for v in env.values()):
                    return False
        return True

    def solve(self, prompt):
        m = _body(prompt, self._re)
        if not m:
            return None
        result = run_program(m.group(1).rstrip("\n").split("\n"))
        if result is None or m.group(2) not in result[0]:
            return None
        return str(result[0][m.group(2)])

    def corrupt(self, sample, rng):
        return change_digit(sample.answer, rng)


# ---------------------------------------------------------------------------------------------------------
def to_base(value: int, base: int) -> str:
    if value == 0:
        return "0"
    out = []
    while value:
        value, r = divmod(value, base)
        out.append(DIGITS[r])
    return "".join(reversed(out))


class BaseConversionTask(Task):
    name = "base_conversion"
    description = "write a decimal number in another base (digits 0-9 then a-z)"
    default_difficulty = {"min_value": 0, "max_value": 1000, "min_base": 2, "max_base": 16}
    difficulty_keys = {"min_value": "smallest number", "max_value": "largest number",
                       "min_base": "smallest target base (>= 2)", "max_base": "largest target base (<= 36)"}
    _re = re.compile(r"Convert the decimal number (\d+) to base (\d+)\." + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_value", minimum=0)
        _positive(self, d, "min_base", minimum=2)
        if d["max_base"] > 36:
            raise DataError(f"difficulty max_base={d['max_base']} for task 'base_conversion' must be <= 36")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        value = rng.randint(d["min_value"], d["max_value"])
        bases = [b for b in range(d["min_base"], d["max_base"] + 1) if b != 10] or [10]  # base 10 = a copy
        base = rng.choice(bases)
        steps, v = [], value
        while True:
            q, r = divmod(v, base)
            steps.append(f"{v}={q}*{base}+{r}")
            v = q
            if not v:
                break
        return Sample(self.name, f"Convert the decimal number {value} to base {base}.{ANSWER}",
                      to_base(value, base), tuple(steps))

    def normalize(self, answer):
        return answer.strip().lower()

    def solve(self, prompt):
        m = _body(prompt, self._re)
        if not m or not 2 <= int(m.group(2)) <= 36:
            return None
        return to_base(int(m.group(1)), int(m.group(2)))

    def corrupt(self, sample, rng):
        base = int(self._re.fullmatch(sample.prompt).group(2))
        return change_digit(sample.answer, rng, base)


# ---------------------------------------------------------------------------------------------------------
class CountTask(Task):
    name = "count"
    description = "count the occurrences of a symbol in a sequence"
    default_difficulty = {"min_len": 4, "max_len": 16, "vocab": 4}
    difficulty_keys = {"min_len": "shortest sequence", "max_len": "longest sequence",
                       "vocab": "distinct symbols (1-26, a..z)"}
    _re = re.compile(r"How many times does '([a-z])' occur in: ([a-z](?: [a-z])*)\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        _positive(self, d, "min_len", "vocab")
        if d["vocab"] > 26:
            raise DataError(f"difficulty vocab={d['vocab']} for task 'count' must be <= 26")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        symbols = "abcdefghijklmnopqrstuvwxyz"[:d["vocab"]]
        seq = [rng.choice(symbols) for _ in range(rng.randint(d["min_len"], d["max_len"]))]
        target = rng.choice(symbols)
        steps, c = [], 0
        for s in seq:
            c += s == target
            steps.append(str(c))
        return Sample(self.name, f"How many times does '{target}' occur in: {' '.join(seq)}?{ANSWER}",
                      str(c), tuple(steps))

    def solve(self, prompt):
        m = _body(prompt, self._re)
        return str(m.group(2).split().count(m.group(1))) if m else None

    def corrupt(self, sample, rng):
        return change_digit(sample.answer, rng)


OWN_TASKS: tuple[Task, ...] = (SortTask(), AnagramTask(), AdditionTask(), MultiplicationTask(), ParityTask(),
                               CopyTask(), ReverseTask(), BracketsTask(), ModularTask(), ShortestPathTask(),
                               ProgramTraceTask(), BaseConversionTask(), CountTask())
