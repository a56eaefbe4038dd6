"""Task lookup by name (own tasks, and reasoning-gym's as `rg:<name>`), sample-level verification and
answer corruption (for tests of the verifiers)."""

from __future__ import annotations

import difflib
import random
from functools import lru_cache
from typing import Optional

from recurdepth.data.procedural.base import Sample, Task
from recurdepth.data.procedural.hops import HopsTask, RootTask
from recurdepth.data.procedural.rg import PREFIX, RGTask, rg_names
from recurdepth.data.procedural.tasks import OWN_TASKS
from recurdepth.errors import DataError

TASKS: dict[str, Task] = {t.name: t for t in OWN_TASKS + (HopsTask(), RootTask())}


def list_tasks() -> list[str]:
    """Names of the own tasks."""
    return sorted(TASKS)


def list_rg_tasks() -> list[str]:
    """Names of reasoning-gym's tasks as accepted by `get_task` (`rg:<name>`); needs reasoning-gym."""
    return [PREFIX + n for n in rg_names()]


@lru_cache(maxsize=None)
def _rg_task(rg_name: str) -> RGTask:
    return RGTask(rg_name)


def get_task(name: str) -> Task:
    """The task called `name`: an own task, or `rg:<reasoning_gym_name>`. Unknown -> DataError (one line)."""
    if not isinstance(name, str):
        raise DataError(f"task name must be a string, got {name!r}")
    if name.startswith(PREFIX):
        return _rg_task(name[len(PREFIX):])
    if name in TASKS:
        return TASKS[name]
    close = difflib.get_close_matches(name, list(TASKS), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise DataError(f"unknown procedural task {name!r}: {hint}known tasks: {', '.join(list_tasks())}; "
                    f"reasoning-gym tasks are named rg:<name> (see list_rg_tasks())")


def verify_sample(sample: Sample, answer: Optional[str] = None) -> bool:
    """Whether `answer` (default: the sample's own answer) is correct for `sample`: own tasks re-derive the
    answer from the prompt; reasoning-gym tasks score it with reasoning-gym's scorer (1.0 = correct)."""
    task = get_task(sample.task)
    answer = sample.answer if answer is None else answer
    if isinstance(task, RGTask):
        return task.score(sample, answer) >= 1.0
    return task.verify(sample.prompt, answer)


def corrupt_answer(sample: Sample, rng: random.Random) -> str:
    """A wrong answer for `sample`, close to the right one (one digit changed, two elements swapped,
    yes/no flipped, ...); deterministic given `rng`. The verifier must reject it."""
    return get_task(sample.task).corrupt(sample, rng)
