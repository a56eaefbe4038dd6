"""Every own task: 10,000 default-difficulty samples pass their verifier, a corrupted answer is rejected for
every one of them, and a subset of gold answers matches an oracle written independently of the task code."""

from __future__ import annotations

import random
import re
from collections import deque

import pytest

from recurdepth.data.procedural import Sample, corrupt_answer, get_task, list_tasks, verify_sample
from recurdepth.data.procedural.tasks import word_list

N = 10_000
OWN = list_tasks()


def test_at_least_eleven_own_tasks():
    assert len(OWN) >= 11
    for required in ("sort", "anagram", "addition", "multiplication", "parity", "copy", "reverse", "brackets",
                     "modular", "shortest_path", "program_trace"):
        assert required in OWN


@pytest.fixture(scope="module")
def samples():
    cache = {}

    def get(name):
        if name not in cache:
            task, rng = get_task(name), random.Random(1234)
            cache[name] = [task.generate(rng, task.default_difficulty) for _ in range(N)]
        return cache[name]
    return get


@pytest.mark.parametrize("name", OWN)
def test_gold_passes_and_corruption_fails(name, samples):
    task = get_task(name)
    batch = samples(name)
    assert len(batch) == N and all(isinstance(s, Sample) and s.task == name for s in batch)
    rejected_gold = [s for s in batch if not task.verify(s.prompt, s.answer)]
    assert not rejected_gold, f"{name}: {len(rejected_gold)} gold answers rejected, e.g. {rejected_gold[0]}"
    rng = random.Random(99)
    accepted_bad = []
    for s in batch:
        bad = corrupt_answer(s, rng)
        assert bad != s.answer
        if task.verify(s.prompt, bad):
            accepted_bad.append((s, bad))
    assert not accepted_bad, f"{name}: {len(accepted_bad)} corrupted answers accepted, e.g. {accepted_bad[0]}"


@pytest.mark.parametrize("name", OWN)
def test_prompt_format_and_determinism(name, samples):
    batch = samples(name)
    assert all(s.prompt.endswith("\nAnswer:") and s.answer and s.answer == s.answer.strip() for s in batch[:500])
    task = get_task(name)
    again = [task.generate(random.Random(1234), None)]
    assert again[0] == batch[0]
    assert len({s.prompt for s in batch}) > N // 2  # not a tiny fixed set


@pytest.mark.parametrize("name", OWN)
def test_verifier_rederives_from_prompt(name, samples):
    """Another sample's answer is rejected whenever it differs from this sample's; junk and malformed
    prompts are rejected without raising."""
    task = get_task(name)
    batch = samples(name)[:2000]
    for s, other in zip(batch, batch[1:] + batch[:1]):
        if other.answer.strip().lower() != s.answer.strip().lower():
            assert not task.verify(s.prompt, other.answer), (s, other.answer)
    s = batch[0]
    assert not task.verify(s.prompt, "")
    assert not task.verify(s.prompt, "banana 42")
    assert not task.verify(s.prompt.replace("\nAnswer:", ""), s.answer)
    assert not task.verify("What is the meaning of life?\nAnswer:", s.answer)
    assert verify_sample(s) and not verify_sample(s, corrupt_answer(s, random.Random(0)))


def test_steps_filled_where_meaningful(samples):
    for name in ("sort", "addition", "multiplication", "parity", "reverse", "brackets", "modular",
                 "shortest_path", "program_trace", "base_conversion", "count"):
        assert all(isinstance(s.steps, tuple) for s in samples(name)[:200])
        assert sum(bool(s.steps) for s in samples(name)[:200]) > 150, name
    for s in samples("program_trace")[:200]:  # the last state holds the queried variable's final value
        var = re.search(r"final value of ([a-f])\?", s.prompt).group(1)
        assert f"{var}={s.answer}" in s.steps[-1].split()
    for s in samples("shortest_path")[:500]:
        if s.answer != "unreachable":
            assert len(s.steps) == int(s.answer) + 1


# ---- independent oracles -------------------------------------------------------------------------------
def _oracle(name: str, prompt: str) -> str:
    body = prompt[: -len("\nAnswer:")]
    if name == "sort":
        return " ".join(str(v) for v in sorted(map(int, body.split(":")[1].split())))
    if name in ("addition", "multiplication"):
        a, op, b = re.search(r"(\d+) ([+*]) (\d+)", body).groups()
        return str(int(a) + int(b) if op == "+" else int(a) * int(b))
    if name == "parity":
        return "odd" if body.split(" in ")[1].split()[0].count("1") % 2 else "even"
    if name == "copy":
        return body.split(": ")[1]
    if name == "reverse":
        return " ".join(reversed(body.split(": ")[1].split()))
    if name == "brackets":
        s = body.split("? ")[1].replace(" ", "")
        while any(p in s for p in ("()", "[]", "{}", "<>")):
            for p in ("()", "[]", "{}", "<>"):
                s = s.replace(p, "")
        return "no" if s else "yes"
    if name == "modular":
        expr, m = re.fullmatch(r"What is \(([-+* \d]+)\) mod (\d+)\?", body).groups()
        return str(eval(expr) % int(m))  # noqa: S307 - the regex admits digits and + - * only
    if name == "shortest_path":
        n = int(re.search(r"nodes 0 to (\d+)", body).group(1)) + 1
        inf = float("inf")
        dist = [[0 if i == j else inf for j in range(n)] for i in range(n)]
        for u, v in re.findall(r"(\d+)-(\d+)", body.split("edges:")[1].split(".")[0]):
            dist[int(u)][int(v)] = dist[int(v)][int(u)] = 1
        for k in range(n):
            for i in range(n):
                for j in range(n):
                    dist[i][j] = min(dist[i][j], dist[i][k] + dist[k][j])
        src, dst = map(int, re.search(r"from node (\d+) to node (\d+)", body).groups())
        return "unreachable" if dist[src][dst] == inf else str(dist[src][dst])
    if name == "program_trace":
        lines = body.split("\n")[1:-1]
        var = re.search(r"final value of ([a-f])", body).group(1)
        py = []
        for line in lines:
            m = re.fullmatch(r"repeat (\d+) times: (.+)", line)
            py += [f"for _ in range({m.group(1)}):"] + [f"    {s}" for s in m.group(2).split("; ")] if m else [line]
        env: dict = {}
        exec("\n".join(py), {}, env)  # noqa: S102 - generated by the task under test, a-f/int/+-* only
        return str(env[var])
    if name == "base_conversion":
        value, base = map(int, re.search(r"number (\d+) to base (\d+)", body).groups())
        digits = ""
        while True:
            value, r = divmod(value, base)
            digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
            if not value:
                return digits
    if name == "count":
        target, seq = re.search(r"'(\w)' occur in: (.+)\?", body).groups()
        return str(seq.split().count(target))
    if name == "hops":
        edges, k, node = re.fullmatch(r"(.+)\. (\d+) hops? from (\w)\?", body).groups()
        arrow = dict(e.split(">") for e in edges.split())
        for _ in range(int(k)):
            node = arrow[node]
        return node
    if name == "root":
        edges, node = re.fullmatch(r"(.+)\. root of (\w)\?", body).groups()
        arrow = dict(e.split(">") for e in edges.split())
        while arrow[node] != node:
            node = arrow[node]
        return node
    if name == "anagram":
        letters = re.search(r"letters '(\w+)'", body).group(1)
        words = [w for w in word_list()[0] if sorted(w) == sorted(letters)]
        assert len(words) == 1, words  # generated targets are unique
        return words[0]
    raise KeyError(name)


@pytest.mark.parametrize("name", OWN)
def test_gold_matches_independent_oracle(name, samples):
    batch = samples(name)[:300 if name in ("anagram", "shortest_path") else 2000]
    wrong = [(s.prompt, s.answer, _oracle(name, s.prompt)) for s in batch if _oracle(name, s.prompt) != s.answer]
    assert not wrong, wrong[:3]


def test_unbalanced_brackets_and_unreachable_occur(samples):
    answers = [s.answer for s in samples("brackets")]
    assert 0.4 < answers.count("yes") / len(answers) < 0.6
    assert 0.02 < [s.answer for s in samples("shortest_path")].count("unreachable") / N < 0.5


def test_anagram_word_list_is_shipped_and_large():
    words, _, unique = word_list()
    assert len(words) >= 2000
    assert all(w.isalpha() and w.islower() and 4 <= len(w) <= 9 for w in words)
    assert sum(len(v) for v in unique.values()) >= 1500
