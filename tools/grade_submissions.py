"""Grade submitted notebooks with a chapter's autograder (``otter run``, no Docker) into one CSV.

    RETRAC_SMOKE=1 python tools/grade_submissions.py assignments/03_diffusion_tracin submissions/*.ipynb

``otter run`` executes each submission and runs the public and the hidden tests. This script writes

    <assignment>/grades.csv              a row per submission: file, a column per autograded
                                         question, total, possible (for an LMS gradebook import)
    <assignment>/results/<file>.json     otter's results (Gradescope's format), with the message
                                         of every failed test

Prose questions are graded by hand (their rubrics are in the chapter's drop-downs). With
``RETRAC_SMOKE=1`` the submission runs at smoke sizes, which the autograded answers (functions
checked on inputs the student did not see) are graded at just as strictly, in seconds.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def grade(autograder: Path, submission: Path) -> dict:
    """Otter's results for one submission (``results.json``, Gradescope's format)."""
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run([sys.executable, "-m", "otter", "run", "--no-logo", "-a",
                              str(autograder), "-o", out, str(submission)],
                             capture_output=True, text=True)
        results = Path(out) / "results.json"
        if run.returncode or not results.exists():
            raise RuntimeError(f"otter run failed on {submission}:\n{run.stderr[-2000:]}")
        return json.loads(results.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", type=Path,
                        help="a folder written by tools/make_assignments.py, e.g. assignments/03_...")
    parser.add_argument("submissions", nargs="+", type=Path, help="submitted notebooks")
    args = parser.parse_args(argv)
    autograder = args.assignment / "autograder" / "autograder.zip"
    if not autograder.exists():
        print(f"error: no {autograder}; run tools/make_assignments.py first.", file=sys.stderr)
        return 2
    (args.assignment / "results").mkdir(exist_ok=True)
    rows, questions = [], []
    for submission in args.submissions:
        results = grade(autograder, submission)
        (args.assignment / "results" / f"{submission.stem}.json").write_text(
            json.dumps(results, indent=1))
        scored = [t for t in results["tests"] if "score" in t]
        questions = questions or [t["name"] for t in scored]
        row = {"file": submission.name, **{t["name"]: t["score"] for t in scored}}
        row["total"] = sum(t["score"] for t in scored)
        row["possible"] = sum(t["max_score"] for t in scored)
        rows.append(row)
        print(f"{submission.name}: {row['total']:g} / {row['possible']:g}")
    with open(args.assignment / "grades.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["file", *questions, "total", "possible"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.assignment / 'grades.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
