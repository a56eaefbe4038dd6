"""Run megatron-core 0.16.x on CPU with the gloo backend.

Call :func:`apply_cpu_compat` once, before megatron is *used* (importing megatron first is fine:
the patches rebind module globals and class attributes, which megatron looks up at call time).
It does nothing when CUDA is available, unless ``force=True``.

The patches are global replacements on purpose: a ``TorchFunctionMode`` does not work, because
the mode stack is empty inside autograd backward and in other threads (it crashed in MoE backward).

Patches, all applied only without CUDA (or with force=True):

  patch                                   what megatron assumes -> what breaks without the patch
  --------------------------------------  ---------------------------------------------------------
  torch.cuda.current_device() -> 'cpu'    returns the allocation device -> every factory call with
                                          device=torch.cuda.current_device() raises
  torch.cuda.synchronize, empty_cache     a CUDA context -> pipeline p2p, checkpoint save/load raise
    -> no-ops
  torch.cuda.Stream, Event,               side streams -> DDP overlap_grad_reduce and the MoE
    current_stream, default_stream,         alltoall dispatcher raise (CPU ops run in order, so
    stream() -> inert stand-ins             waiting/recording has nothing to do)
  torch.cuda[.random].get_rng_state,      a device generator -> seeding and the RNG tracker raise;
    set_rng_state, manual_seed              merely skipping them silently changes results. On CPU
    -> the CPU default generator            every random op draws from the default generator
  Tensor.cuda(), Tensor.pin_memory()      GPU copies / pinned buffers (tied embeddings in PP,
    -> return the tensor itself             checkpoint exchange, grad-scaler load) -> raise
  `torch` global of _CUDA_LITERAL_MODULES device='cuda' literals (optimizer scalars, clip_grads,
    -> a torch whose factory functions      schedules' token counter, causal masks, checkpoint
    map CUDA devices to CPU and drop        exchange, MoE aux-loss tracker) -> raise. The real torch
    pin_memory=True                         is not touched
  'torch.cuda.FloatTensor' (Half, BF16)   Tensor.type() checks -> both optimizers and clip_grads
    constants in _TENSOR_TYPE_CHECK_        reject CPU parameters
    MODULES -> 'torch.FloatTensor' ...
  tensor_parallel.random._get/_set_cuda_  torch.cuda.default_generators -> tracker fork() and
    rng_state -> CPU generator state        activation checkpointing raise. Real state: streams are
                                            deterministic and get/set restores them exactly
  log filter on tensor_parallel.random    separate CPU and device generators -> with one generator
                                            every fork() that draws logs a false "CPU RNG state
                                            changed within GPU RNG context" warning
  DistributedOptimizer, 3 wrappers        torch Adam (the optimizer without apex/TE, i.e. always
                                          on CPU) keeps a per-param 'step' that the checkpoint code
                                          mishandles: (a) sharded_state_dict(is_loading=True) of a
                                          fresh optimizer fails (state_dict() asserts on the empty
                                          state) -> state is initialised first, params untouched;
                                          (b) the loaded param state copies a stale 'step' back
                                          (dp_reshardable; fully_reshardable: KeyError 'step') and
                                          writes fp32 main params, views of leaf params, with grad
                                          mode on (RuntimeError) -> 'step' is left to
                                          load_state_dict, copies run under no_grad; (c)
                                          load_state_dict gives all params ONE 'step' tensor, which
                                          Adam advances once per param -> each gets its own copy.
                                          Without (b)/(c) a resumed run silently drifts
  moe_utils.te_general_gemm = None        bound only by a successful TE import -> NameError in
                                          every MoE router forward
  token_dispatcher.maybe_move_tensor_to_  moves split sizes to host only `if tensor.is_cuda` ->
    cpu -> always converts (numpy if asked) they stay tensors; all_to_all_single raises TypeError

Not covered: TransformerEngine/apex/fused kernels, CUDA graphs, megatron FSDP, NCCL user
buffers, the async checkpoint *persistent* worker (calls torch.cuda.set_device). Not a CPU
issue but worth knowing: the distributed optimizer's default checkpoint format in 0.16,
'fully_sharded_model_space', raises "ShardedTensor.flattened_range is not supported."; pass
metadata={'distrib_optim_sharding_type': 'dp_reshardable'} (or 'fully_reshardable').
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import types
import warnings

import torch

__all__ = ["TESTED_MEGATRON_VERSIONS", "CompatError", "apply_cpu_compat", "is_applied"]

TESTED_MEGATRON_VERSIONS: tuple[str, ...] = ("0.16.0", "0.16.1")

_ALLOW_UNTESTED_ENV = "RECURDEPTH_ALLOW_UNTESTED_MEGATRON"
_CPU = torch.device("cpu")
_APPLIED = False
_MARK = "_recurdepth_cpu_compat"  # set on every wrapper, so re-applying never wraps twice

# Megatron modules whose code passes device='cuda' to torch factory functions.
_CUDA_LITERAL_MODULES = (
    "megatron.core.utils",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.tensor_parallel.data",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.rerun_state_machine",
)
# Megatron modules whose code compares Tensor.type() with CUDA type names.
_TENSOR_TYPE_CHECK_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
)
_CPU_TYPE_NAMES = {
    "torch.cuda.FloatTensor": "torch.FloatTensor",
    "torch.cuda.HalfTensor": "torch.HalfTensor",
    "torch.cuda.BFloat16Tensor": "torch.BFloat16Tensor",
}
_TORCH_FACTORIES = (
    "tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "linspace", "eye",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand", "randn", "randint", "randperm",
    "empty_strided",
)  # fmt: skip


class CompatError(RuntimeError):
    """The CPU compatibility layer cannot be applied (the message is one line: cause and fix)."""


def is_applied() -> bool:
    """Whether :func:`apply_cpu_compat` has patched this process."""
    return _APPLIED


def apply_cpu_compat(force: bool = False) -> bool:
    """Patch megatron-core for CPU/gloo. Returns True if patches were applied (or already applied),
    False if CUDA is available (then nothing is patched) unless force=True. Idempotent. Raises
    CompatError naming the installed version and the tested ones if megatron-core's version is not
    in TESTED_MEGATRON_VERSIONS (env var RECURDEPTH_ALLOW_UNTESTED_MEGATRON=1 downgrades that to a
    warning).

    ``force=True`` patches even when CUDA is present (megatron then allocates on CPU). The version
    is checked only when patching; nothing is patched if the check fails.
    """
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _check_megatron_version()
    _patch_torch_cuda()
    _patch_tensor_methods()
    _patch_megatron()
    _APPLIED = True
    return True


# --------------------------------------------------------------------------------------------
# version gate


def _megatron_version() -> str:
    try:
        from megatron.core import package_info
    except ImportError as exc:
        raise CompatError(
            f"megatron-core is not importable ({exc}); install megatron-core=="
            f"{TESTED_MEGATRON_VERSIONS[-1]}"
        ) from None
    return str(package_info.__version__)


def _check_megatron_version() -> None:
    version = _megatron_version()
    if version.split("+")[0] in TESTED_MEGATRON_VERSIONS:
        return
    msg = (
        f"megatron-core {version} is untested with recurdepth's CPU patches (tested: "
        f"{', '.join(TESTED_MEGATRON_VERSIONS)}); install megatron-core=="
        f"{TESTED_MEGATRON_VERSIONS[-1]}, or set {_ALLOW_UNTESTED_ENV}=1 to try anyway"
    )
    if os.environ.get(_ALLOW_UNTESTED_ENV) == "1":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return
    raise CompatError(msg)


# --------------------------------------------------------------------------------------------
# torch.cuda and torch.Tensor (global; reached only when CUDA is absent or force=True)


class _CpuEvent:
    """Inert torch.cuda.Event: CPU work is synchronous, so every event has completed."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _CpuStream:
    """Inert torch.cuda.Stream: CPU ops run in program order on the calling thread."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = _CpuStream()


def _cpu_get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    torch.default_generator.manual_seed(int(seed))  # not torch.manual_seed: it calls back here


def _current_device():
    return _CPU


def _synchronize(device=None):
    pass


def _empty_cache():
    pass


def _current_stream(device=None):
    return _DEFAULT_STREAM


def _stream_context(stream=None):
    return contextlib.nullcontext()


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # megatron: torch.cuda.current_device() is the allocation device; without: factories raise.
    cuda.current_device = _current_device
    # megatron: waits for / frees GPU memory (p2p, checkpointing, DDP); without: raises.
    cuda.synchronize = _synchronize
    cuda.empty_cache = _empty_cache
    # megatron: side streams + events (DDP overlap_grad_reduce, MoE alltoall d2h); without: raises.
    cuda.Stream = _CpuStream
    cuda.Event = _CpuEvent
    cuda.current_stream = _current_stream
    cuda.default_stream = _current_stream
    cuda.stream = _stream_context
    # megatron: device RNG get/set/seed (tracker, checkpoint RNG state); without: raises, and
    # skipping instead silently changes results. On CPU the default generator is the device one.
    for namespace in (cuda, cuda.random):
        namespace.get_rng_state = _cpu_get_rng_state
        namespace.set_rng_state = _cpu_set_rng_state
        namespace.manual_seed = _cpu_manual_seed


def _tensor_cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
    return self


def _tensor_pin_memory(self, device=None):
    return self


def _patch_tensor_methods() -> None:
    # megatron: .cuda() on tied-embedding weights (PP), checkpoint exchange buffers, grad-scaler
    # state; without: AssertionError "Torch not compiled with CUDA enabled".
    torch.Tensor.cuda = _tensor_cuda
    # megatron: pinned host buffers for async copies; without: "Cannot access accelerator device".
    torch.Tensor.pin_memory = _tensor_pin_memory


# --------------------------------------------------------------------------------------------
# megatron module globals and classes


def _as_cpu_device(device):
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return _CPU  # an int device is a CUDA ordinal
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _as_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by megatron modules that hard-code device='cuda': its factory functions
    map a CUDA device to CPU; every other attribute is the real torch's (torch.compile copes)."""

    def __init__(self):
        super().__init__("torch", "torch whose factory functions map CUDA devices to CPU")
        for name in _TORCH_FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _replace_str_consts(code: types.CodeType, mapping: dict) -> types.CodeType:
    def convert(const):
        if isinstance(const, str):
            return mapping.get(const, const)
        if isinstance(const, (tuple, frozenset)):  # `x in ['a', 'b']` compiles to a tuple
            return type(const)(convert(c) for c in const)
        if isinstance(const, types.CodeType):  # nested functions, comprehensions
            return _replace_str_consts(const, mapping)
        return const

    return code.replace(co_consts=tuple(convert(c) for c in code.co_consts))


def _functions_defined_in(module):
    """The plain functions defined in ``module``, including methods and properties of its
    classes (decorators unwrapped)."""
    found = {}

    def visit(obj):
        obj = getattr(obj, "__func__", obj)  # staticmethod / classmethod
        while hasattr(obj, "__wrapped__"):
            obj = obj.__wrapped__
        if isinstance(obj, types.FunctionType) and obj.__module__ == module.__name__:
            found[id(obj)] = obj

    for obj in list(vars(module).values()):
        visit(obj)
        if isinstance(obj, type) and obj.__module__ == module.__name__:
            for attr in vars(obj).values():
                accessors = (attr.fget, attr.fset, attr.fdel) if isinstance(attr, property) else ()
                for f in accessors or (attr,):
                    visit(f)
    return list(found.values())


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_RNG_FORK_WARNING_FILTER = _DropMessage("CPU RNG state changed within GPU RNG context")


def _tracker_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _tracker_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _move_to_host(tensor, as_numpy=False, record_stream=False):
    if torch.is_tensor(tensor):
        tensor = tensor.cpu()
        return tensor.numpy() if as_numpy else tensor
    return tensor


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


def _patch_megatron() -> None:
    # megatron: device='cuda' literals in factory calls; without: "Torch not compiled with CUDA".
    torch_on_cpu = _TorchOnCpu()
    for name in _CUDA_LITERAL_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = torch_on_cpu

    # megatron: optimizers / clip_grads accept params only if .type() is a torch.cuda.* name;
    # without: "Wrapped parameters must be one of torch.cuda.FloatTensor, ..." and assertions.
    for name in _TENSOR_TYPE_CHECK_MODULES:
        for fn in _functions_defined_in(importlib.import_module(name)):
            fn.__code__ = _replace_str_consts(fn.__code__, _CPU_TYPE_NAMES)

    # megatron: the RNG tracker reads/writes torch.cuda.default_generators[idx]; without: raises.
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _tracker_get_rng_state
    random._set_cuda_rng_state = _tracker_set_rng_state
    # megatron: fork() warns if the CPU RNG moved inside a device-RNG fork; on CPU they are one
    # generator; without: a false warning on every fork that draws random numbers.
    logging.getLogger(random.__name__).addFilter(_RNG_FORK_WARNING_FILTER)

    # Without apex/TE (always on CPU) DistributedOptimizer wraps torch Adam, whose per-param 'step'
    # state megatron's checkpoint code mishandles:
    distrib_optimizer = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    dist_opt = distrib_optimizer.DistributedOptimizer
    # megatron: state_dict() asserts a single 'step' in the (empty) state of a fresh optimizer;
    # without: sharded_state_dict(is_loading=True) fails with a bare AssertionError.
    _wrap_method(dist_opt, "sharded_state_dict", _init_state_before_loading)
    # megatron: copies every state key from the loaded param state, 'step' included, which is the
    # stale local value (dp_reshardable) or missing (fully_reshardable: KeyError 'step'), into fp32
    # main params that are views of leaf params (RuntimeError); without: wrong resume or a crash.
    _wrap_method(dist_opt, "_set_main_param_and_optimizer_states", _set_states_except_step)
    # megatron: load_state_dict() puts ONE 'step' tensor into every param's state and torch Adam
    # increments it once per param; without: after a resume Adam's bias correction silently drifts.
    _wrap_method(dist_opt, "load_state_dict", _unshare_steps_after_load)

    # megatron: router_gating_linear tests `te_general_gemm is not None`, a name bound only by a
    # successful TE import; without: NameError in every MoE router forward.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # megatron: split sizes reach the host only `if tensor.is_cuda`; without: they stay tensors and
    # the alltoall dispatcher's all_to_all_single raises TypeError.
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    dispatcher.maybe_move_tensor_to_cpu = _move_to_host
