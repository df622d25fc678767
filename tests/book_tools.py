"""Shared by the tests: the repository root, the chapters, the scripts in tools/, the imports a
source file makes, and the markdown tables a script prints. A test that imports this module tests
the repository's own files: it stays in the checkout (``.ci/reader-install`` leaves it out of the
installed wheel's run)."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def load_tool(name):
    """Import ``tools/<name>.py`` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def absolute_imports(source: str, *, skip_optional: bool = False) -> set[str]:
    """The modules Python ``source`` imports by absolute name, anywhere (in functions too); with
    ``skip_optional``, not those inside a ``try`` that catches ImportError (optional imports)."""
    tree = ast.parse(source)
    optional = set()
    if skip_optional:
        optional = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try)
                    and any(h.type is not None and "ImportError" in ast.unparse(h.type)
                            for h in t.handlers)
                    for stmt in t.body for node in ast.walk(stmt)}
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def markdown_tables(text: str) -> list[list[list[str]]]:
    """The markdown tables of ``text``: each a list of rows (header first, no separator) of
    stripped cells."""
    tables, previous = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous:
                tables.append([])
            if not line.startswith("|-"):
                tables[-1].append([c.strip() for c in line.strip("|").split("|")])
        previous = line.startswith("|")
    return tables
