"""megatron's kernel fusions on CPU: dropped as megatron is imported.

megatron-core decorates ~40 small functions (bias+activation, norms, the MoE router's bias, ...) with
`megatron.core.jit.jit_fuser`, which is `torch.compile` on torch >= 2.2. Decorating imports torch's dynamo and
inductor, about 1.5-2 s of every process that imports megatron, and on CPU nothing gains from it: the first call
of each would start an inductor C++ compile. `install()` (called by `recurdepth/__init__.py`, torch-free) puts a
one-shot import hook in front of `megatron.core.jit`; right after that module runs, and before any megatron module
binds `jit_fuser`, `disable_jit_fuser_on_cpu` calls megatron's own `disable_jit_fuser()` when CUDA is absent, so
every fused function is its plain eager body (the same math). With CUDA the fusions stay.
RECURDEPTH_MEGATRON_JIT=1 keeps them on CPU too; =0 drops them on GPU too.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

JIT_ENV = "RECURDEPTH_MEGATRON_JIT"
_MODULE = "megatron.core.jit"


def disable_jit_fuser_on_cpu(module, force: bool = False) -> bool:
    """On CPU (or with `force`, or RECURDEPTH_MEGATRON_JIT=0): `module.disable_jit_fuser()` (`module` is
    megatron.core.jit, just executed). Returns whether the fusions were dropped."""
    from recurdepth.compat.version import check_megatron_version

    check_megatron_version("recurdepth's jit-fusion switch")
    import torch

    choice = os.environ.get(JIT_ENV)
    drop = force or choice == "0" or (choice != "1" and not torch.cuda.is_available())
    if drop:
        module.disable_jit_fuser()
    return drop


class _JitHook(importlib.abc.MetaPathFinder):
    """Finds megatron.core.jit with the other finders, and runs `disable_jit_fuser_on_cpu` right after it."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)  # one shot: megatron.core.jit is imported once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            disable_jit_fuser_on_cpu(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Put the hook in front of the import system, unless megatron.core.jit was imported already."""
    if _MODULE in sys.modules or any(isinstance(f, _JitHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _JitHook())


def is_applied() -> bool:
    """Whether megatron's jit_fuser is its no-op decorator in this process."""
    jit = sys.modules.get(_MODULE)
    return jit is not None and getattr(jit, "jit_fuser", None) is getattr(jit, "noop_decorator", object())
