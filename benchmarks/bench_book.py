"""The book's time per chapter and its slowest cells, executed as the book build executes them.

    OMP_NUM_THREADS=1 python benchmarks/bench_book.py                  # every chapter, empty cache
    OMP_NUM_THREADS=1 python benchmarks/bench_book.py 05 --cache DIR   # chapters whose file starts
                                                                       # with 05, in a given cache

Runs the chapters of ``_toc.yml`` in its order (the build's order: later chapters load the runs
earlier ones trained) with nbclient in one kernel per notebook, its working folder the notebook's,
``RETRAC_CACHE`` a fresh temporary folder unless ``--cache`` names one (a full run leaves
gigabytes there: the folder is printed at the end) and ``RETRAC_CLAIMS_DIR`` beside it, where
the chapters' claim records are read from. A claim that does not hold at full quality stops its
chapter, as in the build. Prints the wall seconds of every chapter (the cell times summed, and the whole execution
with the kernel's start), the ``--top`` slowest cells with their first line, the claims each
chapter made, and the load average and this CPU's matmul rate before and after. ``RETRAC_SMOKE=1`` times the smoke sizes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import torch
import yaml
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def toc_notebooks() -> list[Path]:
    """The notebooks of ``_toc.yml``, in its order."""
    def files(entries):
        for entry in entries or []:
            if "file" in entry:
                yield entry["file"]
            yield from files(entry.get("sections"))
            yield from files(entry.get("chapters"))

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    paths = [ROOT / f"{f}.ipynb" for f in files(toc.get("parts"))]
    return [p for p in paths if p.exists()]


def cell_seconds(cell) -> float:
    """Wall seconds of one executed cell, from nbclient's timing record."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return 0.0
    parse = lambda s: dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    return (parse(end) - parse(start)).total_seconds()


def run_notebook(path: Path, timeout: int) -> tuple[float, list[tuple[float, int, str]], str]:
    """Execute ``path``; (seconds in all, [(seconds, cell index, first line)], error or "")."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start, error = time.perf_counter(), ""
    try:
        client.execute()
    except Exception as err:   # a failed cell or claim: report it, time what ran
        name = getattr(err, "ename", type(err).__name__)          # the cell's exception
        error = f"{name}: {getattr(err, 'evalue', str(err)).strip()[:200]}"
    total = time.perf_counter() - start
    cells = [(cell_seconds(c), i, (c.source.strip().splitlines() or [""])[0][:70])
             for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    return total, cells, error


def rate() -> str:
    """This CPU's float32 matmul rate now: VMs of one type differ by 1.5x, so chapter times
    from two machines compare only with it beside them."""
    return f"matmul {common.matmul_gflops()['wall']:.0f} GFLOP/s"


def claims_of(folder: Path, notebook: Path) -> list[dict]:
    """The claim records the chapter of ``notebook`` (``05_is_it_right`` -> ch5) wrote."""
    path = folder / f"ch{notebook.stem.split('_')[0].lstrip('0')}.json"
    return json.loads(path.read_text()) if path.exists() else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("chapters", nargs="*",
                        help="file-name prefixes of the chapters to run (default: all)")
    parser.add_argument("--cache", type=Path,
                        help="RETRAC_CACHE for the run (default: a fresh empty folder)")
    parser.add_argument("--top", type=int, default=3, help="slowest cells shown per chapter")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell (the build's)")
    args = parser.parse_args()
    notebooks = [p for p in toc_notebooks()
                 if not args.chapters or any(p.name.startswith(c) for c in args.chapters)]
    if not notebooks:
        parser.error(f"no chapter of _toc.yml starts with {args.chapters}.")
    work = Path(tempfile.mkdtemp(prefix="bench-book-"))
    cache = args.cache or work / "cache"
    os.environ["RETRAC_CACHE"], os.environ["RETRAC_CLAIMS_DIR"] = str(cache), str(work / "claims")
    print(f"torch {torch.__version__}, {common.threads()} threads "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); cache {cache}; "
          f"smoke {os.environ.get('RETRAC_SMOKE', '0')}; before: {common.load()}, "
          f"{rate()}")
    rows, slow, failed = [], [], []
    for path in notebooks:
        total, cells, error = run_notebook(path, args.timeout)
        made = claims_of(work / "claims", path)
        held = sum(c["holds"] for c in made)
        rows.append({"chapter": path.stem, "seconds": f"{total:.0f}",
                     "cells' seconds": f"{sum(s for s, _, _ in cells):.0f}",
                     "claims": f"{held} of {len(made)} hold", "status": error or "ok"})
        print(f"{path.stem}: {total:.0f} s{'  ' + error if error else ''}", flush=True)
        for s, i, line in sorted(cells, reverse=True)[:args.top]:
            slow.append({"chapter": path.stem, "cell": i, "seconds": f"{s:.1f}",
                         "first line": line})
        failed += [error] if error else []
    total = sum(float(r["seconds"]) for r in rows)
    rows.append({"chapter": "whole book", "seconds": f"{total:.0f} ({total / 60:.1f} min)",
                 "cells' seconds": "", "claims": "", "status": ""})
    print(table(rows, "seconds per chapter (kernel start included)"))
    print(table(slow, f"the {args.top} slowest cells of each chapter"))
    print(f"\nafter: {common.load()}, {rate()}; cache and claims left in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
