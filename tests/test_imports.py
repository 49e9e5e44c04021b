"""Import hygiene: no import cycles among the project's modules, lower layers (backbones, heads,
datamodules) import nothing of workbench but its base modules (errors, atomic files, the checkpoint reader),
and modules import alone.

The import graph is read statically with :mod:`ast` (fast: no module is executed). Module-level
imports, ``if TYPE_CHECKING:`` ones included (a cycle for the type checker and the reader), must not
form cycles; imports inside functions are kept apart as *lazy*: they do not close a cycle, but they
count for the layer rule."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "backbones", "heads", "datamodules")
LOWER_LAYERS = ("backbones", "heads", "datamodules")
WORKBENCH_BASE = {"workbench", "workbench.errors", "workbench.atomic", "workbench.checkpoints"}


@dataclass
class ImportGraph:
    """Project-internal imports: ``module -> imported modules``, at module level or in functions."""

    modules: set[str]
    module_level: dict[str, set[str]] = field(default_factory=dict)
    lazy: dict[str, set[str]] = field(default_factory=dict)


def module_name(path: Path) -> str:
    """``datamodules/normalize.py`` → ``datamodules.normalize``; ``heads/__init__.py`` → ``heads``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """Absolute names an import statement may load: the module, and ``module.name`` for each
    ``from module import name`` (a submodule, when it is one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def resolve(name: str, modules: set[str]) -> str | None:
    """The project module ``name`` loads (its longest known prefix), None outside the project."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def read_imports(tree: ast.Module, importer: str, is_package: bool) -> tuple[set[str], set[str]]:
    """``(module level, lazy)`` imported names of one module's syntax tree."""
    module_level: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else module_level).update(imported_names(child, importer, is_package))
            else:
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return module_level, lazy


@functools.cache
def project_graph() -> ImportGraph:
    """The import graph of every module of :data:`PACKAGES`."""
    files = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
    graph = ImportGraph(set(files))
    for name, path in files.items():
        module_level, lazy = read_imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        graph.module_level[name] = {resolve(n, graph.modules) for n in module_level} - {None, name}
        graph.lazy[name] = {resolve(n, graph.modules) for n in lazy} - {None, name}
    return graph


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(cycles)


def test_cycle_finder_finds_a_planted_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    assert find_cycles({**edges, "c": {"d"}}) == []


def test_graph_reader_keeps_lazy_imports_apart() -> None:
    source = (
        "from typing import TYPE_CHECKING\nimport datamodules.splits\nfrom . import bands\n"
        "if TYPE_CHECKING:\n    from datamodules.segmentation import X\n"
        "class A:\n    def f(self):\n        from workbench.cli import main\n"
    )
    module_level, lazy = read_imports(ast.parse(source), "datamodules.layouts", is_package=False)
    modules = project_graph().modules
    assert {resolve(n, modules) for n in module_level} - {None} == {
        "datamodules", "datamodules.splits", "datamodules.bands", "datamodules.segmentation"}
    assert {resolve(n, modules) for n in lazy} == {"workbench.cli"}


def test_no_import_cycles() -> None:
    graph = project_graph()
    assert len(graph.modules) > 60  # every package was read
    cycles = find_cycles(graph.module_level)
    assert not cycles, f"import cycles among module-level imports: {cycles}"


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_import_only_workbench_base_modules(layer: str) -> None:
    graph = project_graph()
    bad = {
        module: sorted(t for t in graph.module_level[module] | graph.lazy[module]
                       if t.split(".")[0] == "workbench" and t not in WORKBENCH_BASE)
        for module in graph.modules if module.split(".")[0] == layer
    }
    assert not {m: t for m, t in bad.items() if t}, f"{layer} imports workbench beyond its base modules"


def test_predict_command_imports_alone() -> None:
    """A fresh interpreter imports ``workbench.predict.command`` first (it reaches datamodules, tasks
    and the config; a cycle would show up as ImportError on a partially initialised module). One
    interpreter only: each costs seconds of torch and lightning imports."""
    done = subprocess.run([sys.executable, "-c", "import workbench.predict.command"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
