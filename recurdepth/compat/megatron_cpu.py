"""Run megatron-core 0.16.x on CPU with the gloo backend.

Call :func:`apply_cpu_compat` once, before megatron is *used* (importing megatron first is fine:
the patches rebind module globals and class attributes, which megatron looks up at call time).
It does nothing when CUDA is available, unless ``force=True``.

The patches are global replacements on purpose: a ``TorchFunctionMode`` does not work, because
the mode stack is empty inside autograd backward and in other threads (it crashed in MoE backward).

The patches, each with what megatron assumes and what breaks without it, are rows of the one table of
megatron patches in `recurdepth/compat/__init__.py` (`PATCHES`, module "megatron_cpu"); all apply only
without CUDA (or with force=True), after the one version gate (`recurdepth.compat.version`). The
DistributedOptimizer Adam-'step' fix is `recurdepth.compat.optimizer` (megatron's fallback optimizer runs on
GPUs without TransformerEngine/apex too); `apply_cpu_compat` applies it as well.

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
import types

import torch

from recurdepth.compat.optimizer import apply_optimizer_fix
from recurdepth.compat.version import (
    ALLOW_UNTESTED_ENV as _ALLOW_UNTESTED_ENV,  # noqa: F401 - kept for callers
    TESTED_MEGATRON_VERSIONS,
    CompatError,
    check_megatron_version,
    megatron_version,
)

__all__ = ["TESTED_MEGATRON_VERSIONS", "CompatError", "apply_cpu_compat", "is_applied"]

_WHAT = "recurdepth's CPU patches"
_CPU = torch.device("cpu")
_APPLIED = False

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
    is checked on every call that patches or has patched; nothing is patched if the check fails.
    """
    global _APPLIED
    if not _APPLIED and torch.cuda.is_available() and not force:
        return False
    _check_megatron_version()
    if _APPLIED:
        return True
    _patch_torch_cuda()
    _patch_tensor_methods()
    _patch_megatron()
    _APPLIED = True
    return True


# --------------------------------------------------------------------------------------------
# version gate: the one in recurdepth.compat.version (names kept for callers and tests)

_megatron_version = megatron_version


def _check_megatron_version() -> None:
    check_megatron_version(_WHAT)


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

    # megatron's fallback (torch) Adam, always the optimizer on CPU: its per-param 'step' checkpoint state
    apply_optimizer_fix()

    # megatron: router_gating_linear tests `te_general_gemm is not None`, a name bound only by a
    # successful TE import; without: NameError in every MoE router forward.
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    # megatron: split sizes reach the host only `if tensor.is_cuda`; without: they stay tensors and
    # the alltoall dispatcher's all_to_all_single raises TypeError.
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    dispatcher.maybe_move_tensor_to_cpu = _move_to_host
