"""Logic and execution tasks: `parity` (XOR of a bit string), `brackets` (is a bracket sequence balanced: a
stack machine) and `program_trace` (run a tiny program of assignments and loops). Each one's steps are the
machine's state after every input symbol or statement."""

from __future__ import annotations

import random
import re
from typing import Optional

from recurdepth.data.procedural.base import ANSWER, Sample, Task, change_digit, match_prompt, require_at_least
from recurdepth.errors import DataError


# ---------------------------------------------------------------------------------------------------------
class ParityTask(Task):
    name = "parity"
    description = "is the number of 1s in a bit string even or odd"
    default_difficulty = {"min_len": 4, "max_len": 16}
    difficulty_keys = {"min_len": "shortest bit string", "max_len": "longest bit string"}
    _re = re.compile(r"Is the number of 1s in ([01]+) even or odd\?" + ANSWER)

    def check_difficulty(self, d):
        super().check_difficulty(d)
        require_at_least(self, d, "min_len")

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
        m = match_prompt(prompt, self._re)
        return ("odd" if m.group(1).count("1") % 2 else "even") if m else None

    def size(self, prompt):
        m = match_prompt(prompt, self._re)
        return len(m.group(1)) if m else None  # bits

    def corrupt(self, sample, rng):
        return "even" if sample.answer == "odd" else "odd"


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
        require_at_least(self, d, "min_len")
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
        m = match_prompt(prompt, self._re)
        return ("yes" if bracket_trace(m.group(1).split())[0] else "no") if m else None

    def corrupt(self, sample, rng):
        return "no" if sample.answer == "yes" else "yes"


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
        require_at_least(self, d, "min_len", minimum=0)
        require_at_least(self, d, "max_const", "max_abs")
        require_at_least(self, d, "max_repeat", minimum=2)
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
        m = match_prompt(prompt, self._re)
        if not m:
            return None
        result = run_program(m.group(1).rstrip("\n").split("\n"))
        if result is None or m.group(2) not in result[0]:
            return None
        return str(result[0][m.group(2)])

    def corrupt(self, sample, rng):
        return change_digit(sample.answer, rng)
