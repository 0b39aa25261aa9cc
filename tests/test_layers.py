"""The floors: each folder imports only the floors below it, and no module imports itself in a circle.

Reads the import statements of every module (top-level, inside functions, where the lazy imports
are, and under ``if TYPE_CHECKING:``), so a lazy upward import fails as surely as a top-level one,
and two modules that name each other's types are a circle even if only a type checker follows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Folder -> floors it may import (itself included). The commands (un0_bench/) may import everything.
ALLOWED = {
    "harness": {"harness"},
    "backbones": {"harness", "backbones"},
    "baselines": {"harness", "backbones", "baselines"},
    "un0_impl": {"harness", "backbones", "un0_impl"},
    "training": {"harness", "backbones", "baselines", "un0_impl", "training"},
    "reports": {"harness", "reports"},
    "un0_bench": {"harness", "backbones", "baselines", "un0_impl", "training", "reports", "un0_bench"},
}
FLOORS = set(ALLOWED) - {"un0_bench"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["un0_bench", *parts]) if parts[0] != "un0_bench" else ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, those under ``if TYPE_CHECKING:`` included."""
    out = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "un0_bench":
                out += [(node.lineno, f"un0_bench.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def _floor_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] in FLOORS:
        return "bare:" + parts[0]  # `import harness`: the pre-package name, never valid
    if parts[0] != "un0_bench":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else "un0_bench"


def _sources() -> list[tuple[str, Path]]:
    return [(folder, p) for folder in ALLOWED for p in sorted((ROOT / folder).rglob("*.py"))]


def upward_imports() -> list[str]:
    bad = []
    for folder, path in _sources():
        for line, module in _imports(path):
            floor = _floor_of(module)
            if floor is None:
                continue
            if floor.startswith("bare:") or floor not in ALLOWED[folder]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


def import_cycles() -> list[list[str]]:
    """Cycles in the module import graph (every import: lazy ones in functions and annotation-only ones too)."""
    names = {_module_name(p): p for _, p in _sources()}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps = set()
        for _, module in _imports(path):
            # `from un0_bench.backbones import hf` names a module; `from x.y import Name` names x.y.
            if module in names and module != name:
                deps.add(module)
            elif module.rpartition(".")[0] in names and module.rpartition(".")[0] != name:
                deps.add(module.rpartition(".")[0])
        graph[name] = deps
    # The package __init__ files run when any submodule is imported; an edge into one is not a cycle
    # of the code's own making, so only module -> module edges count.
    packages = {n for n, p in names.items() if p.name == "__init__.py"}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node] - packages):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_floor_imports_a_floor_above_it():
    assert upward_imports() == []


def test_techniques_know_a_backbone_only_through_the_interface_they_are_given():
    # A technique is a transform of a denoiser: weights, configs and the sampler come from the Backbone
    # it is handed. Only the quality references (noise, real digits) are made of one backbone's data.
    users = sorted(f"{path.relative_to(ROOT)}:{line} imports {module}" for folder, path in _sources()
                   if folder == "baselines" and path.name != "references.py"
                   for line, module in _imports(path) if _floor_of(module) == "backbones")
    assert users == []


def test_no_import_circles():
    assert import_cycles() == []


def test_the_checker_catches_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    # A throwaway tree with harness importing a baseline, and two baselines importing each other.
    import tests.test_layers as layers

    for folder in ALLOWED:
        (tmp_path / folder).mkdir()
    (tmp_path / "harness" / "runner.py").write_text("def f():\n    from un0_bench.baselines.a import x\n")
    (tmp_path / "baselines" / "a.py").write_text("from un0_bench.baselines.b import y\nx = 1\n")
    (tmp_path / "baselines" / "b.py").write_text("from un0_bench.baselines.a import x\ny = 2\n")
    (tmp_path / "reports" / "r.py").write_text("import harness.ledger\n")
    # A circle seen only by the type checker (as harness/backbone.py and harness/technique.py once were).
    for a, b in (("backbone", "technique"), ("technique", "backbone")):
        (tmp_path / "harness" / f"{a}.py").write_text(
            f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from un0_bench.harness.{b} import X\n")
    monkeypatch.setattr(layers, "ROOT", tmp_path)
    assert layers.upward_imports() == ["harness/runner.py:2 imports un0_bench.baselines.a",
                                       "reports/r.py:1 imports harness.ledger"]
    assert layers.import_cycles() == [["un0_bench.baselines.a", "un0_bench.baselines.b", "un0_bench.baselines.a"],
                                      ["un0_bench.harness.backbone", "un0_bench.harness.technique",
                                       "un0_bench.harness.backbone"]]


def test_ray_is_imported_in_one_module_only():
    # The optional extra: only the Ray executor imports it (lazily), so everything else works without it.
    users = sorted({str(path.relative_to(ROOT)) for _, path in _sources()
                    for _, module in _imports(path) if module.split(".")[0] == "ray"})
    assert users == ["harness/executors/ray.py"]


#: The instrument's rooms, one an axis (README, "Layout"); only these two modules serve them all from the top.
HARNESS_AXES = {"core", "measuring", "meters", "counters", "running", "executors", "weights", "projection"}
HARNESS_TOP = {"__init__.py", "errors.py", "registry.py"}


def test_the_harness_is_grouped_by_axis_and_the_readme_names_each_room():
    top = {p.name for p in (ROOT / "harness").glob("*.py")}
    folders = {p.name for p in (ROOT / "harness").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert (top, folders) == (HARNESS_TOP, HARNESS_AXES)
    row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `harness/` |"))
    assert sorted(a for a in HARNESS_AXES if f"`{a}/`" not in row) == []
    assert "`training/`" in (ROOT / "README.md").read_text()
