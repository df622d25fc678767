"""The cells a reader sees hold the recipe: no glue, claim or timing line outside the book's
hidden "what this section states" cells, and no code line wider than the page (88 characters).

The checker is ``tools/sync_notebooks.py``'s ``reader_cell_problems``; its own behaviour is tested
here on small notebooks, then every chapter must pass it.
"""
from __future__ import annotations

import nbformat
import pytest
from book_tools import NOTEBOOKS, load_tool

sync = load_tool("sync_notebooks")


def _nb(*sources, tags=None):
    cells = [nbformat.v4.new_code_cell(s) for s in sources]
    for cell in cells:
        cell.metadata["tags"] = list(tags or [])
    return nbformat.v4.new_notebook(cells=cells)


def _problems(*sources, tags=None):
    return sync.reader_cell_problems(_nb(*sources, tags=tags), "nb")


@pytest.mark.parametrize("source", [
    'prose.glue("ch1_x", f"{x:.2f}")',
    'prose.glue_all("ch1", x=f"{x:.2f}")',
    'claims.check("ch1-x", "x is small", x < 1, f"{x}")',
    "import time\nt0 = time.perf_counter()",
    "from time import perf_counter",
    "from retrac_lib.book import claims, prose",
    "from retrac_lib.book.prose import pick",
    "import myst_nb",
])
def test_plumbing_in_a_visible_cell_is_reported(source):
    problems = _problems("x = 1", source)
    assert problems and all("cell 2" in p and "What this section states" in p for p in problems)


def test_the_same_lines_in_a_form_cell_or_an_otter_test_cell_pass():
    source = 'from retrac_lib.book import claims, prose\nprose.glue("ch1_x", "1")'
    assert _problems("#@title What this section states\n" + source) == []
    assert _problems(source, tags=["remove-cell"]) == []


@pytest.mark.parametrize("source", [
    "checks.check_alphas_bar(f, 1e-3, 0.05, 50)",     # a self-check the student runs
    "%timeit f(x)\nprint(res.seconds)",                 # magics are skipped; .seconds is output
    "fig = plots.timestep_bias(res, run)\nplt.show()",
])
def test_recipe_lines_are_not_plumbing(source):
    assert _problems(source) == []


def test_long_lines_are_reported_in_every_cell_with_their_place():
    long = "x = " + "1 + " * 22 + "1"
    assert len(long) == 93
    hidden = "#@title What this section states\n" + long
    problems = _problems("y = 2", "z = 3\n" + long, hidden)
    assert [p.split(":")[0] for p in problems] == ["nb, cell 2, line 2", "nb, cell 3, line 2"]
    assert all("93 characters (at most 88)" in p for p in problems)
    assert _problems("x = " + "1" * 84) == []            # exactly 88 is allowed


def test_sync_tags_form_cells_for_the_book_and_colab_idempotently():
    cfg = {"url": "https://github.com/o/n", "branch": "main",
           "colab": "https://colab.research.google.com", "slug": "o/n"}
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title"),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell('#@title What this section states\nprose.glue("ch1_x", "1")')])
    once = sync.sync_notebook(nb, "notebooks/01_t.ipynb", cfg)
    form = once.cells[-1]
    assert form.metadata["tags"] == ["remove-cell"] and form.metadata["cellView"] == "form"
    assert "cellView" not in once.cells[2].metadata and not once.cells[2].metadata.get("tags")
    assert sync.sync_notebook(once, "notebooks/01_t.ipynb", cfg) == once


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_cells_show_the_recipe_only(path):
    problems = sync.reader_cell_problems(nbformat.read(path, as_version=4), path.name)
    assert not problems, (f"{len(problems)} problems (see tools/sync_notebooks.py):\n  "
                          + "\n  ".join(problems))
