"""The objectives recurdepth knows, by `objective.kind`. Torch-free: config loading resolves a kind's section here.

A built-in is one line below ("kind": "module:Class", imported on first use). A user's or a test's objective is
`register_objective(kind, cls)` before the config is loaded. `OBJECTIVES` is the registry itself (a mapping
kind -> class or "module:Class"); assigning to it registers too.
"""

from __future__ import annotations

import importlib

from recurdepth.errors import ConfigError

OBJECTIVES: dict = {
    "lm": "recurdepth.objectives.lm:LMObjective",
    "pause": "recurdepth.objectives.pause:PauseObjective",
    "quiet_star": "recurdepth.objectives.quiet_star:QuietStarObjective",
    "coconut": "recurdepth.objectives.coconut:CoconutObjective",
    "exit_gate": "recurdepth.objectives.halting:ExitGateObjective",
    "ponder": "recurdepth.objectives.halting:PonderObjective",
    "exit_gate_tune": "recurdepth.objectives.halting:ExitGateTuneObjective",
    "deep_supervision": "recurdepth.objectives.deep_supervision:DeepSupervisionObjective",
    "recursion_router": "recurdepth.objectives.router:RouterObjective",
    "depth_by_size": "recurdepth.objectives.sized_depth:DepthBySizeObjective",
}


def register_objective(kind: str, cls) -> None:
    """Make `objective.kind=<kind>` build `cls` (a subclass of `recurdepth.objectives.base.Objective`)."""
    if not isinstance(kind, str) or not kind.isidentifier():
        raise ValueError(f"objective kind {kind!r}: use an identifier such as my_objective")
    OBJECTIVES[kind] = cls


def objective_class(kind: str):
    """The class registered for `kind`; a one-line ConfigError listing the known kinds otherwise."""
    if kind not in OBJECTIVES:
        raise ConfigError(f"objective.kind={kind!r} is not implemented; available: {', '.join(sorted(OBJECTIVES))} "
                          f"(or register one with recurdepth.objectives.register_objective)")
    entry = OBJECTIVES[kind]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = OBJECTIVES[kind] = getattr(importlib.import_module(module), name)
    return entry


def section_class(kind: str) -> type:
    """The dataclass of `kind`'s config section (its options; `kind` included)."""
    return objective_class(kind).Section


def build_objective(cfg, tokenizer):
    """The objective named by `objective.kind`, built for this config and tokenizer."""
    return objective_class(cfg.objective.kind)(cfg, tokenizer)
