"""Arithmetic tasks: `addition` and `multiplication` (column-wise steps), `modular` (an expression mod m,
with precedence) and `base_conversion` (repeated division). Answers are integers (or digits in a base), so a
corrupted answer changes one digit."""

from __future__ import annotations

import random
import re

from recurdepth.data.procedural.base import (ANSWER, DIGITS, Sample, Task, change_digit, match_prompt,
                                             require_at_least)
from recurdepth.errors import DataError


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
        require_at_least(self, d, "min_digits")

    def generate(self, rng, difficulty=None):
        d = self.resolve(difficulty)
        a = _rand_digits(rng, rng.randint(d["min_digits"], d["max_digits"]))
        b = _rand_digits(rng, rng.randint(d["min_digits"], d["max_digits"]))
        return Sample(self.name, f"What is {a} {self.symbol} {b}?{ANSWER}", str(self.apply(a, b)), self.steps(a, b))

    def solve(self, prompt):
        m = match_prompt(prompt, self._re)
        return str(self.apply(int(m.group(1)), int(m.group(2)))) if m else None

    def size(self, prompt):
        m = match_prompt(prompt, self._re)
        return max(len(m.group(1)), len(m.group(2))) if m else None  # digits of the longer operand

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
        require_at_least(self, d, "min_terms")
        require_at_least(self, d, "min_modulus", minimum=2)
        require_at_least(self, d, "max_value", minimum=0)

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
        m = match_prompt(prompt, self._re)
        if not m or int(m.group(2)) < 1:
            return None
        return str(self.evaluate(m.group(1).split(), int(m.group(2)))[0])

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
        require_at_least(self, d, "min_value", minimum=0)
        require_at_least(self, d, "min_base", minimum=2)
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
        m = match_prompt(prompt, self._re)
        if not m or not 2 <= int(m.group(2)) <= 36:
            return None
        return to_base(int(m.group(1)), int(m.group(2)))

    def corrupt(self, sample, rng):
        base = int(self._re.fullmatch(sample.prompt).group(2))
        return change_digit(sample.answer, rng, base)
