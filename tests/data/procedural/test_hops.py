"""The `hops` task (pointer chasing along a permutation): the answer is k hops from the start, the knobs
control k and the number of letters, and the verifier re-derives the answer from the prompt."""

from __future__ import annotations

import random
import re

import pytest

from recurdepth.data.procedural import generate_split, get_task, verify_sample
from recurdepth.errors import DataError


def test_prompt_answer_and_steps():
    task = get_task("hops")
    rng = random.Random(0)
    for _ in range(500):
        s = task.generate(rng, {"min_hops": 2, "max_hops": 5, "nodes": 7})
        edges, k, start = re.fullmatch(r"(.+)\. (\d+) hops from ([a-g])\?\nAnswer:", s.prompt).groups()
        arrow = dict(e.split(">") for e in edges.split())
        assert sorted(arrow) == sorted(arrow.values()) == list("abcdefg")  # a permutation
        node, seen = "a", set()
        while node not in seen:
            seen.add(node)
            node = arrow[node]
        assert len(seen) == 7  # a single cycle through every letter
        assert 2 <= int(k) <= 5 and len(s.steps) == int(k) and s.steps[-1] == s.answer
        node = start
        for step in s.steps:
            assert arrow[node] == step
            node = step
        assert task.verify(s.prompt, s.answer) and verify_sample(s)
        assert not task.verify(s.prompt, task.corrupt(s, rng))


def test_one_hop_wording_and_hand_example():
    task = get_task("hops")
    assert task.solve("a>b b>c c>a. 1 hop from a?\nAnswer:") == "b"
    assert task.solve("a>b b>c c>a. 4 hops from a?\nAnswer:") == "b"
    assert task.verify("a>b b>c c>a. 2 hops from c?\nAnswer:", " b ")
    assert task.solve("a>b a>c c>a. 1 hop from a?\nAnswer:") is None  # a letter with two arrows
    assert task.solve("a>b b>c. 2 hops from b?\nAnswer:") is None  # walks off the graph
    assert task.solve("a>b b>a. 2 hops from a\nAnswer:") is None


def test_knobs_are_validated():
    task = get_task("hops")
    for bad in ({"min_hops": 0}, {"nodes": 1}, {"nodes": 27}, {"min_hops": 5, "max_hops": 4}):
        with pytest.raises(DataError):
            task.resolve(bad)


def test_harder_test_split_is_disjoint_and_longer():
    easy = {"min_hops": 1, "max_hops": 4, "nodes": 6}
    test = generate_split("hops", 200, "test", {"min_hops": 5, "max_hops": 6, "nodes": 6},
                          train_n=2000, train_difficulty=easy)
    assert all(5 <= len(s.steps) <= 6 for s in test)
    held_out = generate_split("hops", 200, "test", easy, train_n=2000)
    train = {s.prompt for s in generate_split("hops", 2000, "train", easy)}
    assert not train & {s.prompt for s in held_out}


def test_root_task_answer_is_the_root_depth_arrows_up():
    task = get_task("root")
    rng = random.Random(0)
    lengths = set()
    for _ in range(500):
        s = task.generate(rng, {"min_depth": 2, "max_depth": 5, "nodes": 18, "trees": 3})
        lengths.add(len(s.prompt))
        edges, start = re.fullmatch(r"(.+)\. root of ([a-r])\?\nAnswer:", s.prompt).groups()
        arrow = dict(e.split(">") for e in edges.split())
        assert sorted(arrow) == list("abcdefghijklmnopqr") and len(edges.split()) == 18  # one arrow per letter
        node = start
        for step in s.steps:  # the path: one arrow each, ending at the (only) root on it
            assert arrow[node] == step and node != step
            node = step
        assert 2 <= len(s.steps) <= 5 and arrow[s.answer] == s.answer == s.steps[-1]
        reach = {}
        for letter in arrow:  # three chains of six letters, no cycles
            seen = [letter]
            while arrow[seen[-1]] != seen[-1]:
                seen.append(arrow[seen[-1]])
                assert len(seen) <= 6
            reach.setdefault(seen[-1], set()).update(seen)
        assert sorted(len(v) for v in reach.values()) == [6, 6, 6]
        assert task.verify(s.prompt, s.answer) and verify_sample(s)
        wrong = task.corrupt(s, rng)
        assert arrow[wrong] == wrong and not task.verify(s.prompt, wrong)  # another root: the plausible mistake
    assert lengths == {4 * 18 - 1 + len(". root of x?\nAnswer:")}  # every prompt the same length


def test_root_hand_examples_and_knobs():
    task = get_task("root")
    assert task.solve("a>b b>c c>c d>d. root of a?\nAnswer:") == "c"
    assert task.solve("a>b b>c c>c d>d. root of d?\nAnswer:") == "d"
    assert task.solve("a>b b>a c>c. root of a?\nAnswer:") is None  # a cycle without a root
    assert task.solve("a>b c>c. root of a?\nAnswer:") is None  # walks off the graph
    for bad in ({"min_depth": 0}, {"trees": 0}, {"nodes": 12, "trees": 5}, {"nodes": 12, "trees": 3, "max_depth": 4},
                {"nodes": 27}):
        with pytest.raises(DataError):
            task.resolve(bad)
    task.resolve({"nodes": 12, "trees": 3, "max_depth": 3})  # chains of four letters: at most three arrows


def test_root_questions_answers_every_asked_letter():
    task = get_task("root")
    rng = random.Random(3)
    difficulty = {"min_depth": 1, "max_depth": 3, "nodes": 12, "trees": 2, "questions": 6}
    for _ in range(300):
        s = task.generate(rng, difficulty)
        edges, first = re.fullmatch(r"(.+)\. root of ([a-l])\?\nAnswer:", s.prompt).groups()
        arrow = dict(e.split(">") for e in edges.split())

        def root(x):
            depth = 0
            while arrow[x] != x:
                x, depth = arrow[x], depth + 1
            return x, depth

        words = s.answer.split()
        asked = [first] + [w[0] for w in words[1::2]]
        assert len(asked) == len(set(asked)) == 6 and all(w.endswith("?") for w in words[1::2])
        assert words[0::2] == [root(x)[0] for x in asked] and all(1 <= root(x)[1] <= 3 for x in asked)
        assert len(s.steps) == root(first)[1]
        assert task.verify(s.prompt, s.answer) and verify_sample(s)
        assert not task.verify(s.prompt, task.corrupt(s, rng))
        # generation cut by eval's token limit: a last question without its answer does not count against it
        assert task.verify(s.prompt, s.answer[:8]) and task.verify(s.prompt, s.answer[:9])
        for i in range(2, len(words), 2):  # any later root wrong: rejected
            other = next(r for r in {root(x)[0] for x in arrow} if r != words[i])
            assert not task.verify(s.prompt, " ".join(words[:i] + [other] + words[i + 1:]))
        assert not task.verify(s.prompt, s.answer + " junk")
        assert not task.verify(s.prompt, s.answer.replace(" ", "", 1))
    with pytest.raises(DataError, match="questions=7"):
        task.resolve({**difficulty, "questions": 7})  # only 2 chains x 3 depths to ask about
    one = task.generate(random.Random(5), {**difficulty, "questions": 1})
    assert one == task.generate(random.Random(5), {k: v for k, v in difficulty.items() if k != "questions"})
