"""Course assignments (otter-grader, ``tools/make_assignments.py``) and the exercise checks.

For every chapter: the student version hides solutions and tests and is otherwise the chapter; the
autograder has public and hidden tests for every autograded question and a rubric for every prose
one; and the autograder grades in smoke mode, without Docker. Grading runs each chapter once in a
kernel up to its exercises, then runs the exercise cells of three versions on copies of that state
and otter's own test files on each: the solutions get full marks, the untouched student version
zero, and a deliberately wrong answer to each question zero or partial marks with the check's
message. One chapter also goes through ``otter run`` end to end (``tools/grade_submissions.py``;
``tests/test_grading.py`` tests the rest of it with a stand-in for ``otter run``).
"""
from __future__ import annotations

import csv
import functools
import json
import re
import textwrap
import zipfile
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

import retrac_lib.book.checks as checks
from book_tools import NOTEBOOKS, load_tool

assign = load_tool("make_assignments")
STUB = "..."

# A wrong answer for every stub of a chapter, in order, and a piece of the message it must get.
WRONG = {
    "01_train_toy_ddpm": [
        ("return 1 - torch.cumsum(torch.linspace(beta_start, beta_end, T), 0)", "summed the betas"),
        ("return int((log.timesteps < t_max).sum())", "whose index is the sample"),
    ],
    "02_timestep_bias": [
        ("return rl.per_sample_grads(model, scheduler, x, t, noise)", "it calls per_sample_grads"),
        ("t_c, eps_c = run.recorded(c)\n"
         "return rl.per_sample_grads(run.model_at(c), run.scheduler, run.data.images[indices],\n"
         "                           t_c[indices], eps_c[indices]).norm(dim=1)", "'l1'"),
        ("not bool(diagnostics.decile_ratio(t_rec, diagnostics.recorded_norms(\n"
         "    run, -1, loss='l1').norms) < trained.decile_ratio)", "does not match the decile"),
        ("return torch.stack([norms[timesteps * n_bins // T == b].double().sum()\n"
         "                    for b in range(n_bins)])", "average the norms of each bin"),
    ],
    "03_diffusion_tracin": [
        ("weights = run.checkpoint_weights()\n"
         "noise = rl.timesteps.query_noise_draws(zs.shape[1:], len(grid), K, seed=0)\n"
         "scores = torch.zeros(len(zs), n, dtype=torch.float64)\n"
         "for c in range(len(run.checkpoints)):\n"
         "    model = run.model_at(c)\n"
         "    t_rec, eps_rec = run.recorded(c)\n"
         "    g = rl.per_sample_grads(model, run.scheduler, run.data.images[:n], t_rec[:n], eps_rec[:n])\n"
         "    for q, z in enumerate(zs):\n"
         "        m = torch.stack([rl.per_sample_grads(model, run.scheduler, z.expand(K, *z.shape),\n"
         "                         torch.full((K,), t), noise[j]).mean(0) for j, t in enumerate(grid)])\n"
         "        scores[q] += weights[c] * (g.double() @ m.sum(0).double())\n"
         "return scores", "off by a factor"),
    ],
    "04_diffusion_retrac": [
        ("return G / G.norm(dim=0, keepdim=True)", "normalized the columns"),
        ('return rl.attribute(run, zs, "retrac", timesteps=grid, n_noise=K,\n'
         "                    progress=False).scores[:, :n]", "it calls attribute"),
        ('{"cosine", "per_timestep"}', "not quite"),
    ],
    "04b_recipes": [
        ("top_a, top_b = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices\n"
         "return torch.tensor([float(len(set(x.tolist()) & set(y.tolist())))\n"
         "                     for x, y in zip(top_a, top_b)])", "divide by k"),
    ],
    "05_is_it_right": [
        ("summed = masks.double() @ scores.double().T\n"
         "return torch.tensor([spearmanr(summed[:, q], subset_loss[:, q]).statistic\n"
         "                     for q in range(summed.shape[1])])", "negative loss"),
    ],
    "06_mnist": [
        ("v = values.double()\n"
         "diff = v[~is_out][:, None] - v[is_out][None, :]\n"
         "return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())",
         "swap the two groups"),
    ],
    "07_fast_attribution": [
        ("return (a @ a.transpose(1, 2) * (b @ b.transpose(1, 2))).sum((1, 2)).sqrt()",
         "not their squares"),
        ('"factors"', "route_first_conv"),
        ('"materialize"', "route_first_conv"),
    ],
    "08_your_own_model": [
        ("first = {}\n"
         "for s in range(run.checkpoints[c].step):\n"
         "    idx, ts, _ = run.log.step(s)\n"
         "    for i, t in zip(idx.tolist(), ts.tolist()):\n"
         "        first.setdefault(i, t)\n"
         "return torch.tensor([first[i] for i in range(len(run.data))])", "first visit"),
        ("0.25", "the weight counts visits"),
    ],
    "09_when_does_attribution_work": [
        ("g = torch.Generator().manual_seed(seed)\n"
         "ia = torch.randint(0, len(a), (n_boot, len(a)), generator=g)\n"
         "ib = torch.randint(0, len(b), (n_boot, len(b)), generator=g)\n"
         "means = a[ia].mean(1) - b[ib].mean(1)\n"
         "low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))\n"
         "return float((a - b).mean()), float(low), float(high)", "wider than the paired one"),
    ],
}


@pytest.fixture(scope="session")
def assignment(tmp_path_factory):
    """``assignment(chapter)``: the chapter's assignment folder, made once per test session."""
    out = tmp_path_factory.mktemp("assignments")
    return functools.cache(lambda path: assign.make_assignment(path, out))


def _read(path):
    return nbformat.read(path, as_version=4)


def _exercises_start(nb) -> int:
    """Index of the first cell after the markdown cell that opens '## Exercises'."""
    (i,) = [i for i, c in enumerate(nb.cells)
            if c.cell_type == "markdown" and re.search(r"^## Exercises\s*$", c.source, re.M)]
    return i + 1


def _code_after(nb, start):
    return [c.source for c in nb.cells[start:] if c.cell_type == "code"]


def _questions(nb) -> list[dict]:
    """The otter questions of an instructor notebook: config, and the cells in each block."""
    questions, current, block = [], None, None
    for cell in nb.cells:
        first = cell.source.split("\n", 1)[0].strip().upper() if cell.cell_type == "raw" else ""
        if first == "# BEGIN QUESTION":
            import yaml

            current = {"config": yaml.safe_load(cell.source.split("\n", 1)[1]), "solution": [],
                       "tests": [], "prompt": []}
            block = "prompt"
        elif first == "# END QUESTION":
            questions.append(current)
            current = None
        elif first.startswith("# BEGIN "):
            block = first.split()[-1].lower()
        elif first.startswith("# END "):
            block = "prompt"
        elif current is not None:
            current[block].append(cell)
    return questions


def _test_files(target: Path) -> dict[str, str]:
    with zipfile.ZipFile(target / "autograder" / "autograder.zip") as z:
        return {Path(n).stem: z.read(n).decode() for n in z.namelist() if n.startswith("tests/")}


# The assignments, statically (seconds).

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_is_a_question(path, assignment):
    """Code answers are autograded with public and hidden tests; prose answers carry a rubric."""
    nb = _read(path)
    questions = _questions(nb)
    assert questions, f"{path.name}: no otter questions"
    labels = re.findall(r":label:\s*(ex-\S+)", "\n".join(
        c.source for c in nb.cells if c.cell_type == "markdown"))
    assert len(labels) == len(set(labels)), f"{path.name}: an exercise label appears twice"
    in_questions = "\n".join(c.source for q in questions for c in q["prompt"] + q["solution"])
    assert all(f":label: {label}" in in_questions for label in labels), (
        f"{path.name}: an exercise outside every '# BEGIN QUESTION' block")
    answers = [c for c in nb.cells if c.cell_type == "code" and "# BEGIN SOLUTION" in c.source]
    in_auto = [c for q in questions if not q["config"].get("manual") for c in q["solution"]]
    assert all(any(a is c for c in in_auto) for a in answers), (
        f"{path.name}: a code answer outside an autograded question")
    tests = _test_files(assignment(path))
    for q in questions:
        name = q["config"]["name"]
        if q["config"].get("manual"):
            (solution,) = q["solution"]
            assert "**Rubric" in solution.source, f"{path.name}: {name} has no rubric"
            continue
        assert name in tests, f"{path.name}: {name} has no test file in the autograder"
        hidden = re.findall(r"@test_case\(points=([\d.]+), hidden=True", tests[name])
        public = re.findall(r"@test_case\(points=[\d.]+, hidden=False", tests[name])
        assert public and hidden and sum(map(float, hidden)) > 0, (
            f"{path.name}: {name} needs public tests (the self-checks) and hidden tests with points")
        assert all("remove-cell" in c.metadata.get("tags", []) for c in q["tests"]), (
            f"{path.name}: tag {name}'s test cells 'remove-cell' (the book does not show them)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_student_version(path, assignment):
    """Solutions, rubrics, tests and otter's configuration are gone; everything else is the
    chapter; each answer cell is the solution cell with its solution replaced by '...'."""
    instructor = _read(path)
    target = assignment(path)
    student = _read(target / "student" / path.name)
    solution = _read(target / "autograder" / path.name)
    nbformat.validate(student)
    text = nbformat.writes(student)
    for leak in ("BEGIN SOLUTION", "{solution}", "Rubric", "TEST CONFIG", "ASSIGNMENT CONFIG",
                 "colab-badge"):
        assert leak not in text, f"{path.name}: the student version holds {leak!r}"
    assert not [c for c in student.cells if c.cell_type == "raw"], "otter's raw cells are left"
    assert "Student version" in student.cells[0].source
    start = _exercises_start(student)
    assert [c.source for c in student.cells[1:start]] == [c.source for c in instructor.cells[1:start]], (
        f"{path.name}: the student version differs from the chapter before its exercises")
    answers = [c for c in student.cells if "otter_answer_cell" in c.metadata.get("tags", [])]
    assert all(not set(c.metadata["tags"]) & assign.HIDING_TAGS for c in answers)
    expected = []
    for source in _code_after(solution, _exercises_start(solution)):
        lines, out, inside = source.split("\n"), [], False
        for line in lines:
            if line.strip() == "# BEGIN SOLUTION":
                inside = True
                out.append(line[: len(line) - len(line.lstrip())] + STUB)
            elif line.strip() == "# END SOLUTION":
                inside = False
            elif not inside:
                out.append(line)
        expected.append("\n".join(out))
    assert _code_after(student, start) == expected


def test_make_assignments_command_line(tmp_path, capsys):
    assert assign.main(["07", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "07_fast_attribution" / "autograder" / "autograder.zip").exists()
    assert (tmp_path / "07_fast_attribution" / "student" / "07_fast_attribution.ipynb").exists()
    assert assign.main(["42", "--out", str(tmp_path)]) == 2
    assert "no chapter '42'" in capsys.readouterr().err
    assert assign.main(["07", "--out", str(assign.ROOT / "notebooks")]) == 2
    assert "holds the chapters" in capsys.readouterr().err
    grade_submissions = load_tool("grade_submissions")
    assert grade_submissions.main([str(tmp_path / "nothing"), "submission.ipynb"]) == 2
    assert "run tools/make_assignments.py first" in capsys.readouterr().err


def test_a_chapter_without_config_is_refused(tmp_path):
    nb = _read(NOTEBOOKS[0])
    nb.cells = [c for c in nb.cells if "ASSIGNMENT CONFIG" not in c.source]
    path = tmp_path / NOTEBOOKS[0].name
    nbformat.write(nb, path)
    with pytest.raises(assign.AssignError, match="one raw '# ASSIGNMENT CONFIG' cell"):
        assign.make_assignment(path, tmp_path / "out")


# Grading, in a kernel: the chapter runs once, the exercise cells of each version on a copy.

HARNESS = '''
def _grade_versions(versions, tests, marker):
    import json
    from otter.test_files import ExceptionTestFile

    base = dict(globals())
    report = {}
    for version, cells in versions.items():
        env = dict(base)
        for source in cells:
            try:  # as the grader does: an error in one cell does not stop the others
                exec(compile(source, "<exercise>", "exec"), env)
            except Exception:
                pass
        report[version] = {}
        for path in tests:
            test_file = ExceptionTestFile.from_file(path)
            test_file.run(env)
            report[version][test_file.name] = {
                "score": test_file.score, "possible": test_file.possible,
                "messages": [r.message for r in test_file.test_case_results if not r.passed]}
    print(marker + json.dumps(report))
'''
MARKER = "GRADES: "


def _fill(sources: list[str], answers: list[str]) -> list[str]:
    answers, out = list(answers), []
    for source in sources:
        lines = []
        for line in source.split("\n"):
            if line.strip() == STUB and "otter" not in line:
                indent = line[: len(line) - len(line.lstrip())]
                lines.append(textwrap.indent(answers.pop(0), indent))
            else:
                lines.append(line)
        out.append("\n".join(lines))
    assert not answers, "more wrong answers than stubs"
    return out


def grade(path: Path, tmp: Path, target: Path) -> dict:
    student = _read(target / "student" / path.name)
    solution = _read(target / "autograder" / path.name)
    start = _exercises_start(student)
    stubbed = _code_after(student, start)
    versions = {"solution": _code_after(solution, _exercises_start(solution)),
                "student": stubbed,
                "wrong": _fill(stubbed, [code for code, _ in WRONG[path.stem]])}
    tests_dir = tmp / "tests"
    with zipfile.ZipFile(target / "autograder" / "autograder.zip") as z:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith("tests/")])
    prefix = nbformat.v4.new_notebook(cells=student.cells[:start])
    client = NotebookClient(prefix, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp)}})
    probe = nbformat.v4.new_code_cell(HARNESS + f"\n_grade_versions({versions!r}, "
                                      f"{sorted(map(str, tests_dir.glob('*.py')))!r}, {MARKER!r})")
    prefix.cells.append(probe)
    with client.setup_kernel():
        for i, cell in enumerate(prefix.cells):
            if cell.cell_type == "code":
                client.execute_cell(cell, i)
    text = "".join(o.get("text", "") for o in probe.outputs if o.output_type == "stream")
    return json.loads(text.split(MARKER)[-1])


@pytest.mark.long
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_grader(path, tmp_path, assignment):
    report = grade(path, tmp_path, assignment(path))
    questions = {q["config"]["name"] for q in _questions(_read(path)) if not q["config"].get("manual")}
    assert set(report["solution"]) == questions
    for name, r in report["solution"].items():
        assert r["score"] == r["possible"] > 0, f"{name}: the solution scores {r}"
    for name, r in report["student"].items():
        assert r["score"] == 0, f"{name}: the untouched student version scores {r['score']}"
    wrong = report["wrong"]
    for name, r in wrong.items():
        assert r["score"] < r["possible"], f"{name}: the wrong answer scores full marks"
    messages = "\n".join(m for r in wrong.values() for m in r["messages"])
    for _, expected in WRONG[path.stem]:
        assert expected in messages, f"no message {expected!r} for a wrong answer in:\n{messages}"


@pytest.mark.long
def test_grade_submissions_with_otter_run(tmp_path, assignment):
    """``tools/grade_submissions.py`` (``otter run``, no Docker) on one chapter, a folder per
    student with the same file name: the solutions score full marks, the untouched student version
    zero, a truncated notebook is reported without stopping the others; regenerating the
    assignment keeps the grades and results."""
    grade_submissions = load_tool("grade_submissions")
    path = next(p for p in NOTEBOOKS if p.stem == "07_fast_attribution")
    target = assignment(path)
    solved, blank, cut = (tmp_path / s / path.name for s in ("alice", "bob", "carol"))
    for copy, source in [(solved, target / "autograder"), (blank, target / "student")]:
        copy.parent.mkdir()
        copy.write_bytes((source / path.name).read_bytes())
    cut.parent.mkdir()
    cut.write_bytes(blank.read_bytes()[:500])
    assert grade_submissions.main([str(target), str(solved), str(blank), str(cut)]) == 0
    with open(target / "grades.csv") as f:
        rows = {row["student"]: row for row in csv.DictReader(f)}
    assert set(rows["alice"]) == {"student", "file", "ex-07-linear-norms", "ex-07-routes", "total",
                                  "possible", "status"}
    assert float(rows["alice"]["total"]) == float(rows["alice"]["possible"]) > 0
    assert float(rows["bob"]["total"]) == 0 == float(rows["carol"]["total"])
    assert rows["carol"]["status"].startswith("not graded: not a readable notebook")
    results = json.loads((target / "results" / "bob.json").read_text())
    assert "Did you replace the `...`" in json.dumps(results)
    grades = (target / "grades.csv").read_text()
    assign.make_assignment(path, target.parent)
    assert (target / "grades.csv").read_text() == grades
    assert (target / "results" / "alice.json").exists()
    assert (target / "autograder" / "autograder.zip").exists()


# The checks (retrac_lib.book.checks) that exercises and tests call.

def _loop_grads(model, scheduler, x, t, noise, clean=False, target=None, scale=1.0):
    from retrac_lib.losses import add_noise

    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        x_in = x[i:i + 1] if clean else add_noise(scheduler, x[i:i + 1], t[i:i + 1], noise[i:i + 1])
        goal = noise[i:i + 1] if target is None else target[i:i + 1]
        value = (model(x_in, t[i:i + 1]).sample - goal).square().mean() * scale
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def test_check_per_sample_grads_accepts_a_right_answer(capsys):
    checks.check_per_sample_grads(_loop_grads)
    checks.check_per_sample_grads(_loop_grads, model="mlp", seed=2)
    assert capsys.readouterr().out.count("\N{CHECK MARK} check_per_sample_grads") == 2


@pytest.mark.parametrize("answer, message", [
    (lambda m, s, x, t, n: _loop_grads(m, s, x, t, n, clean=True), "clean sample"),
    (lambda m, s, x, t, n: _loop_grads(m, s, x, t, n, target=x), "target is the clean sample"),
    (lambda m, s, x, t, n: _loop_grads(m, s, x, t, n, scale=3.0), "factor of 3"),
    (lambda m, s, x, t, n: -_loop_grads(m, s, x, t, n), "wrong sign"),
    (lambda m, s, x, t, n: _loop_grads(m, s, x, t, n).flip(0), "wrong order"),
    (lambda m, s, x, t, n: _loop_grads(m, s, x, t, n).sum(0), "One row for the whole batch"),
    (lambda m, s, x, t, n: _loop_grads(m, s, x, t, n, scale=64.0), "summed the error"),
    (lambda m, s, x, t, n: {"w": torch.zeros(3)}, "dict"),
])
def test_check_per_sample_grads_says_what_is_off(answer, message):
    with pytest.raises(AssertionError, match=message):
        checks.check_per_sample_grads(answer)


def test_check_scores_diagnoses():
    ref = torch.randn(3, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    checks.check_scores(ref.clone(), ref)
    checks.check_scores(5 * ref, ref, scale_matters=False)
    for answer, message in [(ref.T, "transposed"), (2 * ref, "factor of 2"), (-ref, "reversed"),
                            (ref + torch.randn(3, 40, dtype=torch.float64), "ranking differs"),
                            (ref * float("nan"), "NaN")]:
        with pytest.raises(AssertionError, match=message):
            checks.check_scores(answer, ref)


def test_check_unit_rows_diagnoses():
    checks.check_unit_rows(lambda g: g / g.norm(dim=1, keepdim=True).clamp_min(1e-12))
    for fn, message in [(lambda g: g / g.norm(dim=1, keepdim=True), "NaN"),
                        (lambda g: g / g.norm(dim=0, keepdim=True), "columns"),
                        (lambda g: g / g.norm(), "whole matrix")]:
        with pytest.raises(AssertionError, match=message):
            checks.check_unit_rows(fn)


def test_check_alphas_bar_diagnoses():
    def right(a, b, T):  # the closed form, by a loop
        out, prod = [], 1.0
        for i in range(T):
            prod *= 1 - (a + (b - a) * i / (T - 1))
            out.append(prod)
        return torch.tensor(out, dtype=torch.float64)

    checks.check_alphas_bar(right)
    checks.check_alphas_bar(right, 1e-3, 0.05, 50)
    for fn, message in [(lambda a, b, T: torch.cumprod(torch.linspace(a, b, T), 0), "product of 1 - beta"),
                        (lambda a, b, T: 1 - torch.cumsum(torch.linspace(a, b, T), 0), "summed"),
                        (lambda a, b, T: torch.cumprod(1 - torch.linspace(a, b, T + 1)[:-1], 0),
                         "last value"),
                        (lambda a, b, T: right(a, b, T)[:-1], "shape")]:
        with pytest.raises(AssertionError, match=message):
            checks.check_alphas_bar(fn, 1e-3, 0.05, 50)


def test_refuse_calls_sees_nested_functions_and_attributes():
    import retrac_lib as rl

    def direct(run, z):
        return rl.attribute(run, z)

    def nested(run, z):
        def inner():
            return attribute(run, z)  # noqa: F821 (a global name, never called here)
        return inner

    def own(g):
        return g / g.norm()

    for fn in (direct, nested):
        with pytest.raises(AssertionError, match="it calls attribute"):
            checks.refuse_calls(fn, "attribute")
    checks.refuse_calls(own, "attribute")
    with pytest.raises(AssertionError, match="expected a function"):
        checks.refuse_calls(None, "attribute")
