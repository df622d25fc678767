"""Attribution on a device (a GPU when present): time per training sample and per query draw,
peak device memory, speed-up over the batch-1 loop on the same device, agreement with the CPU.

    RETRAC_CACHE=/tmp/rcache python benchmarks/bench_device.py              # cuda if present
    RETRAC_CACHE=/tmp/rcache python benchmarks/bench_device.py --device cpu --quick

The run is the paper-contract run of ``bench_attribution.py`` (trained on the CPU and cached).
For each method, on ``--device``:

1. ``rl.attribute`` on the whole contract (or ``--quick``: 4 queries, 10 x 4 draws), timed with
   the device synchronized, with the peak device memory (``torch.cuda.max_memory_allocated``);
2. the two sides separately at the last checkpoint: the query side of all queries (ms per query
   draw) and every per-sample training gradient (ms per training sample);
3. the batch-1 loop of ``bench_attribution.py`` (one backward pass per query draw, then per
   training sample) on the same device, on a fraction (1 query x up to 320 draws, 100 training
   samples), extrapolated linearly to the contract: the speed-up;
4. the fraction's scores on the device against the same computation on the CPU (relative error).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_attribution import loop_query_vector, loop_train_grads  # noqa: E402
from common import table  # noqa: E402

import retrac_lib as rl  # noqa: E402
from retrac_lib import grads  # noqa: E402

LOOP_TRAIN = 100
LOOP_DRAWS = 320


def timed(fn, device):
    """(seconds, result) of ``fn()`` with the device synchronized before and after."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def peak_mib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if str(device).startswith("cuda") else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="4 queries, 10 x 4 draws")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {common.threads()} thread(s)"
    print(f"torch {torch.__version__}, device {device} ({name}), {common.load()}")

    run = rl.load_or_train(*common.contract_setup(), progress=False)
    opts = dict(timesteps=10, n_noise=4) if args.quick else dict(common.CONTRACT)
    queries = common.contract_queries(4 if args.quick else common.N_QUERIES)
    grid = rl.timesteps.timestep_grid(opts["timesteps"])
    noise = rl.timesteps.query_noise_draws(run.data.sample_shape, len(grid), opts["n_noise"], 0)
    n, n_ckpt, c = len(run.data), len(run.checkpoints), len(run.checkpoints) - 1
    draws = len(queries) * len(grid) * opts["n_noise"]
    print(f"run: {n} digits, {n_ckpt} checkpoints; {len(queries)} queries x {len(grid)} timesteps "
          f"x {opts['n_noise']} draws")
    model = run.model_at(c).to(device)
    t_rec, eps_rec = run.recorded(c)
    chunk = 256 if device.type == "cuda" else 64

    rows = []
    for method in ("tracin", "retrac"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        full_s, _ = timed(lambda: rl.attribute(run, queries, method, device=device, chunk_size=chunk,
                                               progress=False, **opts), device)
        peak = peak_mib(device)
        query_s, _ = timed(lambda: rl.attribution.query_vectors(
            model, run.scheduler, queries, grid, noise, method, chunk_size=4 * chunk), device)
        train_s, _ = timed(lambda: grads.grouped_grads(
            model, run.scheduler, run.data.images[:, None], t_rec[:, None], eps_rec[:, None],
            "mse", chunk), device)

        # batch-1 loop on a fraction, on the same device; the same fraction on the CPU
        k = max(1, min(opts["n_noise"], LOOP_DRAWS // len(grid)))
        frac_grid = grid[: max(1, LOOP_DRAWS // k)]
        frac_noise = noise[: len(frac_grid), :k]
        z = queries[:1]
        x, t, e = run.data.images[:LOOP_TRAIN], t_rec[:LOOP_TRAIN], eps_rec[:LOOP_TRAIN]
        on = lambda *ts: [a.to(device) for a in ts]  # noqa: E731
        lq_s, vq = timed(lambda: loop_query_vector(model, run.scheduler, *on(z[0], frac_grid, frac_noise), method), device)
        lt_s, gl = timed(lambda: loop_train_grads(model, run.scheduler, *on(x, t, e)), device)
        loop_per_draw = lq_s / frac_grid.numel() / k
        loop_per_sample = lt_s / LOOP_TRAIN
        loop_contract = n_ckpt * (draws * loop_per_draw + n * loop_per_sample)

        def fraction_scores(dev):
            m = run.model_at(c).to(dev)
            v = rl.attribution.query_vectors(m, run.scheduler, z, frac_grid, frac_noise, method)[0]
            g = grads.grouped_grads(m, run.scheduler, x[:, None], t[:, None], e[:, None], "mse", 64)
            if method == "retrac":
                g = g / g.norm(dim=1, keepdim=True)
            return (g.double() @ v.double()).cpu()

        on_device, on_cpu = fraction_scores(device), fraction_scores("cpu")
        err = ((on_device - on_cpu).norm() / on_cpu.norm()).item()
        rows.append({"method": method, "contract s": full_s,
                     "ms / query draw": 1e3 * query_s / draws,
                     "ms / training sample": 1e3 * train_s / n,
                     "batch-1 ms / draw": 1e3 * loop_per_draw,
                     "batch-1 ms / sample": 1e3 * loop_per_sample,
                     "batch-1 contract s (extrap.)": loop_contract,
                     "speed-up": loop_contract / full_s, "peak MiB": peak,
                     "rel. err vs CPU": err})
    print(table(rows, f"{device} ({name}): the contract with rl.attribute against the batch-1 loop "
                      f"on the same device ({common.load()})"))


if __name__ == "__main__":
    main()
