"""benchmarks/gpu_check.sh: its dry run writes the table on the CPU; without a GPU it refuses."""
import os
import subprocess

import pytest
import torch
from book_tools import ROOT, markdown_tables   # a script of the repository: stays in the checkout

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(*args, cache):
    env = {**os.environ, "RETRAC_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=240)


@pytest.mark.long
def test_dry_run_writes_one_row_per_method_and_engine(tmp_path):
    out = tmp_path / "results" / "gpu_check.md"
    proc = _run("--dry-run", "--out", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert f"torch {torch.__version__}, diffusers" in text and "# GPU check: cpu" in text
    (header, *rows), (ens_header, *ens_rows) = markdown_tables(text)
    assert header == ["method", "engine", "contract s", "batch-1 loop s (extrap.)",
                      "speed-up (goal >= 30x)", "x plain batched pass (goal <= 2x)", "peak MiB",
                      "max rel. err vs CPU"]
    assert [r[:2] for r in rows] == [["tracin", "ghost"], ["tracin", "func"],
                                     ["retrac", "ghost"], ["retrac", "func"]]
    assert all(float(r[header.index("max rel. err vs CPU")]) < 1e-4 for r in rows)
    # the retrains in ensembles: rl.train and train_many with M = 1, 2 on the CPU
    assert ens_header == ["trainer", "M", "s per step", "s per member-step",
                          "CPU s per member-step", "speed-up vs rl.train (wall)"]
    assert [r[:2] for r in ens_rows] == [["rl.train (cpu)", "1"], ["train_many (cpu)", "1"],
                                         ["train_many (cpu)", "2"]]
    assert all(float(r[3]) == float(r[3]) for r in ens_rows)   # numbers, not NaN
    assert "CUDA tests (" in text and "passed" in text and "test_ensemble.py" in text
    assert text in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_exits_with_a_clear_message(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = _run("--out", str(out), cache=tmp_path / "cache")
    assert proc.returncode == 3
    assert "no CUDA GPU found: " in proc.stderr and not out.exists()
