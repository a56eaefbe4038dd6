"""Samples and the task interface of the procedural generators.

A task generates `Sample`s (prompt, answer, optional step-by-step solution) from a `random.Random` and a
difficulty dict, and verifies an answer by re-deriving the correct one from the prompt text alone: the
verifier never sees the stored answer, so a generator bug that writes a wrong answer is caught.
"""

from __future__ import annotations

import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from recurdepth.errors import DataError


@dataclass(frozen=True)
class Sample:
    """One generated example. `steps` is a step-by-step solution (short strings, e.g. partial sums), used by
    continuous-thought curricula; `meta` is a JSON string kept only by reasoning-gym samples, whose scorer
    needs the original entry."""

    task: str
    prompt: str
    answer: str
    steps: tuple[str, ...] = ()
    meta: Optional[str] = None


class Task(ABC):
    """A procedural task. Subclasses set `name`, `default_difficulty` and `difficulty_keys` (key -> what it
    controls) and implement `generate` and `solve`; `verify` compares an answer with `solve(prompt)`."""

    name: str = ""
    description: str = ""
    default_difficulty: Mapping[str, Any] = {}
    difficulty_keys: Mapping[str, str] = {}

    # ---- difficulty -------------------------------------------------------------------------------------
    def resolve(self, difficulty: Optional[Mapping[str, Any]] = None) -> dict:
        """`default_difficulty` updated with `difficulty`; unknown keys or impossible values -> DataError."""
        if not difficulty:
            return dict(self.default_difficulty)
        unknown = sorted(set(difficulty) - set(self.default_difficulty))
        if unknown:
            raise DataError(f"unknown difficulty key(s) {', '.join(map(repr, unknown))} for task {self.name!r} "
                            f"(known: {', '.join(sorted(self.default_difficulty))})")
        d = dict(self.default_difficulty)
        d.update(difficulty)
        self.check_difficulty(d)
        return d

    def check_difficulty(self, d: dict) -> None:
        """Validate a full difficulty dict: every `min_X`/`max_X` pair ordered, integer knobs integers."""
        for key, value in d.items():
            default = self.default_difficulty[key]
            if isinstance(default, int) and not isinstance(default, bool):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise DataError(f"difficulty {key}={value!r} for task {self.name!r} must be an integer")
            elif isinstance(default, float) and not isinstance(value, (int, float)):
                raise DataError(f"difficulty {key}={value!r} for task {self.name!r} must be a number")
        for key, value in d.items():
            if key.startswith("min_") and ("max_" + key[4:]) in d and value > d["max_" + key[4:]]:
                raise DataError(f"difficulty {key}={value} > max_{key[4:]}={d['max_' + key[4:]]} "
                                f"for task {self.name!r}")

    # ---- the interface ----------------------------------------------------------------------------------
    @abstractmethod
    def generate(self, rng: random.Random, difficulty: Optional[Mapping[str, Any]] = None) -> Sample:
        """One sample drawn with `rng` (deterministic given its state) at `difficulty` (merged with defaults)."""

    @abstractmethod
    def solve(self, prompt: str) -> Optional[str]:
        """The canonical answer re-derived from the prompt text alone; None if the prompt is malformed."""

    def size(self, prompt: str) -> Optional[int]:
        """The problem's size as its prompt states it (bits, digits, hops, list length: what its sequential work
        grows with), for per-sample depth (objective.kind=depth_by_size); None when the task has none or the
        prompt is not the task's."""
        return None

    def normalize(self, answer: str) -> str:
        """Answer normalisation before comparison (default: surrounding and repeated whitespace)."""
        return " ".join(answer.split())

    def verify(self, prompt: str, answer: str) -> bool:
        if not isinstance(answer, str):
            return False
        try:
            expected = self.solve(prompt)
        except (ValueError, KeyError, IndexError, ZeroDivisionError, OverflowError):
            return False
        return expected is not None and self.normalize(answer) == expected

    def eval_difficulty(self, difficulty: dict) -> dict:
        """The difficulty `recurdepth eval` scores by default for a task trained at `difficulty` (then also made
        harder); a task whose training samples bundle several questions asks one per prompt here."""
        return difficulty

    def corrupt(self, sample: Sample, rng: random.Random) -> str:
        """A wrong answer close to the right one (for tests of the verifier)."""
        return corrupt_generic(sample.answer, rng)

    def __repr__(self) -> str:
        return f"<task {self.name} {dict(self.default_difficulty)}>"


# ---- helpers shared by tasks and corruption ------------------------------------------------------------
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
ANSWER = "\nAnswer:"  # every own task's prompt ends with it


def match_prompt(prompt: str, pattern: re.Pattern) -> Optional[re.Match]:
    """`pattern` matched against the whole prompt; None for a non-string or a prompt of another shape."""
    return pattern.fullmatch(prompt) if isinstance(prompt, str) else None


def require_at_least(task: Task, d: Mapping[str, Any], *keys: str, minimum: int = 1) -> None:
    """DataError unless every difficulty value `d[key]` of `keys` is >= `minimum`."""
    for k in keys:
        if d[k] < minimum:
            raise DataError(f"difficulty {k}={d[k]} for task {task.name!r} must be >= {minimum}")


def change_digit(number: str, rng: random.Random, base: int = 10) -> str:
    """`number` (optionally signed, digits in `base`) with one digit changed; never adds a leading zero,
    so the result is a different integer."""
    sign, body = ("-", number[1:]) if number.startswith("-") else ("", number)
    alphabet = DIGITS[:base]
    choices = []
    for i, ch in enumerate(body):
        allowed = [d for d in alphabet if d != ch and not (i == 0 and len(body) > 1 and d == "0")]
        if allowed:
            choices.append((i, allowed))
    i, allowed = rng.choice(choices)
    return sign + body[:i] + rng.choice(allowed) + body[i + 1:]


def corrupt_tokens(tokens: Sequence[str], rng: random.Random, replacement: Sequence[str] = DIGITS) -> list[str]:
    """Swap two unequal tokens if there are any, else replace one token with a different one."""
    tokens = list(tokens)
    pairs = [(i, j) for i in range(len(tokens)) for j in range(i + 1, len(tokens)) if tokens[i] != tokens[j]]
    if pairs:
        i, j = rng.choice(pairs)
        tokens[i], tokens[j] = tokens[j], tokens[i]
    elif tokens:
        i = rng.randrange(len(tokens))
        tokens[i] = rng.choice([r for r in replacement if r != tokens[i]])
    else:
        tokens = ["0"]
    return tokens


_FLIPS = {"yes": "no", "no": "yes", "even": "odd", "odd": "even", "true": "false", "false": "true"}


def corrupt_generic(answer: str, rng: random.Random) -> str:
    """A deterministic wrong answer for any answer string: flip yes/no-style words, change a digit of an
    integer, swap two unequal tokens of a list (comma or space separated), else alter one character."""
    a = answer.strip()
    if a.lower() in _FLIPS:
        return _FLIPS[a.lower()]
    if a.lstrip("-").isdigit() and a.lstrip("-"):
        return change_digit(a, rng)
    for sep in (", ", ",", " "):
        parts = a.split(sep)
        if len(parts) > 1 and len(set(parts)) > 1:
            return sep.join(corrupt_tokens(parts, rng))
    if not a:
        return "0"
    i = rng.randrange(len(a))
    return a[:i] + ("x" if a[i] != "x" else "y") + a[i + 1:]


def encode_with_mask(sample: Sample, tokenizer, sep: str = " ", eod: bool = True, filler: Sequence[int] = (),
                     filler_target: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of `prompt + sep + filler + answer` (+ eod) and the answer-only loss mask (1 on answer and eod
    tokens, 0 on the prompt; on the `filler` ids, e.g. pause tokens, 1 only if `filler_target`). Prompt and
    answer are tokenized separately so the boundary is exact."""
    head = tokenizer.tokenize(sample.prompt + sep)
    tail = tokenizer.tokenize(sample.answer) + ([tokenizer.eod] if eod else [])
    return head + list(filler) + tail, [0] * len(head) + [int(filler_target)] * len(filler) + [1] * len(tail)
