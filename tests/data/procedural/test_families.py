"""The own tasks split by family (arithmetic, sequences, logic, graphs, hops): the registry, every task name and
class, and the names `recurdepth.data.procedural.tasks` exported stay as they were; the prompt suffix and the
arrow parsing are defined once."""

from __future__ import annotations

import random
from pathlib import Path

from recurdepth.data.procedural import TASKS, corrupt_answer, generate_split, get_task, list_tasks, verify_sample
from recurdepth.data.procedural import base, hops, tasks

# registration order (TASKS), as before the split
NAMES = ["sort", "anagram", "addition", "multiplication", "parity", "copy", "reverse", "brackets", "modular",
         "shortest_path", "program_trace", "base_conversion", "count", "hops", "root"]
FAMILY = {"addition": "arithmetic", "multiplication": "arithmetic", "modular": "arithmetic",
          "base_conversion": "arithmetic", "sort": "sequences", "copy": "sequences", "reverse": "sequences",
          "count": "sequences", "anagram": "sequences", "parity": "logic", "brackets": "logic",
          "program_trace": "logic", "shortest_path": "graphs", "hops": "hops", "root": "hops"}
CLASSES = {"sort": "SortTask", "anagram": "AnagramTask", "addition": "AdditionTask",
           "multiplication": "MultiplicationTask", "parity": "ParityTask", "copy": "CopyTask",
           "reverse": "ReverseTask", "brackets": "BracketsTask", "modular": "ModularTask",
           "shortest_path": "ShortestPathTask", "program_trace": "ProgramTraceTask",
           "base_conversion": "BaseConversionTask", "count": "CountTask", "hops": "HopsTask", "root": "RootTask"}


def test_registry_names_are_unchanged():
    assert list(TASKS) == NAMES
    assert list_tasks() == sorted(NAMES)
    assert [t.name for t in tasks.OWN_TASKS] == NAMES[:13]
    for name in NAMES:
        task = get_task(name)
        assert task is TASKS[name] and type(task).__name__ == CLASSES[name]
        assert type(task).__module__ == f"recurdepth.data.procedural.{FAMILY[name]}", name


def test_tasks_module_reexports_every_own_task_class_and_helper():
    for name in NAMES[:13]:
        assert getattr(tasks, CLASSES[name]) is type(TASKS[name])
    for helper in ("word_list", "WORDS_FILE", "bracket_trace", "bfs_path", "run_program", "to_base", "BRACKETS",
                   "ANSWER"):
        assert hasattr(tasks, helper), helper
    assert set(tasks.__all__) <= set(vars(tasks))
    assert tasks.WORDS_FILE.is_file()


def test_one_answer_suffix_and_one_arrow_parser():
    assert hops.ANSWER is base.ANSWER and tasks.ANSWER is base.ANSWER
    folder = Path(base.__file__).parent
    for path in folder.glob("*.py"):
        source = path.read_text()
        if path.name != "base.py":
            assert 'ANSWER = "' not in source, f"{path.name} defines its own ANSWER"
        if path.name != "hops.py":
            assert 'split(">")' not in source, f"{path.name} parses arrows itself"
    assert Path(hops.__file__).read_text().count('split(">")') == 1
    assert hops.parse_arrows("a>b b>a") == {"a": "b", "b": "a"}
    assert hops.parse_arrows("a>b a>c") is None


def test_every_family_generates_verified_samples():
    rng = random.Random(0)
    for name in NAMES:
        samples = generate_split(name, 8, "train", None, 5)
        assert all(s.prompt.endswith(base.ANSWER) and verify_sample(s) for s in samples), name
        assert not any(verify_sample(s, corrupt_answer(s, rng)) for s in samples), name
