"""Attribution across processes: ``python -m retrac_lib attribute`` under ``torchrun`` with 1 and
2 processes (or more with ``--procs``), for both shardings, against the projection.

    RETRAC_CACHE=/tmp/rcache OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py

The run is the paper-contract run of ``bench_attribution.py`` (all 1,797 digits, 3 checkpoints),
written once as a self-contained folder; the queries are 8 test digits on a 25 x 8 grid (ReTrac).
Reported: the attribution time (slowest rank, ``AttributionResult.seconds``) and the wall time of
the whole command (process start, imports and loading included). The projection for ``p``
processes sharding the training set, per checkpoint: ``Q |T'| K t_q + (N / p) t_s``, with the
per-draw and per-sample times ``t_q`` and ``t_s`` measured here in one process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Timer, table  # noqa: E402

import retrac_lib as rl  # noqa: E402
from retrac_lib import grads  # noqa: E402

OPTIONS = dict(timesteps=25, n_noise=8)
N_QUERIES = 8
ROOT = Path(__file__).resolve().parents[1]


def cli(folder, queries, out, procs, shard) -> tuple[float, float]:
    """(wall seconds of the command, attribution seconds) of one CLI run."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable])
    args = [*launcher, "-m", "retrac_lib", "attribute", str(folder), str(queries), "--out", str(out),
            "--method", "retrac", "--timesteps", str(OPTIONS["timesteps"]),
            "--n-noise", str(OPTIONS["n_noise"]), "--shard", shard, "--device", "cpu"]
    start = time.perf_counter()
    subprocess.run(args, check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return time.perf_counter() - start, rl.AttributionResult.load(out).seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, {common.load()}")
    run = rl.load_or_train(*common.contract_setup(), progress=False)
    queries = common.contract_queries(N_QUERIES)
    n, n_ckpt = len(run.data), len(run.checkpoints)
    draws = N_QUERIES * OPTIONS["timesteps"] * OPTIONS["n_noise"]

    # per-draw and per-sample costs in this process, last checkpoint
    c = n_ckpt - 1
    model = run.model_at(c)
    grid = rl.timesteps.timestep_grid(OPTIONS["timesteps"])
    noise = rl.timesteps.query_noise_draws(run.data.sample_shape, len(grid), OPTIONS["n_noise"], 0)
    t, eps = run.recorded(c)
    with Timer() as tq:
        rl.attribution.query_vectors(rl.attribution.engine_for("func", model, run.scheduler),
                                     queries, grid, noise, rl.attribution.ReTrac(),
                                     chunk_size=256)
    with Timer() as ts:
        grads.grouped_grads(model, run.scheduler, run.data.images[:, None], t[:, None], eps[:, None], "mse", 64)
    t_q, t_s = tq.wall / draws, ts.wall / n

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = rl.save_run(run, tmp / "run", with_data=True)
        save_file({"queries": queries}, str(tmp / "queries.safetensors"))
        reference = None
        for shard in ("train", "queries"):
            for p in args.procs:
                out = tmp / f"{shard}-{p}"
                wall, seconds = cli(folder, tmp / "queries.safetensors", out, p, shard)
                scores = rl.AttributionResult.load(out).scores
                reference = scores if reference is None else reference
                if shard == "train":
                    projected = n_ckpt * (draws * t_q + n * t_s / p)
                else:
                    projected = n_ckpt * (draws * t_q / p + n * t_s)
                rows.append({"shard": shard, "processes": p, "attribution s": seconds,
                             "command wall s": wall, "projected s": projected,
                             "scores equal to 1 process": bool(torch.equal(scores, reference))})
    print(table([{"t_q ms / query draw": 1e3 * t_q, "t_s ms / training sample": 1e3 * t_s,
                  "query draws per ckpt": draws, "training samples": n, "checkpoints": n_ckpt}],
                "Costs measured in one process (ReTrac, last checkpoint)"))
    print(table(rows, f"ReTrac, {N_QUERIES} queries x {OPTIONS['timesteps']} x {OPTIONS['n_noise']} "
                      f"draws, {n} digits, {n_ckpt} checkpoints ({common.load()})"))


if __name__ == "__main__":
    main()
