"""The shape of the package: an import graph without cycles, no private name imported
across modules, and curvature strategies that are peers (none imports another)."""

from __future__ import annotations

import ast
from pathlib import Path

import fastinf
from fastinf.config import STRATEGY_NAMES
from fastinf.curvature import STRATEGIES

ROOT = Path(fastinf.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module under fastinf/."""
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(["fastinf", *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported fastinf module, imported names) for every import in the file, at any
    depth (function-level imports included: they close cycles too)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [alias.name for alias in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for sub in submodules:
                found.append((sub, []))
            if target in modules:
                found.append((target, [n for n in names if f"{target}.{n}" not in modules]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name in modules]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _ in _imports(name, path, modules)} - {name}
        for name, path in modules.items()
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # A package's __init__ importing its submodules is how packages are built; the
            # reverse (a submodule importing its package's namespace) is refused below.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state.get(nxt) is None and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = _graph()
    assert len(graph) > 30 and "fastinf.curvature.ekfac" in graph
    assert _cycle(graph) is None, " → ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_private_name_is_imported_across_modules():
    modules = _modules()
    offenders = [
        f"{name} imports {target}.{imported}"
        for name, path in modules.items()
        for target, names in _imports(name, path, modules)
        for imported in names
        if imported.startswith("_") and target != name
    ]
    assert offenders == []


def test_no_module_imports_from_its_own_package_namespace():
    graph = _graph()
    offenders = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        for target in targets
        if name.startswith(target + ".")
    ]
    assert offenders == []


def test_curvature_strategies_are_registered_peers():
    assert sorted(STRATEGIES) == sorted(STRATEGY_NAMES)
    graph = _graph()
    strategy_modules = {f"fastinf.curvature.{name}" for name in STRATEGIES}
    assert strategy_modules <= set(graph)
    for module in strategy_modules:
        assert graph[module] & strategy_modules == set(), module
