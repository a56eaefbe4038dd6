"""Resuming megatron-core's LR / weight-decay schedule exactly: `load_scheduler_state`.

What megatron assumes: `OptimizerParamScheduler.load_state_dict(state)` is called on a freshly built scheduler
(`num_steps == 0`): it restores the step count by *adding* the saved one, `self.step(increment=num_steps)`
(megatron/core/optimizer_param_scheduler.py), instead of assigning it.

What breaks without the reset: a scheduler that has already stepped ends up at current + saved steps. The
numerical guard's rollback (`train.on_bad_step=rollback`) reloads the last checkpoint into the live
scheduler, so every LR after it (warmup, decay, WSD) would silently come from the wrong step and the run
would no longer match one that never hit the bad step. Setting `num_steps = 0` first is also right for a
megatron that assigned the count, so the fix cannot hurt there.

Tested with megatron-core 0.16.0 and 0.16.1 (`recurdepth.compat.version.TESTED_MEGATRON_VERSIONS`).
"""

from __future__ import annotations

from recurdepth.compat.version import check_megatron_version

__all__ = ["load_scheduler_state"]


def load_scheduler_state(scheduler, state: dict) -> None:
    """Load `state` (a `state_dict()` of megatron's OptimizerParamScheduler) into `scheduler`, whatever steps
    it has taken, ending at exactly the saved step count."""
    check_megatron_version("recurdepth's scheduler resume fix")
    scheduler.num_steps = 0  # megatron's load_state_dict *adds* the saved step count to the current one
    scheduler.load_state_dict(state)
