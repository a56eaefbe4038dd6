"""Splits: deterministic, verified, train/test disjoint by hash; JSONL written atomically."""

from __future__ import annotations

import json
import os
import random

import pytest

from recurdepth.data.procedural import (Sample, disjoint, generate_split, get_task, read_jsonl, sample_hash,
                                        verify_sample, write_jsonl)
from recurdepth.data.procedural.registry import TASKS
from recurdepth.errors import DataError


@pytest.mark.parametrize("name", ["sort", "parity", "brackets", "program_trace"])
def test_train_test_disjoint_and_deterministic(name):
    train = generate_split(name, 3000, "train", seed=3)
    test = generate_split(name, 3000, "test", seed=3)
    assert len(train) == len(test) == 3000
    assert disjoint(train, test)
    assert not {sample_hash(s) for s in train} & {sample_hash(s) for s in test}
    assert generate_split(name, 3000, "test", seed=3) == test
    assert generate_split(name, 3000, "train", seed=3) == train
    assert generate_split(name, 3000, "train", seed=4) != train
    assert all(verify_sample(s) for s in test)


def test_small_task_space_is_still_disjoint():
    """Parity at 4-7 bits has 240 prompts: a 400-sample train split covers most of them, and the test split
    must come from the rest."""
    d = {"min_len": 4, "max_len": 7}
    train = generate_split("parity", 400, "train", d, seed=1)
    test = generate_split("parity", 30, "test", d, seed=1, train_n=400)
    assert disjoint(train, test) and len(test) == 30
    assert len({s.prompt for s in train}) > 150
    same_seed_stream = generate_split("parity", 30, "test", d, seed=1, train_n=1)
    assert not disjoint(train, same_seed_stream)  # without the exclusion the splits would collide


def test_exhausted_space_is_a_data_error():
    with pytest.raises(DataError, match="unseen in train"):
        generate_split("parity", 400, "test", {"min_len": 3, "max_len": 3})


def test_test_split_excludes_a_train_split_of_other_size_and_difficulty():
    train = generate_split("sort", 2000, "train", {"max_len": 4, "max_value": 9})
    test = generate_split("sort", 300, "test", {"min_len": 3, "max_len": 5, "max_value": 9},
                          train_n=2000, train_difficulty={"max_len": 4, "max_value": 9})
    assert disjoint(train, test)
    naive = generate_split("sort", 300, "test", {"min_len": 3, "max_len": 5, "max_value": 9})
    assert not disjoint(train, naive)  # excluding only a same-arguments train split is not enough here
    assert disjoint(train, generate_split("sort", 300, "test", {"min_len": 3, "max_len": 5, "max_value": 9},
                                          exclude={sample_hash(s) for s in train}))


def test_disjoint_detects_a_shared_sample():
    a = [Sample("sort", "Sort these numbers in ascending order: 2 1\nAnswer:", "1 2")]
    b = [Sample("sort", "Sort these numbers in ascending order: 2 1\nAnswer:", "1 2", ("1",))]
    assert not disjoint(a, b)
    assert disjoint(a, [Sample("sort", "Sort these numbers in ascending order: 1 2\nAnswer:", "1 2")])


def test_generator_bug_is_caught(monkeypatch):
    task = get_task("addition")
    real = type(task).generate

    def buggy(self, rng, difficulty=None):
        s = real(self, rng, difficulty)
        return Sample(s.task, s.prompt, str(int(s.answer) + 1), s.steps)
    monkeypatch.setattr(type(task), "generate", buggy)
    with pytest.raises(RuntimeError, match="verifier rejects"):
        generate_split("addition", 10, "train")


def test_bad_split_arguments():
    with pytest.raises(DataError, match="split"):
        generate_split("sort", 10, "validation")
    with pytest.raises(DataError):
        generate_split("sort", -1, "train")
    assert generate_split("sort", 0, "test") == []


def test_jsonl_round_trip_is_atomic(tmp_path):
    samples = [s for name in TASKS for s in generate_split(name, 20, "train")]
    path = tmp_path / "sub" / "all.jsonl"
    write_jsonl(samples, str(path))
    assert not os.path.exists(str(path) + ".tmp")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(rows[0]) == {"task", "prompt", "answer", "steps"}
    back = read_jsonl(path)
    assert back == samples and all(verify_sample(s) for s in back)

    def failing():
        yield samples[0]
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_jsonl(failing(), str(path))
    assert read_jsonl(path) == samples  # the old file is untouched, no .tmp left behind
    assert not os.path.exists(str(path) + ".tmp")


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "sort"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_jsonl(bad)


def test_corrupt_answer_is_deterministic():
    from recurdepth.data.procedural import corrupt_answer
    s = generate_split("sort", 1, "train")[0]
    assert corrupt_answer(s, random.Random(5)) == corrupt_answer(s, random.Random(5)) != s.answer
