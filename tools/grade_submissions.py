"""Grade submitted notebooks with a chapter's autograder (``otter run``, no Docker) into one CSV.

    RETRAC_SMOKE=1 python tools/grade_submissions.py assignments/03_diffusion_tracin \\
        submissions/*.ipynb

``otter run`` executes each submission in its own process, with a time limit (``--timeout``), and
runs the public and the hidden tests. A submission that cannot be graded (not a notebook, timed
out, otter failed) gets a zero and the reason, on stderr and in the CSV; the others are graded.

The student is the submission's folder relative to ``--root`` (default: the folder that holds all
the submissions given), or its file name when it lies directly in ``--root``: both
``submissions/s1234567.ipynb`` and ``submissions/s1234567/03.ipynb`` are student ``s1234567``.
This script merges into

    <assignment>/grades.csv              a row per student: student, file, a column per
                                         autograded question, total, possible, status (for an
                                         LMS gradebook import); a new grade replaces the
                                         student's row, other students' rows stay
    <assignment>/results/<student>.json  otter's results (Gradescope's format), with the message
                                         of every failed test

Prose questions are graded by hand (their rubrics are in the chapter's drop-downs). With
``RETRAC_SMOKE=1`` the submission runs at smoke sizes, which the autograded answers (functions
checked on inputs the student did not see) are graded at just as strictly, in seconds.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

FIRST, LAST = ["student", "file"], ["total", "possible", "status"]


class GradingError(RuntimeError):
    """A submission that could not be graded; the message says why."""


def otter_command(autograder: Path, submission: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "otter", "run", "--no-logo", "-a", str(autograder), "-o", out,
            str(submission)]


def grade(autograder: Path, submission: Path, timeout: float) -> dict:
    """Otter's results for one submission (``results.json``, Gradescope's format)."""
    try:
        json.loads(submission.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GradingError(f"not a readable notebook ({err})") from err
    with tempfile.TemporaryDirectory() as out:
        # Its own session, so that the kernel otter starts is killed with it on a timeout.
        run = subprocess.Popen(otter_command(autograder, submission, out), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
        try:
            _, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
            raise GradingError(f"timed out after {timeout:g} s") from None
        results = Path(out) / "results.json"
        if run.returncode or not results.exists():
            raise GradingError(f"otter run failed: {stderr.strip()[-500:]}")
        return json.loads(results.read_text())


def student_id(submission: Path, root: Path) -> str:
    """The first folder of the submission's path relative to ``root``, or its file name's stem."""
    parts = submission.resolve().relative_to(root.resolve()).parts
    return parts[0] if len(parts) > 1 else submission.stem


def read_grades(path: Path) -> list[dict]:
    """The rows of the CSV at ``path`` (none when it does not exist yet)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_grades(path: Path, old: list[dict], rows: list[dict]) -> None:
    """Merge ``rows`` into ``old`` by student and write the CSV at ``path`` atomically (a
    temporary file renamed). ``old`` is read before any submission runs, so what a submission
    writes to ``path`` while it is graded is replaced."""
    merged = {row["student"]: row for row in old + rows}
    questions = list(dict.fromkeys(k for row in old + rows for k in row
                                   if k not in FIRST + LAST))
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".csv", newline="",
                                     delete=False) as f:
        writer = csv.DictWriter(f, FIRST + questions + LAST, restval="")
        writer.writeheader()
        writer.writerows(sorted(merged.values(), key=lambda row: row["student"]))
    os.replace(f.name, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("assignment", type=Path,
                        help="a folder written by tools/make_assignments.py, "
                             "e.g. assignments/03_...")
    parser.add_argument("submissions", nargs="+", type=Path, help="submitted notebooks")
    parser.add_argument("--root", type=Path,
                        help="the folder whose subfolders (or notebooks) are the students "
                             "(default: the folder that holds all the submissions)")
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds one submission may run (default: 600)")
    args = parser.parse_args(argv)
    autograder = args.assignment / "autograder" / "autograder.zip"
    if not autograder.exists():
        print(f"error: no {autograder}; run tools/make_assignments.py first.", file=sys.stderr)
        return 2
    root = args.root or Path(os.path.commonpath([p.resolve().parent for p in args.submissions]))
    ids = [student_id(p, root) for p in args.submissions]
    twice = sorted({s for s in ids if ids.count(s) > 1})
    if twice:
        print(f"error: more than one submission for {', '.join(twice)}; give --root, the folder "
              "that holds a folder (or a notebook) per student.", file=sys.stderr)
        return 2
    gradebook, details = args.assignment / "grades.csv", args.assignment / "results"
    details.mkdir(exist_ok=True)
    old, rows, found = read_grades(gradebook), [], {}   # read before any student code runs
    for student, submission in zip(ids, args.submissions):
        row = {"student": student, "file": str(submission.resolve().relative_to(root.resolve()))}
        try:
            found[student] = results = grade(autograder, submission, args.timeout)
        except GradingError as err:
            found[student] = None
            rows.append({**row, "total": 0, "possible": "", "status": f"not graded: {err}"})
            print(f"{student}: not graded: {err}", file=sys.stderr)
            continue
        scored = [t for t in results["tests"] if "score" in t]
        row.update({t["name"]: t["score"] for t in scored}, status="graded",
                   total=sum(t["score"] for t in scored),
                   possible=sum(t["max_score"] for t in scored))
        rows.append(row)
        print(f"{student}: {row['total']:g} / {row['possible']:g}")
    for student, results in found.items():   # after all submissions ran: none can rewrite them
        if results is None:
            (details / f"{student}.json").unlink(missing_ok=True)
        else:
            (details / f"{student}.json").write_text(json.dumps(results, indent=1))
    write_grades(gradebook, old, rows)
    print(f"wrote {gradebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
