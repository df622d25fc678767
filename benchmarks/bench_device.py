"""Attribution on a device (a GPU when present): the contract per method and engine against the
batch-1 loop and a plain batched pass on the same device, peak memory, agreement with the CPU.

    RETRAC_CACHE=/tmp/rcache python benchmarks/bench_device.py              # cuda if present
    RETRAC_CACHE=/tmp/rcache python benchmarks/bench_device.py --device cpu --quick

The run is the paper-contract run of ``bench_attribution.py`` (trained on the CPU and cached);
``--quick``: 4 queries, 10 x 4 draws; ``--tiny``: a 64-digit run with 2 checkpoints, 2 queries,
4 x 2 draws (checks the plumbing in seconds). For each method and engine, on ``--device``:

1. ``rl.attribute`` of 1 query at the last checkpoint on the first 100 training samples, on the
   device against the CPU: the largest score difference over the largest CPU score (this call
   also warms the device up);
2. ``rl.attribute`` on the whole contract, timed with the device synchronized, with the peak
   device memory (``torch.cuda.max_memory_allocated``);
3. the batch-1 loop of ``bench_attribution.py`` (one backward pass per query draw, then per
   training sample) on the same device, on a fraction (1 query x up to 320 draws, 100 training
   samples), extrapolated linearly to the contract: the speed-up;
4. one plain batched forward + backward pass of one query's draws (no per-sample rows), per
   draw, times the contract's draws: the library's time over it.

``--out FILE`` writes the table (markdown), the device and the versions, after every row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from bench_attribution import loop_query_vector, loop_train_grads, plain_pass  # noqa: E402
from common import table  # noqa: E402

import retrac_lib as rl  # noqa: E402

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
    if not str(device).startswith("cuda"):
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def sizes(args) -> tuple[dict, int, dict, int, int]:
    """(contract_setup arguments, queries, attribute options, loop draws, loop training samples)."""
    if args.tiny:
        run = dict(n=64, block_out_channels=(8, 16), epochs=2, checkpoint_every=1)
        return run, 2, dict(timesteps=4, n_noise=2), 8, 8
    if args.quick:
        return {}, 4, dict(timesteps=10, n_noise=4), LOOP_DRAWS, LOOP_TRAIN
    return {}, common.N_QUERIES, dict(common.CONTRACT), LOOP_DRAWS, LOOP_TRAIN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4 queries, 10 x 4 draws")
    size.add_argument("--tiny", action="store_true", help="a 64-digit run, 2 queries, 4 x 2 draws")
    ap.add_argument("--out", type=Path, help="write the table (markdown) to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    name = rl.machine.device_name(device)
    setup, n_queries, opts, loop_draws, loop_train = sizes(args)

    run = rl.load_or_train(*common.contract_setup(**setup), progress=False)
    queries = common.contract_queries(n_queries)
    grid = rl.timesteps.timestep_grid(opts["timesteps"])
    noise = rl.timesteps.query_noise_draws(run.data.sample_shape, len(grid), opts["n_noise"], 0)
    n, n_ckpt, c = len(run.data), len(run.checkpoints), len(run.checkpoints) - 1
    q_draws = len(grid) * opts["n_noise"]
    contract_draws = n_ckpt * (n_queries * q_draws + n)
    model = run.model_at(c).to(device)
    t_rec, eps_rec = run.recorded(c)
    chunk = 256 if cuda else 64
    on = lambda *ts: [a.to(device) for a in ts]  # noqa: E731

    xq = queries[0].expand(q_draws, *queries.shape[1:])
    batch = on(xq, grid.repeat_interleave(opts["n_noise"]), noise.reshape(q_draws, *xq.shape[1:]))
    plain_pass(model, run.scheduler, *batch)  # warm-up
    plain_s, _ = timed(lambda: [plain_pass(model, run.scheduler, *batch) for _ in range(5)], device)
    plain_contract = contract_draws * plain_s / 5 / q_draws

    title = (f"# GPU check: {device} ({name})\n\ntorch {torch.__version__}, diffusers "
             f"{diffusers.__version__}; {common.load()}; TF32 matmul "
             f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}\n")
    notes = (f"\nContract: {n_queries} queries x {n_ckpt} checkpoints x {len(grid)} x "
             f"{opts['n_noise']} draws + {n_ckpt} x {n} training samples ({contract_draws:,} "
             f"forward + backward draws). Batch-1 loop: 1 query x up to {loop_draws} draws and "
             f"{loop_train} training samples, extrapolated. Plain batched pass: {q_draws} draws, "
             f"{1e3 * plain_s / 5 / q_draws:.3g} ms per draw. Error vs CPU: 1 query, last "
             f"checkpoint, {loop_train} training samples, max |difference| / max |CPU score|.\n")
    rows = []
    for method in ("tracin", "retrac"):
        k = max(1, min(opts["n_noise"], loop_draws // len(grid)))
        frac_grid = grid[: max(1, loop_draws // k)]
        frac_noise = noise[: len(frac_grid), :k]
        x, t, e = run.data.images[:loop_train], t_rec[:loop_train], eps_rec[:loop_train]
        z = on(queries[0], frac_grid, frac_noise)
        lq_s, _ = timed(lambda: loop_query_vector(model, run.scheduler, *z, method), device)
        lt_s, _ = timed(lambda: loop_train_grads(model, run.scheduler, *on(x, t, e)), device)
        loop_contract = n_ckpt * (n_queries * q_draws * lq_s / frac_grid.numel() / k
                                  + n * lt_s / loop_train)
        for engine in ("ghost", "func"):
            compare = dict(checkpoints=[c], train_slice=range(loop_train), engine=engine,
                           progress=False, **opts)
            on_device = rl.attribute(run, queries[:1], method, device=device, chunk_size=chunk,
                                     **compare).scores
            on_cpu = rl.attribute(run, queries[:1], method, **compare).scores
            err = ((on_device - on_cpu).abs().max() / on_cpu.abs().max()).item()
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            full_s, _ = timed(lambda: rl.attribute(run, queries, method, device=device,
                                                   engine=engine, chunk_size=chunk,
                                                   progress=False, **opts), device)
            rows.append({"method": method, "engine": engine, "contract s": full_s,
                         "batch-1 loop s (extrap.)": loop_contract,
                         "speed-up (goal >= 30x)": loop_contract / full_s,
                         "x plain batched pass (goal <= 2x)": full_s / plain_contract,
                         "peak MiB": peak_mib(device), "max rel. err vs CPU": err})
            text = table(rows, title) + "\n" + notes
            if args.out:
                args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
