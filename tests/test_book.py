"""The book's sources are consistent: notebooks synced with _config.yml, committed without outputs,
all listed in _toc.yml, following the chapter conventions of CONTRIBUTING.md; citations resolve.

The strict build (`.ci/run`) checks the rendering; these tests catch the same mistakes in seconds.
"""
from __future__ import annotations

import re

import nbformat
import pytest
import yaml
from book_tools import NOTEBOOKS, ROOT, load_tool

sync = load_tool("sync_notebooks")


def _read(path):
    return nbformat.read(path, as_version=4)


def _toc_files(node) -> list[str]:
    files = []
    if isinstance(node, dict):
        if "file" in node:
            files.append(node["file"])
        if "root" in node:
            files.append(node["root"])
        for value in node.values():
            files += _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            files += _toc_files(item)
    return files


def test_notebooks_and_toc_in_sync_with_config():
    stale = sync.sync(ROOT, check=True)
    assert not stale, (f"Out of date with _config.yml: {stale}. "
                       "Run `python tools/sync_notebooks.py` and commit the result.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = _read(path)
    dirty = [i + 1 for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs or execution counts. Run "
                       f"`jupyter nbconvert --clear-output --inplace notebooks/{path.name}`.")


def test_toc_lists_every_notebook_and_only_existing_files():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = _toc_files(toc)
    missing = [f for f in files if not any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb"))]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"
    listed = {f for f in files if f.startswith("notebooks/")}
    on_disk = {p.relative_to(ROOT).with_suffix("").as_posix() for p in NOTEBOOKS}
    assert on_disk <= listed, f"notebooks missing from _toc.yml: {sorted(on_disk - listed)}"
    assert len(files) == len(set(files)), "_toc.yml lists a file twice"


def test_config_is_strict_and_holds_the_repository_url_once():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["only_build_toc_files"] is True
    assert cfg["execute"]["execute_notebooks"] in ("cache", "force")
    assert cfg["execute"]["timeout"] >= 1800, "full-quality chapters need a large cell timeout"
    assert "sphinx_exercise" in cfg["sphinx"]["extra_extensions"]
    assert cfg["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    url = cfg["repository"]["url"]
    # Nothing hand-written repeats the URL: the tools and the theme read it from _config.yml.
    sources = [ROOT / "_toc.yml", *(ROOT / "book").glob("*.md"), *(ROOT / "tools").glob("*.py"),
               *(ROOT / "retrac_lib").rglob("*.py")]
    repeats = [p.relative_to(ROOT).as_posix() for p in sources if url in p.read_text()]
    assert not repeats, f"{url} is repeated in {repeats}; read it from _config.yml instead."


def _cells(path, kind):
    return [c for c in _read(path).cells if c.cell_type == kind]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_follows_the_conventions(path):
    """CONTRIBUTING.md: title, what you will learn, prerequisites; Summary and Exercises at the end;
    code answers tagged and marked, prose answers in drop-downs for existing exercises."""
    nb = _read(path)
    first = nb.cells[0].source
    assert first.startswith("# "), f"{path.name}: cell 1 must start with '# Chapter title'"
    for needed in ("What you will learn", "Prerequisites"):
        assert needed in first, f"{path.name}: cell 1 needs a '{needed}' paragraph"
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for heading in ("## Summary", "## Exercises"):
        assert re.search(rf"^{heading}\s*$", markdown, re.M), f"{path.name}: no '{heading}' section"
    labels = re.findall(r"(?:`{3,}|:{3,})\{exercise\}[^\n]*\n(?:\s*:[^\n]*\n)*?\s*:label:\s*(\S+)", markdown)
    assert labels, f"{path.name}: no {{exercise}} block with a :label:"
    number = path.name.split("_")[0]
    wrong = [label for label in labels if not label.startswith(f"ex-{number}-")]
    assert not wrong, f"{path.name}: exercise labels {wrong} should start with ex-{number}-"
    solved = re.findall(r"(?:`{3,}|:{3,})\{solution\}\s+(\S+)", markdown)
    unknown = sorted(set(solved) - set(labels))
    assert not unknown, f"{path.name}: solutions for unknown exercises {unknown}"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        tags = cell.metadata.get("tags", [])
        marked = "# BEGIN SOLUTION" in cell.source
        if marked or "solution" in tags:
            assert marked and "# END SOLUTION" in cell.source and "solution" in tags, (
                f"{path.name}, cell {i + 1}: a code answer needs the tag 'solution' and the lines "
                "'# BEGIN SOLUTION' ... '# END SOLUTION'")
            assert {"hide-input", "hide-output"} <= set(tags), (
                f"{path.name}, cell {i + 1}: tag the answer 'hide-input' and 'hide-output' (its "
                "printed result would give the answer away)")


def test_citations_resolve():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = set(re.findall(r"^@\w+\{([^,]+),", bib, re.M))
    for needed in ("xie2024retrac", "pruthi2020tracin", "ho2020ddpm", "park2023trak",
                   "zheng2024dtrak", "georgiev2023journey"):
        assert needed in keys
    texts = {p.name: p.read_text() for p in (ROOT / "book").glob("*.md")}
    texts.update({p.name: "\n".join(c.source for c in _cells(p, "markdown")) for p in NOTEBOOKS})
    for name, text in texts.items():
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
            for key in group.split(","):
                assert key.strip() in keys, f"{name}: citation {key.strip()!r} is not in references.bib"


# The sync tool itself, on notebooks made here.

CFG = {"url": "https://github.com/o/r", "branch": "main", "colab": "https://colab.research.google.com",
       "slug": "o/r"}


def _notebook(first="# Title\n\n<!-- colab-badge -->\n\n**What you will learn**", setup=None):
    cells = [nbformat.v4.new_markdown_cell(first)]
    if setup is not None:
        cells.append(nbformat.v4.new_code_cell(setup))
    cells.append(nbformat.v4.new_code_cell("import retrac_lib as rl"))
    return nbformat.v4.new_notebook(cells=cells)


def test_sync_writes_badge_and_setup_cell_idempotently():
    nb = sync.sync_notebook(_notebook(), "notebooks/01_x.ipynb", CFG)
    badge = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             "(https://colab.research.google.com/github/o/r/blob/main/notebooks/01_x.ipynb) "
             "<!-- colab-badge -->")
    assert nb.cells[0].source == f"# Title\n\n{badge}\n\n**What you will learn**"
    assert nb.cells[1].source.startswith(sync.SETUP_MARKER)
    assert '"google.colab" in sys.modules' in nb.cells[1].source
    assert ('%pip install -q \\\n        "retrac-lib[book] @ git+https://github.com/o/r@main"'
            in nb.cells[1].source)
    assert nb.cells[1].metadata["tags"] == ["remove-cell"]
    assert nb.cells[2].source == "import retrac_lib as rl"
    assert sync.sync_notebook(nb, "notebooks/01_x.ipynb", CFG) == nb
    nbformat.validate(nb)


def test_sync_replaces_an_old_setup_cell_and_adds_a_missing_badge():
    old = 'import sys\nif "google.colab" in sys.modules:\n    %pip install retrac-lib'
    nb = sync.sync_notebook(_notebook("# Title\n\nText.", setup=old), "notebooks/02_y.ipynb", CFG)
    assert len(nb.cells) == 3
    assert nb.cells[1].source == sync.setup_source(CFG)
    assert nb.cells[0].source.split("\n")[2].endswith(sync.BADGE_MARKER)
    with pytest.raises(sync.SyncError):
        sync.sync_notebook(_notebook("no title"), "notebooks/03_z.ipynb", CFG)


def test_toc_block_lists_notebooks_or_nothing():
    text = "parts:\n  - caption: A\n  # BEGIN NOTEBOOKS x\n  # END NOTEBOOKS\n  - caption: B\n"
    filled = sync.toc_text(text, ["notebooks/01_a", "notebooks/02_b"])
    assert yaml.safe_load(filled)["parts"][1] == {
        "caption": "Chapters", "numbered": True,
        "chapters": [{"file": "notebooks/01_a"}, {"file": "notebooks/02_b"}]}
    assert sync.toc_text(filled, []) == text
    assert sync.toc_text(sync.toc_text(text, ["notebooks/01_a"]), ["notebooks/01_a"]) == \
        sync.toc_text(text, ["notebooks/01_a"])


def test_lettered_notebooks_become_sections_of_the_chapter_before():
    text = "parts:\n  # BEGIN NOTEBOOKS\n  # END NOTEBOOKS\n"
    files = ["notebooks/04_a", "notebooks/04b_b", "notebooks/04c_c", "notebooks/05_d"]
    chapters = yaml.safe_load(sync.toc_text(text, files))["parts"][0]["chapters"]
    assert chapters == [{"file": "notebooks/04_a", "sections": [{"file": "notebooks/04b_b"},
                                                                {"file": "notebooks/04c_c"}]},
                        {"file": "notebooks/05_d"}]
