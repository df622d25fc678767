"""benchmarks/bench_book.py: the chapters of a table of contents executed in its order and timed
as the build would, their claims read, a failing chapter reported (on a book of two small
notebooks: the real chapters run in the book's own tests and build)."""
import importlib.util
import json
import sys
import tempfile

import nbformat
import pytest

from book_tools import NOTEBOOKS, ROOT, markdown_tables   # a script of the repository: stays in the checkout

SCRIPT = ROOT / "benchmarks" / "bench_book.py"


def _bench_book():
    """The script as a module, run in this process (no second import of torch and the
    library; the chapters' kernels are processes of their own)."""
    spec = importlib.util.spec_from_file_location("bench_book", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_an_unknown_chapter_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_book.py", "99", "--cache", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_:
        _bench_book().main()
    assert exit_.value.code == 2
    assert "no chapter of _toc.yml starts with ['99']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())                   # refused before anything ran


def test_a_chapter_reads_the_claims_of_its_prefix(tmp_path):
    bench = _bench_book()
    for chapter, stem in (("ch4b", "04b_recipes"), ("ch5", "05_is_it_right"),
                          ("ch10", "10_more")):
        (tmp_path / f"{chapter}.json").write_text(json.dumps([{"name": chapter}]))
        assert bench.claims_of(tmp_path, ROOT / f"{stem}.ipynb") == [{"name": chapter}]
    assert bench.claims_of(tmp_path, ROOT / "11_none.ipynb") == []


def _write_notebook(path, *cells):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.long
def test_chapters_are_timed_in_toc_order_with_their_cells_and_claims(tmp_path, monkeypatch,
                                                                     capsys):
    book = tmp_path / "book"
    (book / "notebooks").mkdir(parents=True)
    (book / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nparts:\n- chapters:\n"
        "  - file: notebooks/02_breaks\n    sections:\n    - file: notebooks/01_sleeps\n"
        "  - file: notebooks/03_missing\n")
    _write_notebook(book / "notebooks" / "01_sleeps.ipynb",
                    "import os, time\ntime.sleep(1.0)",
                    "from retrac_lib.book import claims\n"
                    "claims.check('ch1-slept', 'The chapter slept', True, '1 s')\n"
                    "claims.check('ch1-woke', 'The chapter woke', False, 'no')",
                    "cache = os.environ['RETRAC_CACHE']\nos.makedirs(cache, exist_ok=True)\n"
                    "open(os.path.join(cache, 'ran-in'), 'w').write(os.getcwd())")
    _write_notebook(book / "notebooks" / "02_breaks.ipynb", "x = 1",
                    "raise ValueError('broken on purpose')", "print('never')")
    bench = _bench_book()
    monkeypatch.setattr(bench, "ROOT", book)
    monkeypatch.setattr(bench, "rate", lambda: "matmul not measured")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # main's work folder: in here
    for name in ("RETRAC_CACHE", "RETRAC_CLAIMS_DIR"):   # main sets them: restored after
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RETRAC_SMOKE", "1")              # smoke claims are recorded, not enforced
    cache = tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["bench_book.py", "--top", "2", "--cache", str(cache)])
    assert bench.main() == 1                             # a chapter failed
    out = capsys.readouterr().out
    (_, *rows), (_, *slow) = markdown_tables(out)
    assert [r[0] for r in rows] == ["02_breaks", "01_sleeps", "whole book"]   # the toc's order
    breaks, sleeps = rows[0], rows[1]
    assert breaks[4] == "ValueError: broken on purpose" and breaks[3] == "0 of 0 hold"
    assert sleeps[4] == "ok" and sleeps[3] == "1 of 2 hold"
    assert float(sleeps[1]) >= float(sleeps[2]) >= 1.0   # the kernel's start, then the cells
    assert [r[0] for r in slow] == ["02_breaks"] * 2 + ["01_sleeps"] * 2   # --top 2 each
    assert {r[1] for r in slow[:2]} == {"0", "1"}        # the cell after the error never ran
    slept = {r[1]: r for r in slow[2:]}
    assert float(slept["0"][2]) >= 1.0 and slept["0"][3] == "import os, time"
    ran_in = cache / "ran-in"                            # the chapter's cache: --cache
    assert ran_in.read_text() == str(book / "notebooks")  # its working folder: its own
    (work,) = tmp_path.glob("bench-book-*")
    assert [c["name"] for c in bench.claims_of(work / "claims", ROOT / "01_sleeps.ipynb")] == [
        "ch1-slept", "ch1-woke"]


def test_the_chapters_are_the_books_in_its_order():
    assert _bench_book().toc_notebooks() == NOTEBOOKS     # _toc.yml lists them by file name
