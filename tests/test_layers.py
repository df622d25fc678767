"""The library's layers: the core (``retrac_lib``) imports neither ``retrac_lib.evaluation`` nor
``retrac_lib.book`` nor their plotting packages, not on import and not inside a function either,
so it works without them; and no two modules import each other in a circle (ARCHITECTURE.md,
"Layers")."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from book_tools import absolute_imports

import retrac_lib

pytestmark = pytest.mark.version_independent   # not run again against the wheel (conftest.py)

PACKAGE = Path(retrac_lib.__file__).resolve().parent
UPPER = ("retrac_lib.evaluation", "retrac_lib.book")
BOOK_PACKAGES = ("matplotlib", "ipywidgets")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_core(name: str) -> bool:
    return not name.startswith(UPPER) and name != "retrac_lib.__main__"


def test_importing_the_core_loads_neither_evaluation_nor_book_nor_their_packages():
    core = sorted(name for name in _modules() if _is_core(name))
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {core!r}:
            importlib.import_module(name)
        print(sorted(m for m in sys.modules if m.split(".")[0] in {BOOK_PACKAGES!r}
                     or m.startswith({UPPER!r})))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing the core imported {out.stdout.strip()}"


def test_the_core_never_imports_the_book_packages_even_in_a_function():
    """What importing the core cannot show: an import inside a function of the core."""
    found = {}
    for name, path in _modules().items():
        if _is_core(name):
            tops = {n.split(".")[0] for n in absolute_imports(path.read_text())}
            if tops & set(BOOK_PACKAGES):
                found[name] = sorted(tops & set(BOOK_PACKAGES))
    assert not found, f"core modules import the book's packages: {found}"


def _imports(name: str, path: Path, modules) -> set[str]:
    """The modules ``name`` imports anywhere in its file (in functions too), within the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(base) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> modules it imports) as a path, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_names_the_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_imports_itself_through_others():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_never_imports_evaluation_or_book():
    modules = _modules()
    upward = {name: sorted(t for t in _imports(name, path, modules) if t.startswith(UPPER))
              for name, path in modules.items() if _is_core(name)}
    # The command line's study command loads the scale ladder when it runs (ARCHITECTURE.md).
    allowed = {"retrac_lib.cli": ["retrac_lib.evaluation.study"]}
    upward = {k: v for k, v in upward.items() if v and allowed.get(k) != v}
    assert not upward, f"core modules import evaluation or book: {upward}"


def test_evaluation_never_imports_book():
    modules = _modules()
    upward = {name: sorted(t for t in _imports(name, path, modules) if t.startswith(UPPER[1]))
              for name, path in modules.items() if name.startswith(UPPER[0])}
    assert not any(upward.values()), f"evaluation imports the book: {upward}"
