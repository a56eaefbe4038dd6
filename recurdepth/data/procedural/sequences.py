"""String and list tasks: `sort`, `copy`, `reverse`, `count` (over symbol sequences) and `anagram` (a
scrambled common English word, from `words.txt`)."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from recurdepth.data.procedural.base import (ANSWER, DIGITS, Sample, Task, change_digit, corrupt_tokens,
                                             match_prompt, require_at_least)
from recurdepth.errors import DataError


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
        require_at_least(self, d, "min_len")
        require_at_least(self, d, "max_value", minimum=0)

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        values = [rng.randint(0, d["max_value"]) for _ in range(rng.randint(d["min_len"], d["max_len"]))]
        out = sorted(values)
        steps = tuple(" ".join(map(str, out[:i])) for i in range(1, len(out)))
        return Sample(self.name, f"Sort these numbers in ascending order: {' '.join(map(str, values))}{ANSWER}",
                      " ".join(map(str, out)), steps)

    def solve(self, prompt):
        m = match_prompt(prompt, self._re)
        return " ".join(map(str, sorted(int(v) for v in m.group(1).split()))) if m else None

    def corrupt(self, sample, rng):
        tokens = sample.answer.split()
        if len(set(tokens)) > 1:
            return " ".join(corrupt_tokens(tokens, rng))
        i = rng.randrange(len(tokens))
        tokens[i] = change_digit(tokens[i], rng)
        return " ".join(tokens)


# ---------------------------------------------------------------------------------------------------------
class _SequenceTask(Task):
    default_difficulty = {"min_len": 3, "max_len": 10, "vocab": 26}
    difficulty_keys = {"min_len": "shortest sequence", "max_len": "longest sequence",
                       "vocab": f"number of distinct symbols (1-{len(DIGITS)}: a-z then 0-9)"}
    SYMBOLS = "abcdefghijklmnopqrstuvwxyz0123456789"
    verb = ""

    def check_difficulty(self, d):
        super().check_difficulty(d)
        require_at_least(self, d, "min_len", "vocab")
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
        m = match_prompt(prompt, self._re_compiled)
        return " ".join(self.transform(m.group(1).split())) if m else None

    def size(self, prompt):
        m = match_prompt(prompt, self._re_compiled)
        return len(m.group(1).split()) if m else None  # symbols

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
class CountTask(Task):
    name = "count"
    description = "count the occurrences of a symbol in a sequence"
    default_difficulty = {"min_len": 4, "max_len": 16, "vocab": 4}
    difficulty_keys = {"min_len": "shortest sequence", "max_len": "longest sequence",
                       "vocab": "distinct symbols (1-26, a..z)"}
    _re = re.compile(r"How many times does '([a-z])' occur in: ([a-z](?: [a-z])*)\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        require_at_least(self, d, "min_len", "vocab")
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
        m = match_prompt(prompt, self._re)
        return str(m.group(2).split().count(m.group(1))) if m else None

    def corrupt(self, sample, rng):
        return change_digit(sample.answer, rng)


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
        m = match_prompt(prompt, self._re)
        if not m:
            return None
        _, by_key, _ = word_list()
        found = by_key.get("".join(sorted(m.group(1))))
        return found[0] if found else None

    def verify(self, prompt, answer):
        m = match_prompt(prompt, self._re)
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
