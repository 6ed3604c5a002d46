"""The shape of the code, checked: no import cycle between secateurs' modules, small functions with few
parameters, and a product that speaks of the product (no words about how it was made)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "secateurs"
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 12
PROCESS_WORDS = re.compile(r"\bsessions?\b|\bthe issue\b|\bissue \d+|\bmy decision\b|\bI did not spend\b", re.I)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """secateurs modules a file imports anywhere (top level or inside functions): `from a import b` counts as
    a.b when a.b is a module, else as a."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, set(known)) - {name} for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 50 and graph["secateurs.cli.main"], "the graph was not read"
    assert cycles(graph) == []


def package_of(module: str) -> str:
    """secateurs.storage.loading -> storage; a module at the package root is its own room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def test_the_packages_import_each_other_without_cycle():
    """The layout shows the layers: cli -> pipeline -> methods / recovery / export / evaluation -> criteria,
    planning, surgery, calibration -> storage, adapters -> files, settings, runtime; no arrow runs back up."""
    rooms: dict[str, set[str]] = {}
    for module, imported_modules in import_graph().items():
        rooms.setdefault(package_of(module), set()).update(
            package_of(m) for m in imported_modules if package_of(m) != package_of(module))
    for targets in list(rooms.values()):
        for target in targets:
            rooms.setdefault(target, set())
    assert {"storage", "files", "planning", "surgery", "pipeline"} <= set(rooms)
    assert cycles(rooms) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(PACKAGE.parent), node


def parameter_count(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def test_functions_are_short_and_take_few_parameters():
    long = [f"{p}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)" for p, n in functions()
            if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    many = [f"{p}:{n.lineno} {n.name} ({parameter_count(n)} parameters)" for p, n in functions()
            if parameter_count(n) > MAX_PARAMETERS]
    assert long == [] and many == []


def product_files():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))
    yield from sorted(PACKAGE.rglob("*.py"))
    yield from sorted((ROOT / "benchmarks").glob("*.py"))
    yield from sorted((ROOT / "benchmarks").glob("*.md"))
    yield from sorted((ROOT / "benchmarks" / "results").glob("*.md"))


@pytest.mark.parametrize("path", list(product_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_product_speaks_of_the_product(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if PROCESS_WORDS.search(line)]
    assert hits == []
