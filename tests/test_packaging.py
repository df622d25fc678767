"""What pip and Colab install: the wheel holds the whole library and nothing else, the core installs
without the book's figures and explorers, and the declared lower bounds (the core's and the
``[book]`` extra's, which the chapters' Colab setup cell installs) are the versions that
CI's reader's venv holds (those Colab ships).

`.ci/reader-venv` then installs that wheel into a fresh venv, where `.ci/reader-install` runs the
tests and `.ci/reader-book` the book; these checks fail in seconds, before those slower steps.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from book_tools import ROOT
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COLAB_VERSIONS = ROOT / ".ci" / "colab-versions.txt"
# Colab's torch (a CUDA build) cannot be installed here; README "Versions" says so.
NOT_TESTED_AT_LOWER_BOUND = {"torch"}
# What only retrac_lib.book needs: the [book] extra, never the core's dependencies.
BOOK_ONLY = {"matplotlib", "ipywidgets"}
# What a reader's install (the Colab setup cell: retrac-lib[book]) declares.
READER = [*PYPROJECT["project"]["dependencies"], *PYPROJECT["project"]["optional-dependencies"]["book"]]


def _pins(path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{path.name}: pin {line!r} exactly"
            pins[req.name.lower().replace("_", "-")] = spec.version
    return pins


def _lower_bounds() -> dict[str, str]:
    bounds = {}
    for line in READER:
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        assert len(lower) == 1, f"pyproject.toml: give {req.name} one lower bound (>=), got {line!r}"
        bounds[req.name.lower().replace("_", "-")] = lower[0]
    return bounds


def test_lower_bounds_are_the_tested_colab_versions():
    pins, bounds = _pins(COLAB_VERSIONS), _lower_bounds()
    missing = sorted(set(bounds) - set(pins))
    assert not missing, f"{COLAB_VERSIONS.name} does not install {missing}"
    differ = {name: (lower, pins[name]) for name, lower in bounds.items()
              if name not in NOT_TESTED_AT_LOWER_BOUND and Version(pins[name]) != Version(lower)}
    assert not differ, ("pyproject.toml's lower bounds must be the versions .ci/reader-venv "
                        f"tests (lower bound, tested): {differ}")


def test_requirements_satisfy_the_declared_ranges():
    pins = _pins(ROOT / "requirements.txt")
    for line in READER:
        req = Requirement(line)
        version = pins[req.name.lower().replace("_", "-")]
        assert req.specifier.contains(version), f"requirements.txt pins {req.name}=={version}: outside {line!r}"


def test_the_core_leaves_the_books_packages_to_the_book_extra():
    core = {Requirement(d).name.lower() for d in PYPROJECT["project"]["dependencies"]}
    book = {Requirement(d).name.lower() for d in PYPROJECT["project"]["optional-dependencies"]["book"]}
    assert not core & BOOK_ONLY, f"the core depends on {sorted(core & BOOK_ONLY)}: move to [book]"
    assert book == BOOK_ONLY, f"the [book] extra holds {sorted(book)}, not {sorted(BOOK_ONLY)}"


def test_ci_tool_pins_are_the_development_pins():
    dev = _pins(ROOT / "requirements.txt")
    for name in ("reader-tools.txt", "book-tools.txt"):
        pins = _pins(ROOT / ".ci" / name)
        differ = {p: (v, dev.get(p)) for p, v in pins.items() if dev.get(p) != v}
        assert not differ, f".ci/{name} pins differ from requirements.txt (there, here): {differ}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel of the project's files (tracked or not ignored), as a fresh clone builds it: a
    checkout's ignored ``build/`` may hold modules deleted since, which setuptools would ship."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(source)], check=True, capture_output=True)
    (path,) = out.glob("retrac_lib-*.whl")
    return path


def test_wheel_holds_every_module_and_nothing_else(wheel):
    with zipfile.ZipFile(wheel) as z:
        packaged = {n for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}
    library = ROOT / "retrac_lib"
    in_tree = {p.relative_to(ROOT).as_posix() for p in [
        *library.rglob("*.py"), *library.glob("results/v1/*.json"),
        *library.glob("results/v1/ledger/*.json")]}
    assert packaged == in_tree, (f"missing from the wheel: {sorted(in_tree - packaged)}; "
                                 f"not library files: {sorted(packaged - in_tree)}")
