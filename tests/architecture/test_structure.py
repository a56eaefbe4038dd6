"""The package's structure, checked: no import cycle between recurdepth's modules, and no function assigned to a
built model's instances (every behaviour is a method of a class, so what runs is what the class says)."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "recurdepth"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, modules: dict) -> set[str]:
    """recurdepth modules `name` imports, at top level or inside functions (both run on some path); imports
    under `if TYPE_CHECKING:` never run and are left out. `from a import b` is an edge to `a.b` when that is a
    module, else to `a` (a package's `__init__` when `a` is a package)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import recurdepth.a.b.c` of an attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_within_the_package():
    modules = _modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert sum(len(v) for v in graph.values()) > 100, "the import graph looks empty: the walker is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def _function_attributes(model) -> list[str]:
    """Instance attributes holding a function that replaces one of the class's attributes (a patched `forward`,
    `initial_state`, `_forward_impl`) or was written by recurdepth (a lambda or closure of ours). Functions a
    library stores at construction under names its class does not define (megatron's `mlp.activation_func`
    = the config's activation) are the library's own wiring and pass."""
    bad = []
    for mod_name, module in model.named_modules():
        for key, value in vars(module).items():
            if key == "_compiled_call_impl":  # torch's own nn.Module.compile() (train.compile)
                continue
            if not callable(value) or isinstance(value, type) or hasattr(value, "parameters") \
                    or type(value).__name__ == "Tensor":
                continue
            func = getattr(value, "func", value)  # functools.partial
            shadows = hasattr(type(module), key)
            ours = str(getattr(func, "__module__", "") or "").startswith(("recurdepth", "tests"))
            if shadows or ours:
                bad.append(f"{mod_name or '<model>'}.{key}")
    return bad


@pytest.mark.parametrize("kind", ["lm", "pause", "quiet_star", "coconut"])
def test_no_instance_monkeypatching_in_any_objectives_model(megatron_single_process, kind, tmp_path):
    """Build every objective's model (and objective), run a forward, and check that no module instance holds a
    function attribute (no `model.x = lambda ...`, no replaced `forward`)."""
    import torch

    from recurdepth.config import load_config
    from recurdepth.data.tokenizer import build_tokenizer
    from recurdepth.model.build import build_model
    from recurdepth.model.depth import BackpropWindow
    from recurdepth.objectives import objective_class

    overrides = ["model.hidden_size=32", "model.num_heads=2", "model.prelude_layers=1", "model.core_layers=1",
                 "model.coda_layers=1", "model.seq_length=16", f"objective.kind={kind}"]
    if kind == "quiet_star":
        overrides += ["objective.thought_length=1", "objective.n_ahead=2"]
    cfg = load_config(None, overrides)
    model = build_model(cfg, 300)
    assert _function_attributes(model) == []
    tokenizer = build_tokenizer("byte")
    if kind in ("lm", "quiet_star"):  # their objectives build from any tokenizer; run one micro-batch
        objective = objective_class(kind)(cfg, tokenizer)
        tokens = torch.randint(0, 250, (1, 16))
        mb = types.SimpleNamespace(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(1, 16),
                                   sample_ids=[0], problems=None)
        objective.loss_sum(model, mb, BackpropWindow(2, 1)).backward()
    assert _function_attributes(model) == [], "a forward left function attributes on the model"


def test_the_monkeypatch_check_can_fail(megatron_single_process):
    from recurdepth.config import load_config
    from recurdepth.model.build import build_model

    cfg = load_config(None, ["model.hidden_size=32", "model.num_heads=2", "model.core_layers=1", "model.seq_length=16"])
    model = build_model(cfg, 300)
    model.core["0"].forward = lambda *a: None
    model.initial_state = lambda e, sample_ids=None: e
    assert sorted(_function_attributes(model)) == ["<model>.initial_state", "core.0.forward"]


GROUND = {"recurdepth", "config", "errors", "seeding", "precision", "devices", "atomic", "peak"}  # "recurdepth": __version__
SEAM = {"objectives.base", "objectives.registry"}  # the objectives' torch-free plug-in seam
FRONT = {"infer", "export", "plan", "bench", "sweep", "compare", "cli", "launch", "torchrun", "exits", "__main__"}
# what each folder may import besides itself (docs/architecture.md, "The folders, and what each may import")
ALLOWED = {
    "config": {"errors"} | SEAM, "errors": set(), "seeding": set(), "precision": set(), "devices": set(),
    "atomic": set(), "peak": {"atomic", "precision"},
    "compat": {"errors"},
    "model": GROUND | {"compat"} | SEAM,
    "parallel": GROUND | {"model"},
    "data": GROUND | {"compat"} | SEAM,
    "objectives": GROUND | {"model", "data", "parallel"},
    "distributed": GROUND | {"compat"},
    "train": GROUND | {"compat", "model", "parallel", "data", "objectives", "distributed"},
}


def _unit(module: str) -> str:
    """`recurdepth.objectives.base` -> "objectives.base" when it is part of the seam, else its folder."""
    rest = module.split(".", 1)[1] if "." in module else ""
    if rest in SEAM:
        return rest
    return rest.split(".")[0] if rest else "recurdepth"


def test_each_folder_imports_only_what_the_architecture_allows():
    modules = _modules()
    wrong = []
    for name, path in modules.items():
        unit = _unit(name)
        folder = unit.split(".")[0]
        if folder in FRONT or folder == "recurdepth":
            continue
        allowed = ALLOWED.get(unit, ALLOWED.get(folder))
        if unit in SEAM:
            allowed = {"errors"}
        for target in imports_of(name, path, modules):
            t_unit = _unit(target)
            if t_unit.split(".")[0] == folder and unit not in SEAM:
                continue
            if t_unit not in allowed and t_unit.split(".")[0] not in allowed:
                wrong.append(f"{name} imports {target}")
    assert wrong == [], "\n".join(wrong)


def test_building_the_command_line_imports_neither_torch_nor_megatron():
    """`recurdepth --help`, the light verbs (data, plan, launch, compare, sweep) and every refused command line
    start in well under a second: the parsers import no torch (1-2 s) and no megatron (3-4 s more)."""
    import subprocess
    import sys

    code = ("import sys; from recurdepth.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout
