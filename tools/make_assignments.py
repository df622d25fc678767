"""Make course assignments from the chapters with otter-grader: student versions and autograders.

Each chapter is the single source: the instructor version, with solutions, rubrics and the
autograder's tests in otter-assign's format (raw ``# BEGIN QUESTION`` ... cells, which the book does
not show, and test cells tagged ``remove-cell``). For every chapter given, ``otter assign`` writes

    <out>/<chapter>/student/<chapter>.ipynb      hand this out: solutions and tests removed
    <out>/<chapter>/autograder/autograder.zip    upload to Gradescope, or grade with `otter run`
    <out>/<chapter>/autograder/<chapter>.ipynb   the solution notebook

and this script finishes the student version where otter does not: the Colab badge (it opens the
instructor's notebook, solutions included) becomes a note on what to do, and answer cells lose the
tags that hide them in the book. Generated files are never edited by hand; regenerate them.
Regenerating replaces only ``student/`` and ``autograder/``: grades and results stay.

Usage::

    python tools/make_assignments.py                      # every chapter -> assignments/
    python tools/make_assignments.py 03 04 --out dist     # chapters by number (or paths)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
HIDING_TAGS = {"solution", "hide-input", "hide-cell", "hide-output", "remove-input", "remove-cell"}
ANSWER_TAG = "otter_answer_cell"
BADGE_MARKER = "<!-- colab-badge -->"
STUDENT_NOTE = ("> **Student version.** Each code exercise has `...` where your answer goes: "
                "replace it and run the cell; the check at its end says whether the answer is "
                "right, and what is off when it is not. The autograder runs these checks and "
                "hidden ones on inputs you do not see, so write answers that work for any input. "
                "Answer prose questions in the cell below them.")
CONFIG_RE = re.compile(r"^#\s+ASSIGNMENT\s+CONFIG", re.I)


class AssignError(ValueError):
    """A chapter that cannot be turned into an assignment, or an output folder that would
    overwrite the chapters."""


def chapter_paths(names: list[str], root: Path = ROOT) -> list[Path]:
    """Chapters by number prefix ("03", "4b") or path; all chapters when ``names`` is empty."""
    chapters = sorted((root / "notebooks").glob("*.ipynb"))
    if not names:
        return chapters
    paths = []
    for name in names:
        if Path(name).suffix == ".ipynb":
            paths.append(Path(name))
            continue
        found = [p for p in chapters if p.name.split("_")[0] == name.zfill(2 + name[-1].isalpha())]
        if not found:
            raise AssignError(f"no chapter {name!r}: give a number such as 03 or 04b, or a path "
                              f"(chapters: {', '.join(p.name.split('_')[0] for p in chapters)}).")
        paths += found
    return paths


def check_target(paths, out: Path) -> None:
    """Refuse an output folder that holds the chapters (or is one of their folders)."""
    out = Path(out).resolve()
    sources = {Path(p).resolve().parent for p in paths} | {(ROOT / "notebooks").resolve()}
    if out in sources:
        raise AssignError(f"--out {out} holds the chapters, which the assignments would be mixed "
                          "with. Choose another folder, e.g. --out assignments.")


def requirements(root: Path = ROOT) -> str:
    """What Gradescope's autograder image installs: the library from the book's repository."""
    sys.path.insert(0, str(root / "tools"))
    try:
        from sync_notebooks import settings
    finally:
        sys.path.pop(0)
    cfg = settings(root)
    return f"retrac-lib @ git+{cfg['url']}@{cfg['branch']}\n"


def finish_student_version(nb):
    """Replace the Colab badge with the student note; show the answer cells."""
    first = nb.cells[0]
    lines = [line for line in first.source.split("\n") if BADGE_MARKER not in line]
    titles = [i for i, line in enumerate(lines) if line.startswith("# ")]
    at = titles[0] + 1 if titles else 0
    lines[at:at] = ["", STUDENT_NOTE]
    first.source = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if ANSWER_TAG in tags:
            cell.metadata["tags"] = [t for t in tags if t not in HIDING_TAGS]
    return nb


def make_assignment(path: Path, out: Path, quiet: bool = True) -> Path:
    """Run ``otter assign`` on one chapter; return the folder it wrote (``out / chapter``)."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    configs = [c for c in nb.cells if c.cell_type == "raw" and CONFIG_RE.match(c.source)]
    if len(configs) != 1:
        raise AssignError(f"{path.name}: expected one raw '# ASSIGNMENT CONFIG' cell, found "
                          f"{len(configs)} (see the instructors' page, 'Writing a new exercise').")
    configs[0].source += "\nrequirements: requirements.txt"
    target = Path(out).resolve() / path.stem
    for generated in ("student", "autograder"):  # grades.csv and results/ stay
        shutil.rmtree(target / generated, ignore_errors=True)
    from otter.assign import main as otter_assign

    with tempfile.TemporaryDirectory() as tmp:
        master = Path(tmp) / path.name
        nbformat.write(nb, master)
        (Path(tmp) / "requirements.txt").write_text(requirements())
        log = io.StringIO()
        with contextlib.redirect_stdout(log) if quiet else contextlib.nullcontext():
            try:
                otter_assign(str(master), str(target), no_pdfs=True, no_run_tests=True)
            except Exception as err:
                raise AssignError(f"{path.name}: otter assign failed: {err}") from err
    student = target / "student" / path.name
    nbformat.write(finish_student_version(nbformat.read(student, as_version=4)), student)
    (zipped,) = (target / "autograder").glob("*.zip")
    zipped.rename(zipped.with_name("autograder.zip"))
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("chapters", nargs="*",
                        help="chapter numbers (03, 04b) or notebook paths (default: all chapters)")
    parser.add_argument("--out", type=Path, default=ROOT / "assignments",
                        help="output folder (default: assignments/)")
    args = parser.parse_args(argv)
    try:
        paths = chapter_paths(args.chapters)
        check_target(paths, args.out)
        for path in paths:
            print(f"wrote {make_assignment(path, args.out)}")
    except AssignError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
