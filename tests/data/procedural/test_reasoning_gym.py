"""reasoning-gym tasks by name: gold answers score 1.0 by reasoning-gym's own scorer, corrupted ones less."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

rg = pytest.importorskip("reasoning_gym")

from recurdepth.data.procedural import (corrupt_answer, disjoint, generate_split, get_task,  # noqa: E402
                                        list_rg_tasks, read_jsonl, verify_sample, write_jsonl)
from recurdepth.errors import DataError  # noqa: E402

RG_TASKS = ["rg:basic_arithmetic", "rg:word_sorting", "rg:chain_sum"]


def test_names_exist():
    names = list_rg_tasks()
    assert len(names) > 50 and all(n.startswith("rg:") for n in names)
    assert set(RG_TASKS) <= set(names)


@pytest.mark.parametrize("name", RG_TASKS)
def test_gold_scores_one_and_corruption_less(name):
    task = get_task(name)
    samples = generate_split(name, 100, "train", seed=1)
    assert len(samples) == 100 and all(s.task == name and s.meta for s in samples)
    ds_name = name[3:]
    rng = random.Random(0)
    for s in samples:
        entry = json.loads(s.meta)["entry"]
        scorer = rg.create_dataset(ds_name, seed=json.loads(s.meta)["seed"], size=json.loads(s.meta)["size"])
        assert scorer.score_answer(s.answer, entry) == 1.0  # reasoning-gym's own scorer, directly
        assert verify_sample(s) and task.score(s) == 1.0
        bad = corrupt_answer(s, rng)
        assert task.score(s, bad) < 1.0 and not verify_sample(s, bad), (s.answer, bad)


@pytest.mark.parametrize("name", RG_TASKS)
def test_rg_splits_disjoint_and_deterministic(name):
    train = generate_split(name, 200, "train")
    test = generate_split(name, 200, "test")
    assert disjoint(train, test)
    assert generate_split(name, 200, "test") == test


def test_difficulty_is_the_rg_config():
    easy = generate_split("rg:chain_sum", 50, "train", {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                       "max_digits": 1})
    hard = generate_split("rg:chain_sum", 50, "train", {"min_terms": 6, "max_terms": 6, "min_digits": 3,
                                                       "max_digits": 3})
    assert max(len(s.prompt) for s in easy) < min(len(s.prompt) for s in hard)
    assert all(verify_sample(s) for s in easy + hard)
    with pytest.raises(DataError, match="rejected its configuration"):
        generate_split("rg:chain_sum", 5, "train", {"no_such_field": 1})


def test_jsonl_round_trip_keeps_what_the_scorer_needs(tmp_path):
    samples = generate_split("rg:word_sorting", 20, "train")
    write_jsonl(samples, tmp_path / "rg.jsonl")
    back = read_jsonl(tmp_path / "rg.jsonl")
    assert back == samples and all(verify_sample(s) for s in back)


def test_stored_entry_is_the_fallback_and_prompt_must_match():
    s = generate_split("rg:chain_sum", 1, "train")[0]
    meta = json.loads(s.meta)
    meta["seed"] += 1  # regeneration no longer reproduces the prompt: the stored entry is used
    moved = replace(s, meta=json.dumps(meta))
    assert verify_sample(moved) and not verify_sample(moved, corrupt_answer(s, random.Random(0)))
    assert not verify_sample(replace(s, prompt=s.prompt + " "))  # an entry for another question
    assert not verify_sample(replace(s, meta=None))
    with pytest.raises(DataError, match="verify_sample"):
        get_task("rg:chain_sum").verify(s.prompt, s.answer)


@pytest.mark.parametrize("name", ["rg:chain_summ", "rg:", "rg:no_such_task"])
def test_unknown_rg_task(name):
    with pytest.raises(DataError) as info:
        get_task(name)
    msg = str(info.value)
    assert "\n" not in msg and "unknown reasoning-gym task" in msg and "list_rg_tasks" in msg
    if name == "rg:chain_summ":
        assert "rg:chain_sum" in msg


def test_task_without_gold_answers_is_a_clear_error():
    with pytest.raises(DataError, match="no gold answers"):
        generate_split("rg:graph_color", 5, "train")
