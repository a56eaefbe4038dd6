"""Task lookup: unknown names are one-line DataErrors; reasoning-gym is imported only when needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from recurdepth.data.procedural import encode_with_mask, generate_split, get_task, list_tasks
from recurdepth.data.procedural import registry
from recurdepth.data.tokenizer import ByteTokenizer
from recurdepth.errors import DataError


@pytest.mark.parametrize("name", ["sortt", "Sorting", "", "rg", "addition2"])
def test_unknown_own_task(name):
    with pytest.raises(DataError) as info:
        get_task(name)
    msg = str(info.value)
    assert "\n" not in msg and "unknown procedural task" in msg and repr(name) in msg and "rg:<name>" in msg
    if name == "sortt":
        assert "did you mean sort" in msg


def test_unknown_task_in_generate_split():
    with pytest.raises(DataError, match="unknown procedural task 'parityy'"):
        generate_split("parityy", 5, "train")


def test_list_tasks():
    names = list_tasks()
    assert names == sorted(names) and len(names) >= 11
    for name in names:
        task = get_task(name)
        assert task.name == name and task.default_difficulty and set(task.difficulty_keys) == set(
            task.default_difficulty)


def test_reasoning_gym_is_imported_lazily():
    code = ("import sys, random; from recurdepth.data.procedural import generate_split, get_task; "
            "generate_split('sort', 5, 'test'); assert 'reasoning_gym' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_missing_reasoning_gym_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    monkeypatch.setattr(registry, "_rg_task", registry._rg_task.__wrapped__)
    with pytest.raises(DataError, match=r"pip install reasoning-gym==0\.1\.25") as info:
        get_task("rg:chain_sum")
    assert "\n" not in str(info.value)


def test_answer_only_loss_mask():
    s = generate_split("addition", 1, "train")[0]
    tok = ByteTokenizer()
    ids, mask = encode_with_mask(s, tok)
    assert len(ids) == len(mask)
    answer_ids = [i for i, m in zip(ids, mask) if m]
    assert answer_ids == tok.tokenize(s.answer) + [tok.eod]
    assert tok.detokenize([i for i, m in zip(ids, mask) if not m]) == s.prompt + " "
