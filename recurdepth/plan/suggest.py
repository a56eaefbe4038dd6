"""When the worst rank does not fit: the fewest memory-saving changes (as `section.key=value` overrides) that make
it fit, found by re-planning the alternatives; among those, the fastest."""

from __future__ import annotations

import itertools
from typing import Callable, Optional, Protocol, Sequence, TypeVar

from recurdepth.config import Config, config_from_dict, set_overrides
from recurdepth.errors import ConfigError

MAX_SUGGESTION_CHANGES = 3


class Fit(Protocol):
    """What the search reads of a plan (`recurdepth.plan.planner.Plan`)."""

    fits: bool
    tokens_per_s: float


P = TypeVar("P", bound=Fit)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A new validated Config: `cfg` with `section.key=value` overrides applied (as on the command line)."""
    return config_from_dict(set_overrides(cfg.to_dict(), overrides))


def _divisors(n: int) -> list[int]:
    return [x for x in range(1, n + 1) if n % x == 0]


def candidate_moves(cfg: Config, world: int, gpus_per_node: int) -> list[list[list[str]]]:
    """Memory-saving knobs, each a list of alternative override sets (most preferred first)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dp = world // (p.tensor * p.pipeline)
    knobs = []
    if not cfg.optimizer.distributed and dp > 1:
        knobs.append([["optimizer.distributed=true"]])
    if not cfg.recurrence.checkpoint_iterations:
        knobs.append([["recurrence.checkpoint_iterations=true"]])
    smaller = [b for b in sorted(_divisors(t.micro_batch_size), reverse=True) if b < t.micro_batch_size]
    if smaller:
        knobs.append([[f"train.micro_batch_size={b}"] for b in smaller])
    groups = m.num_query_groups or m.num_heads
    tps = [x for x in range(p.tensor + 1, gpus_per_node + 1) if x % p.tensor == 0 and gpus_per_node % x == 0
           and m.num_heads % x == 0 and groups % x == 0]
    if tps:
        knobs.append([[f"parallel.tensor={x}", "parallel.sequence_parallel=true"] for x in tps])
    elif p.tensor > 1 and not p.sequence_parallel:
        knobs.append([["parallel.sequence_parallel=true"]])
    pps = [x for x in range(p.pipeline + 1, m.core_layers + 1) if x % p.pipeline == 0 and m.core_layers % x == 0]
    if pps:
        knobs.append([[f"parallel.pipeline={x}"] for x in pps])
    if m.num_experts:
        eps = [x for x in range(p.expert + 1, m.num_experts + 1) if x % p.expert == 0 and m.num_experts % x == 0]
        if eps:
            knobs.append([[f"parallel.expert={x}"] for x in eps])
    return knobs


def suggest_fix(cfg: Config, world: int, gpus_per_node: int, replan: Callable[[Config], P]
                ) -> Optional[tuple[list, P]]:
    """The fewest changes (up to MAX_SUGGESTION_CHANGES knobs) that make the plan fit; among those, the fastest.
    `replan` plans a changed config under the same assumptions (without suggesting). Returns (overrides, plan
    with them) or None."""
    knobs = candidate_moves(cfg, world, gpus_per_node)
    for size in range(1, MAX_SUGGESTION_CHANGES + 1):
        best = None
        for chosen in itertools.combinations(knobs, size):
            for values in itertools.product(*chosen):
                overrides = [o for v in values for o in v]
                try:
                    alt = replan(apply_overrides(cfg, overrides))
                except ConfigError:
                    continue
                if alt.fits and (best is None or alt.tokens_per_s > best[1].tokens_per_s):
                    best = (overrides, alt)
        if best is not None:
            return best
    return None
