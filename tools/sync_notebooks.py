"""Keep the notebooks and the table of contents in step with ``_config.yml``.

The repository URL and branch live in one place, ``_config.yml`` (``repository.url``,
``repository.branch``, ``launch_buttons.colab_url``). This script writes them into

* cell 1 of every notebook: the line holding ``<!-- colab-badge -->`` becomes an "Open in Colab"
  badge for that notebook (the marker stays at the end of the line, so re-running is idempotent;
  a cell without the marker gets the badge under its ``# Title`` line);
* cell 2 of every notebook: the guarded setup cell that installs ``retrac_lib`` with its
  ``[book]`` extra (matplotlib, ipywidgets) from the repository when the notebook runs in Colab
  (inserted when missing), tagged ``remove-cell`` so the rendered book, which does not need it,
  leaves it out;
* every code cell whose first line is a Colab form title (``#@title What this section states``):
  the tag ``remove-cell`` (the book shows only the sentences that cell glues) and Colab's
  ``cellView: form`` (Colab shows the title, not the code). Glue, pick, claim and timing lines
  belong in such cells and nowhere else; ``reader_cell_problems`` lists those it finds in the
  cells a reader sees, and every code line over ``MAX_LINE`` characters;
* ``_toc.yml``: the "Chapters" part lists ``notebooks/*.ipynb`` in file-name order, numbered 1, 2,
  ... (so "chapter 3" in the prose is the third notebook), between the ``# BEGIN NOTEBOOKS`` and
  ``# END NOTEBOOKS`` lines. A number with a letter (``04b_recipes.ipynb``) makes a section of the
  chapter before it (numbered after that chapter's own headings), so later chapters keep their
  numbers.

Usage::

    python tools/sync_notebooks.py            # rewrite what is out of date
    python tools/sync_notebooks.py --check    # only report; exit 1 if anything is out of date

It never touches outputs or any other cell; ``tests/test_book.py`` runs ``--check`` and
``tests/test_reader_cells.py`` runs ``reader_cell_problems`` on every chapter.
"""
from __future__ import annotations

import argparse
import ast
import copy
import re
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
BADGE_MARKER = "<!-- colab-badge -->"
SETUP_MARKER = "# Colab setup (written by tools/sync_notebooks.py)"
SETUP_TAGS = ["remove-cell"]   # the rendered book does not need it
SETUP_CELL_ID = "colab-setup"
TOC_BEGIN = "# BEGIN NOTEBOOKS"
TOC_END = "# END NOTEBOOKS"
SECTION = re.compile(r"^[0-9]+[a-z]_")   # "04b_recipes": a section of the chapter before it
FORM_TITLE = "#@title "
FORM_TAGS = ["remove-cell"]
MAX_LINE = 88
# What only the book's bookkeeping uses: glue and its wording, claims, timing.
PLUMBING_MODULES = {"time", "retrac_lib.book.prose", "retrac_lib.book.claims", "myst_nb"}
PLUMBING_NAMES = {"prose", "claims", "glue", "glue_all", "perf_counter", "process_time"}


class SyncError(ValueError):
    """A notebook or the table of contents cannot be synced as it is."""


def settings(root: Path = ROOT) -> dict:
    """Repository URL, branch and Colab URL from ``_config.yml`` (the one place they live)."""
    cfg = yaml.safe_load((root / "_config.yml").read_text())
    try:
        url = cfg["repository"]["url"].rstrip("/")
        branch = cfg["repository"].get("branch") or "main"
        colab = cfg["launch_buttons"]["colab_url"].rstrip("/")
    except (KeyError, TypeError, AttributeError) as err:
        raise SyncError("_config.yml needs repository.url and launch_buttons.colab_url") from err
    prefix = "https://github.com/"
    if not url.startswith(prefix) or url[len(prefix):].count("/") != 1:
        raise SyncError(f"repository.url must look like https://github.com/OWNER/NAME, got {url!r}")
    return {"url": url, "branch": branch, "colab": colab, "slug": url[len(prefix):]}


def colab_link(cfg: dict, relpath: str) -> str:
    """Where Colab opens ``relpath`` (a path from the repository root) on GitHub."""
    return f"{cfg['colab']}/github/{cfg['slug']}/blob/{cfg['branch']}/{relpath}"


def badge_line(cfg: dict, relpath: str) -> str:
    return (f"[![Open In Colab]({cfg['colab']}/assets/colab-badge.svg)]"
            f"({colab_link(cfg, relpath)}) {BADGE_MARKER}")


def setup_source(cfg: dict) -> str:
    return "\n".join([
        f"{SETUP_MARKER}: installs retrac_lib in Colab only.",
        "import sys",
        "",
        'if "google.colab" in sys.modules:',
        "    %pip install -q \\",   # IPython joins a magic's backslash-continued lines
        f'        "retrac-lib[book] @ git+{cfg["url"]}@{cfg["branch"]}"',
    ])


def _with_badge(source: str, badge: str, name: str) -> str:
    lines = source.split("\n")
    hits = [i for i, line in enumerate(lines) if BADGE_MARKER in line]
    if len(hits) > 1:
        raise SyncError(f"{name}: cell 1 has {len(hits)} lines with {BADGE_MARKER}; keep one.")
    if hits:
        lines[hits[0]] = badge
    else:
        titles = [i for i, line in enumerate(lines) if line.startswith("# ")]
        if not titles:
            raise SyncError(f"{name}: cell 1 must start with a '# Chapter title' line.")
        lines[titles[0] + 1:titles[0] + 1] = ["", badge]
    return "\n".join(lines)


def _is_setup_cell(cell) -> bool:
    return cell.cell_type == "code" and (
        cell.source.startswith(SETUP_MARKER) or "google.colab" in cell.source)


def is_form_cell(cell) -> bool:
    """A cell the book removes and Colab collapses: its first line is ``#@title ...``."""
    return cell.cell_type == "code" and cell.source.startswith(FORM_TITLE)


def _code_lines(source: str) -> str:
    """``source`` with IPython magics and shell lines blanked, so ``ast`` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                     for line in source.split("\n"))


def plumbing_lines(source: str) -> list[int]:
    """Line numbers (from 1) of ``source`` that glue, pick, claim or time."""
    lines = set()
    for node in ast.walk(ast.parse(_code_lines(source))):
        if isinstance(node, ast.Import):
            hit = any(a.name in PLUMBING_MODULES for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            hit = (node.module in PLUMBING_MODULES
                   or any(f"{node.module}.{a.name}" in PLUMBING_MODULES or a.name in PLUMBING_NAMES
                          for a in node.names))
        elif isinstance(node, ast.Name):
            hit = node.id in PLUMBING_NAMES
        elif isinstance(node, ast.Attribute):
            hit = node.attr in PLUMBING_NAMES
        else:
            hit = False
        if hit:
            lines.add(node.lineno)
    return sorted(lines)


def reader_cell_problems(nb, name: str) -> list[str]:
    """What keeps ``nb``'s code from reading as the recipe: plumbing in a cell the reader sees
    (anything but a ``#@title`` cell or an otter-grader test cell) and code lines over
    ``MAX_LINE`` characters."""
    problems = []
    for number, cell in enumerate(nb.cells, start=1):
        if cell.cell_type != "code":
            continue
        for i, line in enumerate(cell.source.split("\n"), start=1):
            if len(line) > MAX_LINE:
                problems.append(f"{name}, cell {number}, line {i}: {len(line)} characters "
                                f"(at most {MAX_LINE}): {line.strip()[:60]}...")
        hidden = is_form_cell(cell) or "remove-cell" in cell.metadata.get("tags", [])
        if hidden:
            continue
        for i in plumbing_lines(cell.source):
            problems.append(f"{name}, cell {number}, line {i}: glue, claim or timing in a cell "
                            f"the reader sees; move it to the section's '{FORM_TITLE}What this "
                            "section states' cell: "
                            f"{cell.source.split(chr(10))[i - 1].strip()[:60]}")
    return problems


def sync_notebook(nb, relpath: str, cfg: dict):
    """A copy of ``nb`` with the badge (cell 1), the setup cell (cell 2) and the form cells'
    metadata written."""
    nb = copy.deepcopy(nb)
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        raise SyncError(f"{relpath}: cell 1 must be a markdown cell with the chapter title.")
    nb.cells[0].source = _with_badge(nb.cells[0].source, badge_line(cfg, relpath), relpath)
    if len(nb.cells) > 1 and _is_setup_cell(nb.cells[1]):
        nb.cells[1].source = setup_source(cfg)
        tags = nb.cells[1].metadata.get("tags", [])
        nb.cells[1].metadata["tags"] = tags + [t for t in SETUP_TAGS if t not in tags]
    else:
        cell = nbformat.v4.new_code_cell(setup_source(cfg), metadata={"tags": list(SETUP_TAGS)})
        if nb.nbformat_minor >= 5 or "id" in nb.cells[0]:
            ids = {c.get("id") for c in nb.cells}
            cell.id = SETUP_CELL_ID if SETUP_CELL_ID not in ids else f"{SETUP_CELL_ID}-1"
        else:
            cell.pop("id", None)
        nb.cells.insert(1, cell)
    for cell in nb.cells:
        if is_form_cell(cell):
            tags = cell.metadata.get("tags", [])
            cell.metadata["tags"] = tags + [t for t in FORM_TAGS if t not in tags]
            cell.metadata["cellView"] = "form"
    return nb


def notebooks(root: Path = ROOT) -> list[Path]:
    """The book's chapters: ``notebooks/*.ipynb`` in file-name (= reading) order."""
    return sorted((root / "notebooks").glob("*.ipynb"))


def toc_text(text: str, files: list[str]) -> str:
    """``_toc.yml`` with the part between the NOTEBOOKS markers listing ``files``."""
    lines = text.split("\n")
    begin = [i for i, line in enumerate(lines) if line.strip().startswith(TOC_BEGIN)]
    end = [i for i, line in enumerate(lines) if line.strip().startswith(TOC_END)]
    if len(begin) != 1 or len(end) != 1 or end[0] < begin[0]:
        raise SyncError(f"_toc.yml needs one '{TOC_BEGIN}' line and one '{TOC_END}' line after it.")
    indent = lines[begin[0]][: len(lines[begin[0]]) - len(lines[begin[0]].lstrip())]
    block = []
    if files:  # an empty part is not a valid table of contents: leave it out
        block = [f"{indent}- caption: Chapters", f"{indent}  numbered: true",
                 f"{indent}  chapters:"]
        for f in files:
            if SECTION.match(f.rsplit("/", 1)[-1]) and block[-1].lstrip().startswith("- file:"):
                if not block[-1].startswith(f"{indent}        "):   # first section of a chapter
                    block.append(f"{indent}      sections:")
                block.append(f"{indent}        - file: {f}")
            else:
                block.append(f"{indent}    - file: {f}")
    return "\n".join(lines[: begin[0] + 1] + block + lines[end[0]:])


def sync(root: Path = ROOT, check: bool = False, paths: list[Path] | None = None) -> list[str]:
    """Sync (or with ``check``, only compare) notebooks and the toc; return what was out of date."""
    cfg = settings(root)
    stale = []
    for path in paths or notebooks(root):
        path = Path(path).resolve()
        relpath = path.relative_to(root).as_posix()
        nb = nbformat.read(path, as_version=4)
        synced = sync_notebook(nb, relpath, cfg)
        if synced != nb:
            stale.append(relpath)
            if not check:
                nbformat.write(synced, path)
    toc = root / "_toc.yml"
    files = [p.relative_to(root).with_suffix("").as_posix() for p in notebooks(root)]
    text = toc.read_text()
    new = toc_text(text, files)
    if new != text:
        stale.append("_toc.yml")
        if not check:
            toc.write_text(new)
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="only report what is out of date; exit 1 if anything is")
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to sync (default: notebooks/*.ipynb)")
    args = parser.parse_args(argv)
    try:
        stale = sync(check=args.check, paths=args.notebooks or None)
    except SyncError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check and stale:
        print("Out of date (run `python tools/sync_notebooks.py`):\n  " + "\n  ".join(stale))
        return 1
    print(("Updated: " + ", ".join(stale)) if stale else "Everything is in sync.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
