"""Verifiable procedural tasks: generated prompt/answer pairs (with step-by-step solutions), each checked by
a verifier that re-derives the answer from the prompt before it is written; reasoning-gym tasks by name
(`rg:<name>`), scored by reasoning-gym's own scorer; train/test splits that never share a sample.

    from recurdepth.data.procedural import generate_split, write_jsonl
    train = generate_split("sort", 10_000, "train", {"max_len": 8})
    test = generate_split("sort", 1_000, "test", {"min_len": 9, "max_len": 16}, train_n=10_000,
                          train_difficulty={"max_len": 8})
"""

from recurdepth.data.procedural.base import Sample, Task, encode_with_mask
from recurdepth.data.procedural.registry import (TASKS, corrupt_answer, get_task, list_rg_tasks, list_tasks,
                                                 verify_sample)
from recurdepth.data.procedural.splits import (disjoint, generate_split, read_jsonl, sample_hash,
                                               write_jsonl)

__all__ = ["Sample", "Task", "TASKS", "get_task", "list_tasks", "list_rg_tasks", "verify_sample",
           "corrupt_answer", "generate_split", "sample_hash", "disjoint", "write_jsonl", "read_jsonl",
           "encode_with_mask"]
