"""The table of megatron patches (recurdepth.compat.PATCHES) cannot go stale, and every patch sits behind the
one version gate: each row names an existing module, entry point and megatron/torch target; every compat module
that touches megatron calls the gate and has rows; each entry point refuses an untested megatron-core with one
line. Also: the DistributedOptimizer Adam-'step' fix is chosen by megatron's fallback-optimizer flag, not by
CUDA, and compiling the blocks assigns no function to a module instance."""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path

import pytest
import torch

import recurdepth.compat as compat
from recurdepth.compat import PATCHES
from recurdepth.compat.version import ALLOW_UNTESTED_ENV, TESTED_MEGATRON_VERSIONS, CompatError

COMPAT_DIR = Path(compat.__file__).parent
_NOT_PATCH_MODULES = {"__init__", "version"}


def _resolve(dotted: str):
    """The object a dotted name denotes: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _compat_modules() -> list[str]:
    return sorted(p.stem for p in COMPAT_DIR.glob("*.py") if p.stem not in _NOT_PATCH_MODULES)


def _touches_megatron(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "megatron":
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "megatron" for a in node.names):
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("megatron."):
            return True  # importlib.import_module("megatron....")
    return False


def _calls_gate(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name == "check_megatron_version":
                return True
    return False


def _entry_points() -> list[tuple[str, str]]:
    return sorted({(p.module, p.entry) for p in PATCHES})


# ------------------------------------------------------------------------------------------------ the table


def test_every_row_names_an_existing_module_entry_point_and_target():
    assert len(PATCHES) >= 20
    for row in PATCHES:
        assert row.module.startswith("recurdepth.compat."), row
        assert all((row.name, row.assumes, row.breaks, row.applies_when)), row
        module = importlib.import_module(row.module)
        assert callable(getattr(module, row.entry, None)), f"{row.module} has no {row.entry}()"
        assert row.targets, row.name
        for target in row.targets:
            _resolve(target)  # raises when megatron or torch renamed it: the row is stale


def test_every_compat_module_that_touches_megatron_calls_the_gate_and_has_rows():
    tabled = {row.module.rsplit(".", 1)[-1] for row in PATCHES}
    touching = []
    for name in _compat_modules():
        tree = ast.parse((COMPAT_DIR / f"{name}.py").read_text())
        if _touches_megatron(tree):
            touching.append(name)
            assert name in tabled, f"recurdepth/compat/{name}.py patches megatron but has no row in PATCHES"
        if name in touching or name in tabled:
            assert _calls_gate(tree), f"recurdepth/compat/{name}.py touches megatron without check_megatron_version()"
    assert {"megatron_cpu", "checkpoint_writer", "optimizer", "compile"} <= set(touching)
    assert tabled <= set(_compat_modules()), "a row names a module that is not in recurdepth/compat/"


def test_the_docstring_is_the_table():
    for row in PATCHES:
        assert f"* {row.name}" in compat.__doc__
    assert compat.table() in compat.__doc__


@pytest.mark.parametrize("module_name,entry", _entry_points())
def test_untested_megatron_refuses_each_entry_point(monkeypatch, module_name, entry):
    from megatron.core import package_info

    module = importlib.import_module(module_name)
    fn = getattr(module, entry)
    params = inspect.signature(fn).parameters.values()
    args = [None for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]  # the gate comes before any argument is used
    kwargs = {"force": True} if any(p.name == "force" for p in params) else {}
    applied_before = module.is_applied() if hasattr(module, "is_applied") else None
    monkeypatch.setattr(package_info, "__version__", "0.99.0")
    monkeypatch.delenv(ALLOW_UNTESTED_ENV, raising=False)
    with pytest.raises(CompatError) as err:
        fn(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg
    assert "0.99.0" in msg and all(v in msg for v in TESTED_MEGATRON_VERSIONS)
    assert f"{ALLOW_UNTESTED_ENV}=1" in msg
    if applied_before is not None:
        assert module.is_applied() == applied_before  # refused before patching anything


# ------------------------------------------------------------------------------- the optimizer-state fix


_FIXED_METHODS = ("sharded_state_dict", "_set_main_param_and_optimizer_states", "load_state_dict")


def _unpatched_distributed_optimizer(monkeypatch):
    """DistributedOptimizer with megatron's own methods for this test (restored afterwards), fix not applied."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from recurdepth.compat import optimizer as fix

    for name in _FIXED_METHODS:
        method = getattr(DistributedOptimizer, name)
        if getattr(method, fix._MARK, False):
            monkeypatch.setattr(DistributedOptimizer, name, method.__wrapped__)
    monkeypatch.setattr(fix, "_APPLIED", False)
    return DistributedOptimizer


def _fixed(cls) -> bool:
    from recurdepth.compat import optimizer as fix

    marks = [getattr(getattr(cls, name), fix._MARK, False) for name in _FIXED_METHODS]
    assert len(set(marks)) == 1, marks  # all three or none
    return marks[0]


@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "no-cuda"])
def test_optimizer_fix_follows_megatrons_fallback_optimizer_not_cuda(monkeypatch, cuda):
    import megatron.core.optimizer as megatron_optimizer

    from recurdepth.compat import optimizer as fix

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dist_opt = _unpatched_distributed_optimizer(monkeypatch)
    # TransformerEngine's or apex's FusedAdam in use: nothing to fix, on any device
    monkeypatch.setattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    assert not fix.uses_fallback_optimizer()
    assert fix.apply_optimizer_fix() is False and not fix.is_applied() and not _fixed(dist_opt)
    # megatron fell back to torch Adam (no TE/apex), GPU or not: fixed, once
    monkeypatch.setattr(megatron_optimizer, "USING_PYTORCH_OPTIMIZER", True)
    assert fix.uses_fallback_optimizer()
    assert fix.apply_optimizer_fix() is True and fix.is_applied() and _fixed(dist_opt)
    wrapped = {name: getattr(dist_opt, name) for name in _FIXED_METHODS}
    monkeypatch.setattr(fix, "_APPLIED", False)
    assert fix.apply_optimizer_fix() is True
    assert {name: getattr(dist_opt, name) for name in _FIXED_METHODS} == wrapped  # never wrapped twice


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: apply_cpu_compat() patches nothing")
def test_cpu_compat_applies_the_optimizer_fix():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from recurdepth.compat import optimizer as fix
    from recurdepth.compat.megatron_cpu import apply_cpu_compat

    assert apply_cpu_compat()
    assert fix.uses_fallback_optimizer()  # no TE/apex on a CPU machine
    assert fix.is_applied() and _fixed(DistributedOptimizer)


# ------------------------------------------------------------------------------------ torch.compile


def test_compiled_model_has_no_function_attributes_on_instances(megatron_single_process):
    from megatron.core.tensor_parallel import RowParallelLinear

    from recurdepth.compat import compile as compile_compat
    from tests.model.test_recurrence import make_model

    _, model = make_model("train.compile=true", dtype=torch.float32)
    compiled = 0
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        for key, value in vars(module).items():
            if not isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
                continue
            if key == "_compiled_call_impl":  # torch's own nn.Module.compile()
                compiled += 1
                continue
            # megatron's constructors copy callables from the TransformerConfig (MLP.activation_func)
            assert value is getattr(config, key, object()), f"{name or 'model'}.{key} = {value!r}"
    assert compiled >= 4  # prelude, 2 core, coda
    assert getattr(RowParallelLinear._forward_impl, compile_compat._MARK, False)  # class-level, not per instance
