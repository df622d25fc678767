"""The student versions round-trip: valid notebooks whose exercises stop at a stub (so their checks
fail) until solved, and that give back the instructor's code when the solutions are filled in.

A synthetic chapter made here is run both ways (stubbed: NotImplementedError; a wrong answer: the
self-check's AssertionError; filled in: passes). Each real chapter's student version is checked statically
(CI executes every chapter once, in the book build): outside its exercises it is the instructor's
code, each stub raises before its self-check, and filling it gives the instructor's code exactly.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import torch
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient

import retrac_lib.checks as checks
from book_tools import NOTEBOOKS, load_tool

student = load_tool("make_student_notebooks")


def _execute(nb, cwd: Path, allow_errors: bool):
    client = NotebookClient(nb, timeout=900, kernel_name="python3", allow_errors=allow_errors,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def _errors(cell) -> list[str]:
    return [o.ename for o in cell.get("outputs", []) if o.output_type == "error"]


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


# The conversion itself.

def test_stub_keeps_indentation_and_names_the_exercise():
    source = ("def f(g):\n    # BEGIN SOLUTION\n    return g / g.norm()\n    # END SOLUTION\n\n"
              "# BEGIN SOLUTION\nx = 1\n# END SOLUTION\ncheck(f)")
    out = student.strip_solution(source, "ex-04-norm")
    assert out.split("\n") == [
        "def f(g):",
        '    raise NotImplementedError("Exercise ex-04-norm: replace this line with your solution.")',
        "",
        'raise NotImplementedError("Exercise ex-04-norm: replace this line with your solution.")',
        "check(f)",
    ]
    assert student.extract_solutions(source) == [
        "    # BEGIN SOLUTION\n    return g / g.norm()\n    # END SOLUTION",
        "# BEGIN SOLUTION\nx = 1\n# END SOLUTION"]


@pytest.mark.parametrize("source", ["# BEGIN SOLUTION\nx = 1",
                                    "x = 1\n# END SOLUTION",
                                    "# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION"])
def test_unbalanced_markers_are_errors(source):
    with pytest.raises(student.StudentError):
        student.strip_solution(source)


def test_prose_solutions_are_removed():
    md = ("```{exercise}\n:label: ex-01-a\nWhy?\n```\n\n```{solution} ex-01-a\n:class: dropdown\n\n"
          "Because.\n```\n\n::::{solution} ex-01-b\nColons too.\n::::\nAfter.")
    assert student.strip_prose_solutions(md) == "```{exercise}\n:label: ex-01-a\nWhy?\n```\n\nAfter."


# A synthetic chapter with one code exercise checked by rl.checks and one prose exercise.

def synthetic_chapter():
    cells = [
        nbformat.v4.new_markdown_cell(
            "# A synthetic chapter\n\n[![Open In Colab](b.svg)](link) <!-- colab-badge -->\n\n"
            "**What you will learn**\n\n- nothing\n\n**Prerequisites**: none"),
        nbformat.v4.new_code_cell("import torch\n\nimport retrac_lib as rl\nimport retrac_lib.checks"),
        nbformat.v4.new_markdown_cell("## Summary\n\nRows.\n\n## Exercises\n\n"
                                      "```{exercise}\n:label: ex-99-rows\n\nNormalize the rows.\n```"),
        nbformat.v4.new_code_cell(
            "def unit_rows(g):\n    # BEGIN SOLUTION\n"
            "    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)\n    # END SOLUTION\n\n"
            "rl.checks.check_unit_rows(unit_rows)",
            metadata={"tags": ["solution", "hide-input"]}),
        nbformat.v4.new_markdown_cell("```{exercise}\n:label: ex-99-why\n\nWhy?\n```"),
        nbformat.v4.new_markdown_cell("```{solution} ex-99-why\n:class: dropdown\n\nBecause.\n```"),
    ]
    return nbformat.v4.new_notebook(cells=cells)


def test_synthetic_chapter_round_trip(tmp_path):
    instructor = synthetic_chapter()
    path = tmp_path / "99_synthetic.ipynb"
    nbformat.write(instructor, path)
    assert student.main([str(path), "--out", str(tmp_path / "student")]) == 0
    stu = nbformat.read(tmp_path / "student" / path.name, as_version=4)
    nbformat.validate(stu)

    text = nbformat.writes(stu)
    assert "BEGIN SOLUTION" not in text and "clamp_min" not in text and "Because." not in text
    assert "colab-badge" not in text and "Student version" in stu.cells[0].source
    exercise = stu.cells[3]
    assert exercise.metadata["tags"] == ["exercise"]
    assert 'raise NotImplementedError("Exercise ex-99-rows:' in exercise.source
    assert len(stu.cells) == 5  # the cell that held only a prose solution is gone

    # Before it is solved, the exercise stops at the stub, inside the self-check.
    ran = _execute(stu, tmp_path, allow_errors=True)
    assert _errors(ran.cells[3]) == ["NotImplementedError"]

    # A wrong answer: the self-check says what is off (run here, not in a kernel, to save time).
    wrong = exercise.source.replace(student.stub("    ", "ex-99-rows"),
                                    "    return g / g.norm(dim=0, keepdim=True)")
    with pytest.raises(AssertionError, match="normalized the columns"):
        exec(compile(stu.cells[1].source + "\n" + wrong, "exercise", "exec"), {})

    # Filled back in: the instructor's code, and it passes.
    filled = student.fill_solutions(nbformat.read(tmp_path / "student" / path.name, as_version=4),
                                    instructor)
    assert _code(filled) == _code(instructor)
    ran = _execute(filled, tmp_path, allow_errors=False)
    assert "\N{CHECK MARK} check_unit_rows" in ran.cells[3].outputs[0].text


def test_out_never_overwrites_instructor_notebooks(tmp_path, monkeypatch, capsys):
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    chapter = root / "notebooks" / "99_synthetic.ipynb"
    nbformat.write(synthetic_chapter(), chapter)
    before = chapter.read_bytes()
    monkeypatch.setattr(student, "ROOT", root)
    monkeypatch.chdir(root)
    for argv in (["--out", "notebooks"], ["--out", str(root / "notebooks" / ".")],
                 [str(chapter), "--out", str(root / "notebooks")]):
        assert student.main(argv) == 2
        assert "holds instructor notebooks" in capsys.readouterr().err
    other = tmp_path / "elsewhere"
    other.mkdir()
    copy = other / chapter.name
    copy.write_bytes(before)
    assert student.main([str(copy), "--out", str(other)]) == 2  # next to its own input, too
    assert chapter.read_bytes() == before and copy.read_bytes() == before
    assert student.main(["--out", "handout"]) == 0 and (root / "handout" / chapter.name).exists()


def test_tagged_cell_without_markers_is_an_error():
    nb = synthetic_chapter()
    nb.cells[3].source = "x = 1"
    with pytest.raises(student.StudentError, match="no '# BEGIN SOLUTION'"):
        student.student_notebook(nb)


# The real chapters.

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_student_version(path, tmp_path):
    instructor = nbformat.read(path, as_version=4)
    stu = student.student_notebook(instructor, path.name)
    nbformat.validate(stu)
    n_regions = sum(len(student.extract_solutions(c.source)) for c in instructor.cells
                    if c.cell_type == "code")
    assert n_regions, f"{path.name} has no code exercise (a '# BEGIN SOLUTION' region)"
    text = nbformat.writes(stu)
    assert "BEGIN SOLUTION" not in text and "{solution}" not in text
    stubs = [i for i, c in enumerate(stu.cells) if "exercise" in c.metadata.get("tags", [])]
    assert sum(stu.cells[i].source.count("raise NotImplementedError(") for i in stubs) == n_regions

    filled = student.fill_solutions(stu, instructor)
    assert _code(filled) == _code(instructor), "filling the stubs must give the instructor's code"

    # Static, so that CI executes every chapter once (in the book build): outside the exercise
    # cells the student version is the instructor's code, which the book build runs; each exercise
    # cell is valid Python whose stub raises before its self-check is reached.
    pairs = zip([c for c in stu.cells if c.cell_type == "code"],
                [c for c in instructor.cells if c.cell_type == "code"], strict=True)
    changed = [s.source for s, i in pairs
               if "exercise" not in s.metadata.get("tags", []) and s.source != i.source]
    assert not changed, f"{path.name}: cells outside the exercises differ from the instructor's"
    for i in stubs:
        source = stu.cells[i].source
        compile(TransformerManager().transform_cell(source), f"{path.name} cell {i + 1}", "exec")
        first_stub = source.index("raise NotImplementedError(")
        calls = [m.start() for m in re.finditer(r"\bcheck(_\w+)?\(", source)]
        assert all(first_stub < c for c in calls), (
            f"{path.name}, cell {i + 1}: a self-check runs before the exercise's stub")


# The self-checks (retrac_lib.checks) that the exercises end with.

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
    assert "\N{CHECK MARK} check_per_sample_grads" in capsys.readouterr().out


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
