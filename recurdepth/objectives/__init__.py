"""Objectives: what one micro-batch's loss is, as plug-ins (`base.Objective`).

An objective turns a micro-batch (tokens, labels, loss mask, sample ids) into the *sum* of its token losses
and says how many tokens that sum counts; the trainer divides by the global count after the data-parallel
reduction, so every layout gives the same update. `lm` is the plain next-token loss; the thought-token
objectives (`pause`, `quiet_star`, `coconut`) are registered in `registry.py` (docs/objectives.md). Each owns
its config section, data transform, extra modules and metrics; nothing outside this folder names one.
"""

from recurdepth.objectives.base import Objective, ObjectiveSection
from recurdepth.objectives.lm import LMObjective, masked_loss_sum
from recurdepth.objectives.registry import (OBJECTIVES, build_objective, objective_class, register_objective,
                                            section_class)

__all__ = ["OBJECTIVES", "LMObjective", "Objective", "ObjectiveSection", "build_objective", "masked_loss_sum",
           "objective_class", "register_objective", "section_class"]
