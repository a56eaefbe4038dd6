"""The DistributedOptimizer Adam-'step' fix: resume exactly with megatron's fallback (torch) Adam.

megatron-core picks its Adam at import (`megatron/core/optimizer/__init__.py`): TransformerEngine's FusedAdam,
else apex's, else torch's `AdamW`/`Adam` with `USING_PYTORCH_OPTIMIZER = True`. Torch Adam keeps a per-param
'step' tensor that megatron's DistributedOptimizer checkpoint code mishandles (three wrappers, rows
"DistributedOptimizer.*" of the table in `recurdepth/compat/__init__.py`). That fallback runs on every machine
without TE/apex: always on CPU, and on GPUs where neither is installed, so the fix is selected by megatron's
own flag, not by the device.

Call :func:`apply_optimizer_fix` once per process before the optimizer's first checkpoint save or load (it is
idempotent; `apply_cpu_compat` calls it too). It patches nothing when megatron uses a fused Adam.
"""

from __future__ import annotations

import functools
import importlib

import torch

from recurdepth.compat.version import check_megatron_version

__all__ = ["apply_optimizer_fix", "is_applied", "uses_fallback_optimizer"]

_WHAT = "recurdepth's optimizer-state fix"
_MARK = "_recurdepth_optimizer_fix"  # set on every wrapper, so re-applying never wraps twice
_APPLIED = False


def is_applied() -> bool:
    """Whether :func:`apply_optimizer_fix` has patched this process."""
    return _APPLIED


def uses_fallback_optimizer() -> bool:
    """Whether megatron-core's optimizers use torch Adam (neither TransformerEngine's nor apex's fused Adam was
    importable): megatron's own decision, `megatron.core.optimizer.USING_PYTORCH_OPTIMIZER`."""
    optimizer = importlib.import_module("megatron.core.optimizer")
    return bool(getattr(optimizer, "USING_PYTORCH_OPTIMIZER", False))


def apply_optimizer_fix() -> bool:
    """Wrap DistributedOptimizer's checkpoint methods for torch Adam's per-param 'step' (module docstring).
    Returns True once patched, False when megatron uses a fused Adam (nothing to fix). Idempotent. Raises
    CompatError for an untested megatron-core (RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1: a warning)."""
    global _APPLIED
    check_megatron_version(_WHAT)
    if _APPLIED:
        return True
    if not uses_fallback_optimizer():
        return False
    dist_opt = importlib.import_module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    # megatron: state_dict() asserts a single 'step' in the (empty) state of a fresh optimizer;
    # without: sharded_state_dict(is_loading=True) fails with a bare AssertionError.
    _wrap_method(dist_opt, "sharded_state_dict", _init_state_before_loading)
    # megatron: copies every state key from the loaded param state, 'step' included, which is the
    # stale local value (dp_reshardable) or missing (fully_reshardable: KeyError 'step'), into fp32
    # main params that may be views of leaf params (RuntimeError); without: wrong resume or a crash.
    _wrap_method(dist_opt, "_set_main_param_and_optimizer_states", _set_states_except_step)
    # megatron: load_state_dict() puts ONE 'step' tensor into every param's state and torch Adam
    # increments it once per param; without: after a resume Adam's bias correction silently drifts.
    _wrap_method(dist_opt, "load_state_dict", _unshare_steps_after_load)
    _APPLIED = True
    return True


def _wrap_method(cls, name, make_wrapper):
    """Replace ``cls.name`` by ``make_wrapper(original)``, once."""
    original = getattr(cls, name)
    if not getattr(original, _MARK, False):
        wrapper = functools.wraps(original)(make_wrapper(original))
        setattr(wrapper, _MARK, True)
        setattr(cls, name, wrapper)


def _init_state_before_loading(sharded_state_dict):
    def wrapper(self, model_sharded_state_dict=None, is_loading=False, *args, **kwargs):
        if is_loading and not self.optimizer.state:
            # megatron's helper takes one zero-grad step (AdamW decays params): keep params as is
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            saved = [p.detach().clone() for p in params]
            self._init_optimizer_states_with_dummy_values()
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
        return sharded_state_dict(self, model_sharded_state_dict or {}, is_loading, *args, **kwargs)

    return wrapper


def _set_states_except_step(set_states):
    def wrapper(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return set_states(self, model_param, tensors)  # no torch 'step' in that state
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        with torch.no_grad():
            for key, tensor in {"param": main_param, **self.optimizer.state[main_param]}.items():
                if key != "step":  # restored from param_groups by load_state_dict()
                    tensor.copy_(tensors[key])

    return wrapper


def _unshare_steps_after_load(load_state_dict):
    def wrapper(self, state_dict):
        result = load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    return wrapper
