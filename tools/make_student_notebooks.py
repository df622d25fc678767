"""Write student versions of the notebooks: every solution replaced by a stub.

In a student version

* the code between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` (marker lines included) becomes one
  ``raise NotImplementedError("Exercise ex-NN-name: ...")`` line at the same indentation, so the
  self-check that follows it in the cell cannot pass until the student writes an answer;
* prose answers (```` ```{solution} ... ``` ```` blocks in markdown cells) are removed;
* the cells lose their ``solution``/``hide-input`` tags (students must see the cell) and get an
  ``exercise`` tag; outputs are cleared;
* the Colab badge is removed (it opens the instructor's notebook, solutions included) and a note
  under the title says what to do.

Usage::

    python tools/make_student_notebooks.py                     # notebooks/*.ipynb -> student/
    python tools/make_student_notebooks.py --out handout notebooks/03_diffusion_tracin.ipynb

``student/`` is git-ignored: the student versions are generated, never edited by hand.
``tests/test_student_notebooks.py`` checks the round trip (``fill_solutions``).
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BEGIN = "# BEGIN SOLUTION"
END = "# END SOLUTION"
SOLUTION_TAG = "solution"
EXERCISE_TAG = "exercise"
HIDING_TAGS = {"solution", "hide-input", "hide-cell", "hide-output", "remove-input", "remove-cell"}
BADGE_MARKER = "<!-- colab-badge -->"
STUDENT_NOTE = ("> **Student version.** Each exercise cell stops at `raise NotImplementedError(...)`: "
                "replace that line with your answer and run the cell; the check at its end tells "
                "you whether the answer is right, and what is off when it is not.")
LABEL_RE = re.compile(r"^\s*:label:\s*(\S+)", re.M)
FENCE_RE = re.compile(r"^(\s*)(`{3,}|:{3,})\{solution\}")


class StudentError(ValueError):
    """A notebook whose solution markers cannot be turned into a student version."""


def stub(indent: str, label: str | None) -> str:
    what = f"Exercise {label}" if label else "This exercise"
    return f'{indent}raise NotImplementedError("{what}: replace this line with your solution.")'


def solution_regions(source: str, where: str = "cell") -> list[tuple[int, int]]:
    """Line spans ``(begin, end)`` of the ``# BEGIN SOLUTION`` ... ``# END SOLUTION`` regions."""
    regions, start = [], None
    for i, line in enumerate(source.split("\n")):
        text = line.strip()
        if text.startswith(BEGIN):
            if start is not None:
                raise StudentError(f"{where}: '{BEGIN}' on line {i + 1} before the previous one ended.")
            start = i
        elif text.startswith(END):
            if start is None:
                raise StudentError(f"{where}: '{END}' on line {i + 1} without a '{BEGIN}'.")
            regions.append((start, i))
            start = None
    if start is not None:
        raise StudentError(f"{where}: '{BEGIN}' on line {start + 1} is never closed by '{END}'.")
    return regions


def strip_solution(source: str, label: str | None = None, where: str = "cell") -> str:
    """``source`` with every solution region replaced by a stub at the region's indentation."""
    lines = source.split("\n")
    for begin, end in reversed(solution_regions(source, where)):
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        lines[begin:end + 1] = [stub(indent, label)]
    return "\n".join(lines)


def extract_solutions(source: str, where: str = "cell") -> list[str]:
    """The text of each solution region, marker lines included (what ``fill_solutions`` puts back)."""
    lines = source.split("\n")
    return ["\n".join(lines[b:e + 1]) for b, e in solution_regions(source, where)]


def strip_prose_solutions(source: str) -> str:
    """Markdown without its ```` ```{solution} ```` (or ``:::{solution}``) blocks."""
    out, lines, i = [], source.split("\n"), 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        fence = m.group(2)
        i += 1
        while i < len(lines) and lines[i].strip() != fence:
            i += 1
        i += 1  # skip the closing fence
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def _label_before(cells, index: int) -> str | None:
    for cell in reversed(cells[:index]):
        if cell.cell_type == "markdown" and "{exercise}" in cell.source:
            labels = LABEL_RE.findall(cell.source.split("{exercise}")[-1])
            if labels:
                return labels[0]
    return None


def student_notebook(nb, name: str = "notebook"):
    """The student version of ``nb`` (a copy; ``nb`` is not changed)."""
    nb = copy.deepcopy(nb)
    cells = []
    for index, cell in enumerate(nb.cells):
        where = f"{name}, cell {index + 1}"
        if cell.cell_type == "markdown":
            source = strip_prose_solutions(cell.source)
            if index == 0:
                lines = [line for line in source.split("\n") if BADGE_MARKER not in line]
                titles = [i for i, line in enumerate(lines) if line.startswith("# ")]
                at = titles[0] + 1 if titles else 0
                lines[at:at] = ["", STUDENT_NOTE]
                source = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
            if not source.strip():
                continue  # the cell held only a prose solution
            cell.source = source
        elif cell.cell_type == "code":
            tags = list(cell.get("metadata", {}).get("tags", []))
            if solution_regions(cell.source, where):
                cell.source = strip_solution(cell.source, _label_before(nb.cells, index), where)
                tags = [t for t in tags if t not in HIDING_TAGS]
                tags.append(EXERCISE_TAG)
            elif SOLUTION_TAG in tags:
                raise StudentError(f"{where} is tagged '{SOLUTION_TAG}' but has no "
                                   f"'{BEGIN}' ... '{END}' region.")
            if tags:
                cell.metadata["tags"] = tags
            else:
                cell.metadata.pop("tags", None)
            cell.outputs = []
            cell.execution_count = None
        cells.append(cell)
    nb.cells = cells
    return nb


STUB_RE = re.compile(r'^\s*raise NotImplementedError\("(Exercise \S+|This exercise): '
                     r'replace this line with your solution\."\)$')


def fill_solutions(student_nb, instructor_nb):
    """The student version with the instructor's solution regions put back in place of the stubs.

    Used by the round-trip test: filling a student version must give back the instructor's code.
    """
    student_nb = copy.deepcopy(student_nb)
    regions = [s for c in instructor_nb.cells if c.cell_type == "code"
               for s in extract_solutions(c.source)]
    for cell in student_nb.cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.split("\n")
        for i, line in enumerate(lines):
            if STUB_RE.match(line):
                if not regions:
                    raise StudentError("the student version has more stubs than the instructor's "
                                       "notebook has solutions")
                lines[i] = regions.pop(0)
        cell.source = "\n".join(lines)
    if regions:
        raise StudentError(f"{len(regions)} solution(s) found no stub in the student version")
    return student_nb


def check_target(paths, out: Path) -> None:
    """Refuse an output folder where a student version would overwrite an instructor notebook:
    the repository's ``notebooks/`` or the folder an input notebook lies in."""
    out = Path(out).resolve()
    sources = {Path(p).resolve().parent for p in paths} | {(ROOT / "notebooks").resolve()}
    if out in sources:
        raise StudentError(
            f"--out {out} holds instructor notebooks, which the student versions would overwrite "
            "(every solution would be lost). Choose another folder, e.g. --out student."
        )


def write_student_versions(paths, out: Path) -> list[Path]:
    check_target(paths, out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        path = Path(path)
        nb = nbformat.read(path, as_version=4)
        target = out / path.name
        nbformat.write(student_notebook(nb, path.name), target)
        written.append(target)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to convert (default: notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=ROOT / "student",
                        help="folder for the student versions (default: student/)")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    if not paths:
        print("No notebooks to convert.", file=sys.stderr)
        return 1
    try:
        written = write_student_versions(paths, args.out)
    except StudentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for target in written:
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
