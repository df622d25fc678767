"""``tools/grade_submissions.py`` with a stand-in for ``otter run`` (seconds): every submission is
graded on its own, within a time limit, and the grades merge into ``grades.csv`` by student. The
real ``otter run`` is in ``tests/test_student_notebooks.py``."""
from __future__ import annotations

import csv
import json
import sys

import pytest

from book_tools import load_tool

grade_submissions = load_tool("grade_submissions")
# Stands in for `otter run <notebook>`: scores the notebook's "score", or loops when "loop" is set.
FAKE_OTTER = """import json, sys, time
nb = json.load(open(sys.argv[2]))
for path, text in nb.get("tamper", {}).items():   # student code writing the instructor's files
    open(path, "w").write(text)
while nb.get("loop"):
    time.sleep(1)
tests = [{"name": "q1", "score": nb["score"], "max_score": 2}]
json.dump({"tests": tests}, open(sys.argv[1] + "/results.json", "w"))
"""


@pytest.fixture
def assignment(tmp_path, monkeypatch):
    monkeypatch.setattr(grade_submissions, "otter_command",
                        lambda autograder, submission, out: [sys.executable, "-c", FAKE_OTTER,
                                                             out, str(submission)])
    target = tmp_path / "07_fast_attribution"
    (target / "autograder").mkdir(parents=True)
    (target / "autograder" / "autograder.zip").touch()
    return target


def _submit(path, **notebook):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(notebook))
    return str(path)


def _grades(target):
    with open(target / "grades.csv") as f:
        return {row["student"]: row for row in csv.DictReader(f)}


def test_a_bad_notebook_is_reported_and_the_others_graded(assignment, tmp_path, capsys):
    good = _submit(tmp_path / "subs" / "alice.ipynb", score=2)
    bad = tmp_path / "subs" / "bob.ipynb"
    bad.write_text('{"cells": [')
    assert grade_submissions.main([str(assignment), str(bad), good]) == 0
    rows = _grades(assignment)
    assert rows["alice"]["total"] == "2" and rows["alice"]["status"] == "graded"
    assert rows["bob"]["total"] == "0" and "not a readable notebook" in rows["bob"]["status"]
    assert "bob: not graded: not a readable notebook" in capsys.readouterr().err
    _submit(tmp_path / "subs" / "alice.ipynb", loop=True)  # a resubmission that fails: no results
    grade_submissions.main([str(assignment), good, "--timeout", "1"])
    assert not (assignment / "results" / "alice.json").exists()
    assert _grades(assignment)["alice"]["total"] == "0"


def test_a_submission_that_loops_times_out(assignment, tmp_path):
    loops = _submit(tmp_path / "subs" / "alice.ipynb", loop=True)
    good = _submit(tmp_path / "subs" / "bob.ipynb", score=1)
    assert grade_submissions.main([str(assignment), loops, good, "--timeout", "3"]) == 0
    rows = _grades(assignment)
    assert rows["alice"]["status"] == "not graded: timed out after 3 s"
    assert rows["alice"]["total"] == "0" and rows["bob"]["total"] == "1"


def test_a_late_batch_merges_by_student(assignment, tmp_path):
    subs = tmp_path / "subs"
    grade_submissions.main([str(assignment), _submit(subs / "alice.ipynb", score=2),
                            _submit(subs / "bob.ipynb", score=0)])
    grade_submissions.main([str(assignment), _submit(subs / "bob.ipynb", score=1),
                            _submit(subs / "carol.ipynb", score=2)])
    rows = _grades(assignment)
    assert {s: r["total"] for s, r in rows.items()} == {"alice": "2", "bob": "1", "carol": "2"}
    assert sorted(p.name for p in assignment.iterdir()) == ["autograder", "grades.csv", "results"]


def test_same_file_names_in_student_folders(assignment, tmp_path):
    subs = tmp_path / "subs"
    alice = _submit(subs / "alice" / "07.ipynb", score=2)
    bob = _submit(subs / "bob" / "07.ipynb", score=1)
    assert grade_submissions.main([str(assignment), alice, bob]) == 0
    rows = _grades(assignment)
    assert {s: (r["file"], r["total"]) for s, r in rows.items()} == {
        "alice": ("alice/07.ipynb", "2"), "bob": ("bob/07.ipynb", "1")}
    assert sorted(p.name for p in (assignment / "results").iterdir()) == ["alice.json", "bob.json"]
    # One student folder alone needs --root; two submissions of one student are refused.
    grade_submissions.main([str(assignment), _submit(subs / "bob" / "07.ipynb", score=0),
                            "--root", str(subs)])
    assert _grades(assignment)["bob"]["total"] == "0"
    assert grade_submissions.main([str(assignment), alice, _submit(subs / "alice" / "x.ipynb"),
                                   "--root", str(subs)]) == 2


def test_a_submission_cannot_rewrite_the_gradebook_or_the_results(assignment, tmp_path):
    subs = tmp_path / "subs"
    alice = _submit(subs / "alice.ipynb", score=2)
    grade_submissions.main([str(assignment), alice])
    forged = {str(assignment / "grades.csv"): "student,file,q1,total,possible,status\n"
                                              "alice,alice.ipynb,0,0,2,graded\n"
                                              "mallory,m.ipynb,2,2,2,graded\n",
              str(assignment / "results" / "mallory.json"): '{"tests": []}'}
    mallory = _submit(subs / "mallory.ipynb", score=0, tamper=forged)
    bob = _submit(subs / "bob.ipynb", score=1)
    assert grade_submissions.main([str(assignment), mallory, bob]) == 0
    rows = _grades(assignment)
    assert {s: rows[s]["total"] for s in rows} == {"alice": "2", "bob": "1", "mallory": "0"}
    mallory_results = json.loads((assignment / "results" / "mallory.json").read_text())
    assert mallory_results["tests"][0]["score"] == 0
