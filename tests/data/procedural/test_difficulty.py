"""Difficulty knobs change the distribution (train and test difficulty can differ) and are validated."""

from __future__ import annotations

import random
import re
import statistics

import pytest

from recurdepth.data.procedural import get_task, list_tasks
from recurdepth.errors import DataError

EASY_HARD = {
    "sort": ({"min_len": 3, "max_len": 5}, {"min_len": 10, "max_len": 14},
             lambda s: len(s.answer.split())),
    "anagram": ({"min_len": 4, "max_len": 5}, {"min_len": 8, "max_len": 9}, lambda s: len(s.answer)),
    "addition": ({"min_digits": 1, "max_digits": 2}, {"min_digits": 6, "max_digits": 8}, lambda s: len(s.answer)),
    "multiplication": ({"min_digits": 1, "max_digits": 2}, {"min_digits": 4, "max_digits": 5},
                       lambda s: len(s.answer)),
    "parity": ({"min_len": 2, "max_len": 6}, {"min_len": 20, "max_len": 30},
               lambda s: len(re.search(r"[01]{2,}", s.prompt).group())),
    "copy": ({"max_len": 5}, {"min_len": 12, "max_len": 20}, lambda s: len(s.answer.split())),
    "reverse": ({"max_len": 5}, {"min_len": 12, "max_len": 20}, lambda s: len(s.answer.split())),
    "brackets": ({"max_len": 6}, {"min_len": 14, "max_len": 20}, lambda s: s.prompt.count(" ") - 5),
    "modular": ({"max_terms": 2}, {"min_terms": 5, "max_terms": 7}, lambda s: len(re.findall(r"\d+", s.prompt))),
    "shortest_path": ({"min_nodes": 3, "max_nodes": 5}, {"min_nodes": 12, "max_nodes": 16},
                      lambda s: int(re.search(r"nodes 0 to (\d+)", s.prompt).group(1))),
    "program_trace": ({"min_len": 1, "max_len": 3}, {"min_len": 8, "max_len": 12}, lambda s: s.prompt.count("\n")),
    "base_conversion": ({"max_value": 50, "max_base": 3}, {"min_value": 10_000, "max_value": 100_000, "max_base": 3},
                        lambda s: len(s.answer)),
    "count": ({"max_len": 6}, {"min_len": 20, "max_len": 30}, lambda s: s.prompt.count(" ")),
    "hops": ({"max_hops": 3}, {"min_hops": 5, "max_hops": 6}, lambda s: len(s.steps)),
    "root": ({"max_depth": 3, "nodes": 24}, {"min_depth": 5, "max_depth": 7, "nodes": 24}, lambda s: len(s.steps)),
}


def test_every_task_has_a_difficulty_check():
    assert set(EASY_HARD) == set(list_tasks())


@pytest.mark.parametrize("name", sorted(EASY_HARD))
def test_harder_difficulty_shifts_the_distribution(name):
    easy, hard, size = EASY_HARD[name]
    task = get_task(name)
    easy_sizes = [size(task.generate(random.Random(i), easy)) for i in range(300)]
    hard_sizes = [size(task.generate(random.Random(i), hard)) for i in range(300)]
    assert max(easy_sizes) < min(hard_sizes), (name, max(easy_sizes), min(hard_sizes))
    for d in (easy, hard):  # harder samples still verify
        rng = random.Random(7)
        assert all(task.verify(s.prompt, s.answer) for s in (task.generate(rng, d) for _ in range(300)))


def test_sort_lengths_follow_the_knobs_exactly():
    task = get_task("sort")
    lengths = [len(task.generate(random.Random(i), {"min_len": 9, "max_len": 12, "max_value": 5}).answer.split())
               for i in range(400)]
    assert set(lengths) == {9, 10, 11, 12}
    values = {int(v) for i in range(50)
              for v in task.generate(random.Random(i), {"max_value": 5}).answer.split()}
    assert values <= set(range(6))
    assert statistics.mean(lengths) > 10


def test_brackets_types_knob():
    task = get_task("brackets")
    rng = random.Random(0)
    one = "".join(task.generate(rng, {"types": 1}).prompt.split("? ")[1] for _ in range(200))
    assert set(one) <= set("() \nAnswer:")
    four = "".join(task.generate(rng, {"types": 4}).prompt.split("? ")[1] for _ in range(200))
    assert "<" in four and "{" in four


@pytest.mark.parametrize("name, bad", [
    ("sort", {"nope": 1}), ("sort", {"min_len": 9, "max_len": 3}), ("sort", {"max_len": "long"}),
    ("anagram", {"min_len": 12, "max_len": 14}), ("brackets", {"types": 7}), ("brackets", {"min_len": 3, "max_len": 3}),
    ("program_trace", {"num_vars": 9}), ("base_conversion", {"max_base": 40}), ("modular", {"min_modulus": 0}),
])
def test_bad_difficulty_is_one_line_data_error(name, bad):
    with pytest.raises(DataError) as info:
        get_task(name).generate(random.Random(0), bad)
    assert "\n" not in str(info.value) and name in str(info.value)
