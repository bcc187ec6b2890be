"""Import layering: no import cycle between quadc.lora and quadc.quant (quant sits below lora: it quantizes
tensors and never reads LoRA files), and no library module imports the test fixtures."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it installs as (pyproject's package-dir).
PACKAGE_DIRS = {"quadc": "quadc", "passes": "quadc.passes", "targets": "quadc.targets"}
FIXTURE_MODULES = {"quadc.testing_lora", "quadc.testing"}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Modules imported at run time anywhere in ``tree`` (function bodies too, ``if TYPE_CHECKING:`` not),
    with the packages whose ``__init__`` those imports execute."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    with_parents = set()
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {n for n in with_parents if n in known}


@pytest.fixture(scope="module")
def import_graph() -> nx.DiGraph:
    modules = _modules()
    known = set(modules)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for target in _imports(tree, name, path.name == "__init__.py", known):
            if target != name:
                graph.add_edge(name, target)
    return graph


def _in(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_quant_never_reaches_lora(import_graph):
    """No chain of run-time imports leads from quadc.quant to quadc.lora, so the two cannot form a cycle."""
    quant = [m for m in import_graph if _in("quadc.quant", m)]
    lora = {m for m in import_graph if _in("quadc.lora", m)}
    for start in quant:
        reached = nx.descendants(import_graph, start) & lora
        if reached:
            path = nx.shortest_path(import_graph, start, sorted(reached)[0])
            pytest.fail(f"{' -> '.join(path)}: quadc.quant must not import quadc.lora (lora imports quant)")


def test_no_cycle_between_lora_and_quant(import_graph):
    """With each of the two packages taken as one node (a module of one importing any module of the other
    counts), they are not on a common cycle."""
    def node(module: str) -> str:
        return next((p for p in ("quadc.lora", "quadc.quant") if _in(p, module)), module)

    packages = nx.DiGraph((node(a), node(b)) for a, b in import_graph.edges if node(a) != node(b))
    both_ways = nx.has_path(packages, "quadc.lora", "quadc.quant") and nx.has_path(packages, "quadc.quant", "quadc.lora")
    assert not both_ways, (f"import cycle: {' -> '.join(nx.shortest_path(packages, 'quadc.lora', 'quadc.quant'))}"
                           f" and {' -> '.join(nx.shortest_path(packages, 'quadc.quant', 'quadc.lora'))}")


def test_the_graph_sees_lazy_imports(import_graph):
    """The check is only worth something if it sees imports inside functions (lora.pack imports quant there)."""
    assert import_graph.has_edge("quadc.lora.pack", "quadc.quant.affine")
    assert import_graph.has_edge("quadc.passes.quant_plan", "quadc.lora.pack")


def test_no_library_module_imports_the_fixtures(import_graph):
    importers = sorted((m, f) for m, f in import_graph.edges
                       if f in FIXTURE_MODULES and m not in FIXTURE_MODULES)
    assert not importers, f"library modules import test fixtures: {importers}"


@pytest.mark.parametrize("code", [
    # each package imports on its own in a fresh interpreter; quant loads nothing of lora
    "import quadc.quant, quadc.quant.planner, sys; "
    "assert not [m for m in sys.modules if m.startswith('quadc.lora')], 'quant loaded lora'",
    "import quadc.lora, quadc.lora.pack, quadc.lora.slots",
    # the whole library, CLI, passes and targets included, loads without the fixtures
    "import pkgutil, sys, quadc, quadc.passes, quadc.targets\n"
    "for mod in pkgutil.walk_packages(quadc.__path__, 'quadc.'):\n"
    "    if mod.name not in ('quadc.testing', 'quadc.testing_lora') and not mod.name.startswith('quadc.export'):\n"
    "        __import__(mod.name)\n"
    "assert 'quadc.testing_lora' not in sys.modules and 'quadc.testing' not in sys.modules",
])
def test_fresh_interpreter(code):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
