"""The own procedural tasks, by family: `arithmetic.py` (addition, multiplication, modular, base_conversion),
`sequences.py` (sort, copy, reverse, count, anagram), `logic.py` (parity, brackets, program_trace),
`graphs.py` (shortest_path) and `hops.py` (hops, root; registered in `registry.py`). This module collects them
as `OWN_TASKS`, in registration order, and re-exports every task class and helper from its family module.

Every prompt is plain text ending in "\\nAnswer:" (`base.ANSWER`); every answer is a short canonical string;
every verifier parses the prompt and re-derives the answer (see `Task.verify`). Difficulty knobs are listed in
each task's `difficulty_keys`; `min_*`/`max_*` pairs are inclusive ranges, so train and test splits can be
drawn at different difficulties (e.g. short lists for train, long for test).
"""

from __future__ import annotations

from recurdepth.data.procedural.arithmetic import (AdditionTask, BaseConversionTask, ModularTask,
                                                   MultiplicationTask, to_base)
from recurdepth.data.procedural.base import ANSWER, Task
from recurdepth.data.procedural.graphs import ShortestPathTask, bfs_path
from recurdepth.data.procedural.logic import (BRACKETS, BracketsTask, ParityTask, ProgramTraceTask, bracket_trace,
                                              run_program)
from recurdepth.data.procedural.sequences import (WORDS_FILE, AnagramTask, CopyTask, CountTask, ReverseTask, SortTask,
                                                  word_list)

__all__ = ["ANSWER", "BRACKETS", "OWN_TASKS", "WORDS_FILE", "AdditionTask", "AnagramTask", "BaseConversionTask",
           "BracketsTask", "CopyTask", "CountTask", "ModularTask", "MultiplicationTask", "ParityTask",
           "ProgramTraceTask", "ReverseTask", "ShortestPathTask", "SortTask", "bfs_path", "bracket_trace",
           "run_program", "to_base", "word_list"]

OWN_TASKS: tuple[Task, ...] = (SortTask(), AnagramTask(), AdditionTask(), MultiplicationTask(), ParityTask(),
                               CopyTask(), ReverseTask(), BracketsTask(), ModularTask(), ShortestPathTask(),
                               ProgramTraceTask(), BaseConversionTask(), CountTask())
