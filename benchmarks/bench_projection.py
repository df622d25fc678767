"""CountSketch-projected scores against exact ones: rank agreement and memory.

    OMP_NUM_THREADS=1 RETRAC_CACHE=/tmp/rcache python benchmarks/bench_projection.py [--contract]

On the benchmark run (all 1,797 digits, 3 checkpoints, 16 queries), for TracIn and ReTrac:
exact scores once, then ``rl.attribution.sketch_training`` at several k (training gradients
stored once as C x N x k floats) and ``rl.attribute(..., projection=sketch)``. Reports the
Spearman rank correlation of every query's scores with the exact ones, the overlap of the top-10
proponents, and the storage against exact stored gradients (C x N x P floats). The query side
uses the chapters' 25 x 8 grid (``--contract`` for the paper's 100 x 16).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Timer, table  # noqa: E402

import retrac_lib as rl  # noqa: E402
from retrac_lib.book import setups  # noqa: E402
from retrac_lib.ranking import spearman, top_k_overlap  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contract", action="store_true", help="the paper's 100 x 16 query grid")
    ap.add_argument("--ks", default="256,512,1024,2048,4096,8192")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {common.threads()} thread(s), {common.load()}")
    run = rl.load_or_train(*common.contract_setup(), progress=False)
    queries = common.contract_queries()
    opts = common.CONTRACT if args.contract else setups.attribution_options(smoke=False)
    n, n_ckpt = len(run.data), len(run.checkpoints)
    p = sum(v.numel() for v in run.checkpoints[0].params.values())
    exact_mib = n_ckpt * n * p * 4 / 2 ** 20
    exact = {}
    for method in ("tracin", "retrac"):
        with Timer() as tm:
            exact[method] = rl.attribute(run, queries, method, progress=False, **opts).scores
        print(f"exact {method}: {tm.wall:.1f} s wall, {tm.cpu:.1f} s cpu")
    rows, per_query = [], {}
    for k in map(int, args.ks.split(",")):
        with Timer() as ts:
            sketch = rl.attribution.sketch_training(run, k, timesteps=opts["timesteps"], progress=False)
        row = {"k": k, "sketch MiB": sketch.nbytes / 2 ** 20, "exact stored MiB": exact_mib,
               "saved x": exact_mib / (sketch.nbytes / 2 ** 20), "sketch cpu s": ts.cpu}
        for method in ("tracin", "retrac"):
            res = rl.attribute(run, queries, method, projection=sketch, progress=False, **opts)
            rho = spearman(res.scores, exact[method])
            row[f"{method} rho mean"] = rho.mean().item()
            row[f"{method} rho min"] = rho.min().item()
            row[f"{method} top-10 overlap"] = top_k_overlap(res.scores, exact[method]).mean().item()
            if k == 2048:
                per_query[method] = rho
        rows.append(row)
        print(f"k={k} done ({common.load()})", flush=True)
    print(table(rows, f"CountSketch vs exact scores ({len(queries)} queries, {n} digits, {n_ckpt} "
                      f"checkpoints, P = {p:,}; query grid {opts['timesteps']} x {opts['n_noise']}; "
                      f"{common.load()})"))
    if per_query:
        print(table([{"query": q, "tracin rho": per_query["tracin"][q].item(),
                      "retrac rho": per_query["retrac"][q].item()} for q in range(len(queries))],
                    "Spearman per query at k = 2048"))


if __name__ == "__main__":
    main()
