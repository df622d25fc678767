"""The chapters need only what a reader's install has: what the Colab setup cell installs.

The setup cell installs ``retrac-lib`` (with the extras it names) and so its dependencies; a
chapter, or a library function it calls, that imports anything else (myst-nb, jupyter-book, a test
tool) fails in Colab. Chapters glue through ``retrac_lib.book.prose``, which works without myst-nb
(``tests/test_prose.py``). ``.ci/reader-install`` and ``.ci/reader-book`` run the library tests
and the chapters from the wheel in a venv with Colab's versions that holds the book's build too;
these checks are what tells that the chapters and the library need nothing of the build's.
"""
from __future__ import annotations

import json
import re
import sys
import tomllib
from importlib import metadata

import pytest
from book_tools import NOTEBOOKS, ROOT, absolute_imports
from packaging.requirements import Requirement

SETUP_PIP = re.compile(r'%pip install -q\s+(?:\\\n\s*)?"([^"]+)"')


def _name(dist: str) -> str:
    return dist.lower().replace("_", "-")


def _setup_requirement(nb: dict) -> Requirement:
    found = [m.group(1) for c in nb["cells"] if c["cell_type"] == "code"
             for m in SETUP_PIP.finditer("".join(c["source"]))]
    assert len(found) == 1, f"expected one Colab setup '%pip install', found {found}"
    return Requirement(found[0])


def _closure(requirement: Requirement) -> set[str]:
    """Distributions that installing ``requirement`` brings (as installed here)."""
    seen, todo = set(), [(requirement.name, set(requirement.extras))]
    while todo:
        name, extras = todo.pop()
        if _name(name) in seen:
            continue
        seen.add(_name(name))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            env = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(e) for e in env):
                todo.append((req.name, set(req.extras)))
    return seen


def _imports(nb: dict) -> set[str]:
    """Top-level module names imported by the notebook's code cells."""
    names = set()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"]).replace("\\\n", " ")   # continued lines as one
        code = "\n".join(  # a magic line becomes `pass`, keeping the block it sits in
            line[:len(line) - len(line.lstrip())] + "pass"
            if line.lstrip().startswith(("%", "!")) else line
            for line in source.splitlines())
        names.update(name.split(".")[0] for name in absolute_imports(code))
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_imports_only_what_the_colab_setup_installs(path):
    nb = json.loads(path.read_text())
    requirement = _setup_requirement(nb)
    assert _name(requirement.name) == "retrac-lib", requirement
    installed = _closure(requirement)
    providers = metadata.packages_distributions()
    outside = sorted(
        name for name in _imports(nb) - set(sys.stdlib_module_names) - {"retrac_lib"}
        if not {_name(d) for d in providers.get(name, [])} & installed)
    assert not outside, (f"{path.name} imports {outside}, which the Colab setup cell "
                         f"({requirement}) does not install: use retrac_lib (e.g. "
                         "retrac_lib.book.prose.glue for myst-nb's glue) or add a dependency.")


def _library_imports() -> dict[str, set[str]]:
    """Top-level names the library imports anywhere (functions too), with the files that do,
    except imports inside a ``try`` that catches ImportError (optional: prose.glue's myst-nb)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "retrac_lib").rglob("*.py")):
        for name in absolute_imports(path.read_text(), skip_optional=True):
            found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_the_library_imports_only_what_a_readers_install_has():
    installed = _closure(Requirement("retrac-lib[book]"))
    providers, imports = metadata.packages_distributions(), _library_imports()
    outside = {name: sorted(files) for name, files in imports.items()
               if name not in sys.stdlib_module_names and name != "retrac_lib"
               and not {_name(d) for d in providers.get(name, [])} & installed}
    assert not outside, (f"the library imports {outside}, which retrac-lib[book] does not "
                         "install: add a dependency, or import it in a try that catches "
                         "ImportError and works without it")
    assert "diffusers" in imports   # the walk sees the library's imports


def test_readme_lists_the_readers_install():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["book"]
    declared = {_name(Requirement(d).name) for d in deps}
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"A reader's install holds `retrac-lib` and its dependencies: ([^(]+)\(",
                      readme)
    assert match, "README.md must say which packages a reader's install holds"
    listed = {_name(n) for n in re.findall(r"`([^`]+)`", match.group(1))}
    assert listed == declared, (f"README.md lists {sorted(listed)}; pyproject.toml's "
                                f"dependencies and [book] extra are {sorted(declared)}")
