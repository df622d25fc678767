"""benchmarks/bench_book.py: one chapter executed and timed as the build would, its claims read."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from book_tools import ROOT   # a script of the repository: this test stays in the checkout

SCRIPT = ROOT / "benchmarks" / "bench_book.py"


def _run(*args, cache):
    env = {**os.environ, "RETRAC_SMOKE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--cache", str(cache)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.long
def test_a_chapter_is_timed_with_its_cells_and_claims(tmp_path):
    proc = _run("07", "--top", "2", cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines()
               if line.startswith("|") and "07_fast_attribution" in line and "ok" in line)
    seconds, cells, claims = [c.strip() for c in row.strip("|").split("|")][1:4]
    assert float(seconds) >= float(cells) > 0
    assert re.fullmatch(r"[0-2] of 2 hold", claims)     # smoke claims are recorded, not enforced
    slow = [line for line in proc.stdout.splitlines() if line.startswith("| 07_fast")]
    assert len(slow) == 1 + 2                            # its row, then its two slowest cells
    assert (tmp_path / "cache" / "runs").is_dir()        # the chapter trained into --cache


def _bench_book():
    """The script as a module, for what needs no kernel (in this process: no second import of
    torch and the library)."""
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
