"""Attribution on the paper's contract: the library against a batch-1 loop, and the FLOP limit.

    OMP_NUM_THREADS=1 RETRAC_CACHE=/tmp/rcache python benchmarks/bench_attribution.py

Contract (Xie et al. 2024, official code): 100 timesteps x 16 noise draws per query and
checkpoint, 3 checkpoints, all 1,797 digits, 16 queries; Diffusion-TracIn and Diffusion-ReTrac.
Prints, in one process:

1. the machine: threads, load average, measured float32 matmul rate;
2. FLOPs of one forward + backward pass per draw (FlopCounterMode);
3. the gradient paths on one query and checkpoint (``grads.grouped_grads``: ``vmap`` over groups,
   or one plain backward pass for a single group) against plain autograd for scale;
4. the full contract with ``rl.attribute`` for each method and gradient engine ("ghost": dot
   products and norms from layer factors; "func": torch.func rows), each in a fresh subprocess
   for its peak resident memory, against a batch-1 loop that follows the official code's structure (one
   backward pass per query, timestep and draw, then one per training sample). The loop is timed
   on a measured fraction (1 query x 1 checkpoint x 1,600 draws, and 200 training samples)
   and extrapolated linearly; the library is timed on the same fraction side by side and on the
   whole contract. The fraction's scores of both are compared;
5. the FLOP limit: (query draws + training samples) x FLOPs per draw / measured matmul rate;
6. the batched-pass limit (the honest limit on a CPU): what one ordinary batched forward and
   backward pass of the mean loss costs per draw (the fastest of three passes over one query's
   T' x K draws, in this process), and each side's cost and the whole contract's against it.

Use ``--quick`` for a small smoke version (4 queries, 10 x 4 draws), ``--profile-training``
for where the ghost engine's training side spends its time instead (``torch.profiler`` over the
norms and dot products of 200 training samples against 16 query vectors, last checkpoint).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Timer, table  # noqa: E402

import retrac_lib as rl  # noqa: E402
from retrac_lib import grads  # noqa: E402
from retrac_lib.losses import diffusion_loss  # noqa: E402

REF_TRAIN = 200  # training samples the batch-1 loop is timed on


# ---------------------------------------------------------------------------------------------
# the batch-1 loop (the official code's structure)


def _flat_grad(model, params) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in params])


def loop_query_vector(model, scheduler, z, grid, noise, method) -> torch.Tensor:
    """One backward pass per (timestep, draw); average per timestep; ReTrac normalizes each."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0
    for a, t in enumerate(grid):
        m = 0
        for k in range(noise.shape[1]):
            model.zero_grad(set_to_none=True)
            diffusion_loss(model, scheduler, z[None], t[None], noise[a, k][None]).sum().backward()
            m = m + _flat_grad(model, params)
        m = m / noise.shape[1]
        total = total + (m / m.norm() if method == "retrac" else m)
    return total / len(grid)


def loop_train_grads(model, scheduler, x, t, eps) -> torch.Tensor:
    """One backward pass per training sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        diffusion_loss(model, scheduler, x[i:i + 1], t[i:i + 1], eps[i:i + 1]).sum().backward()
        rows.append(_flat_grad(model, params))
    return torch.stack(rows)


def plain_pass(model, scheduler, x, t, noise) -> None:
    """One plain batched forward + backward pass of the mean loss (no per-sample rows), for scale."""
    model.zero_grad(set_to_none=True)
    diffusion_loss(model, scheduler, x, t, noise).mean().backward()


def batched_pass_seconds(model, scheduler, z, grid, noise, repeats: int = 3) -> float:
    """CPU seconds per draw of one plain batched pass over query ``z``'s T' x K draws (the
    fastest of ``repeats``, after one warm-up)."""
    n_t, k = noise.shape[:2]
    x, t = z.expand(n_t * k, *z.shape), grid.repeat_interleave(k)
    eps = noise.reshape(-1, *z.shape)
    plain_pass(model, scheduler, x, t, eps)
    best = float("inf")
    for _ in range(repeats):
        with Timer() as tm:
            plain_pass(model, scheduler, x, t, eps)
        best = min(best, tm.cpu)
    return best / (n_t * k)


# ---------------------------------------------------------------------------------------------


def child(method: str, quick: bool, engine: str) -> None:
    """The whole contract with rl.attribute in this (fresh) process; prints one JSON line."""
    run = rl.load_or_train(*common.contract_setup(), progress=False)
    opts = dict(timesteps=10, n_noise=4) if quick else common.CONTRACT
    queries = common.contract_queries(4 if quick else common.N_QUERIES)
    with Timer() as tm:
        res = rl.attribute(run, queries, method, progress=False, engine=engine, **opts)
    torch.save(res.scores, rl.cache_dir() / f"bench-scores-{method}-{engine}.pt")
    print(json.dumps({"wall": tm.wall, "cpu": tm.cpu, "peak_rss_mb": common.peak_rss_mb(),
                      "checksum": float(res.scores.abs().sum())}))


def engines(model, scheduler, run, grid, noise) -> list[dict]:
    """One query, one checkpoint: each way of computing the query side and training gradients."""
    z = common.contract_queries(1)[0]
    n_t, k = noise.shape[:2]
    xq = z.expand(n_t * k, *z.shape)
    tq = grid.repeat_interleave(k)
    nq = noise.reshape(-1, *z.shape)
    t, eps = run.recorded(len(run.checkpoints) - 1)
    xs, ts, es = run.data.images[:256], t[:256], eps[:256]
    rows = []

    def add(what, engine, fn, draws):
        fn()  # warm-up
        with Timer() as tm:
            fn()
        rows.append({"what": what, "engine": engine, "draws": draws, "wall s": tm.wall,
                     "cpu s": tm.cpu, "cpu ms/draw": 1e3 * tm.cpu / draws})

    fn = grads.grouped_grads
    add(f"ReTrac query side: {n_t} groups of {k}", "ghost",
        lambda: rl.attribution.query_vectors(
            rl.attribution.engine_for("ghost", model, scheduler), z[None], grid, noise,
            rl.attribution.ReTrac(), chunk_size=256), n_t * k)
    add(f"ReTrac query side: {n_t} groups of {k}", "vmap",
        lambda: fn(model, scheduler, xq.reshape(n_t, k, *z.shape), tq.reshape(n_t, k),
                   nq.reshape(n_t, k, *z.shape), "mse", 256), n_t * k)
    add(f"TracIn query side: 1 group of {n_t * k}", "backward",
        lambda: fn(model, scheduler, xq[None], tq[None], nq[None], "mse", 256), n_t * k)
    add("per-sample training grads, 256 samples", "vmap",
        lambda: fn(model, scheduler, xs[:, None], ts[:, None], es[:, None], "mse", 64), 256)
    vectors = torch.randn(common.N_QUERIES, sum(p.numel() for p in model.parameters()))
    add(f"training norms + {common.N_QUERIES} dots, 256 samples", "ghost",
        lambda: rl.ghost.group_terms(model, scheduler, xs[:, None], ts[:, None], es[:, None], "mse",
                                     vectors, 64), 256)

    def plain(b):
        plain_pass(model, scheduler, xq[:b], tq[:b], nq[:b])

    add(f"{n_t} plain backward passes of batch {k} (no per-group rows)", "autograd",
        lambda: [plain(k) for _ in range(n_t)], n_t * k)
    add(f"one plain backward pass of batch {n_t * k}", "autograd", lambda: plain(n_t * k), n_t * k)
    add("batch-1 loop (official structure), 160 draws", "autograd",
        lambda: loop_train_grads(model, scheduler, xq[:160], tq[:160], nq[:160]), 160)
    return rows


def profile_training_side(run, n_queries: int = common.N_QUERIES) -> None:
    """Print the operators that take the ghost engine's training-side CPU time."""
    from torch.profiler import ProfilerActivity, profile

    c = len(run.checkpoints) - 1
    engine = rl.attribution.engine_for("ghost", run.model_at(c), run.scheduler,
                                       run.config.loss)
    t, noise = run.recorded(c)
    x, t, noise = run.data.images[:REF_TRAIN, None], t[:REF_TRAIN, None], noise[:REF_TRAIN, None]
    n_params = sum(p.numel() for p in run.model_at(c).parameters())
    vectors = torch.randn(n_queries, n_params, generator=torch.Generator().manual_seed(0))
    engine.training_terms(x, t, noise, vectors, 64)   # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.training_terms(x, t, noise, vectors, 64)
    print(f"ghost training side, {REF_TRAIN} samples x {n_queries} query vectors "
          f"({common.load()}):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                    max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke version")
    ap.add_argument("--child", choices=["tracin", "retrac"], help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="ghost", help=argparse.SUPPRESS)
    ap.add_argument("--skip-engines", action="store_true")
    ap.add_argument("--profile-training", action="store_true",
                    help="profile the ghost engine's training side instead")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.quick, args.engine)
    if args.profile_training:
        return profile_training_side(rl.load_or_train(*common.contract_setup(), progress=False))

    print(f"torch {torch.__version__}, {common.threads()} thread(s), {common.load()}")
    run = rl.load_or_train(*common.contract_setup(), progress=False)
    n, n_ckpt = len(run.data), len(run.checkpoints)
    opts = dict(timesteps=10, n_noise=4) if args.quick else common.CONTRACT
    n_queries = 4 if args.quick else common.N_QUERIES
    grid = rl.timesteps.timestep_grid(opts["timesteps"])
    noise = rl.timesteps.query_noise_draws(run.data.sample_shape, len(grid), opts["n_noise"], 0)
    c = n_ckpt - 1
    model = run.model_at(c)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"run: {n} digits, {n_ckpt} checkpoints, {n_params:,} parameters; contract "
          f"{n_queries} queries x {len(grid)} timesteps x {opts['n_noise']} draws")

    rate = common.matmul_gflops()
    fl = common.flops_per_draw(model, run.scheduler, run.data.sample_shape)
    per_draw = fl["forward"] + fl["backward"]
    print(table([{"measure": "float32 matmul 2048^3", "GFLOP/s per wall s": rate["wall"],
                  "GFLOP/s per cpu s": rate["cpu"], "when": common.load()}], "Machine limit"))
    print(table([{"forward MFLOP": fl["forward"] / 1e6, "backward MFLOP": fl["backward"] / 1e6,
                  "total MFLOP": per_draw / 1e6}], "FLOPs per draw (one forward + backward, FlopCounterMode)"))

    if not args.skip_engines:
        rows = engines(model, run.scheduler, run, grid, noise)
        print(table(rows, f"Gradient engines, one query and checkpoint ({common.load()})"))

    # ---- the batched-pass limit: one ordinary forward + backward pass per draw
    z = common.contract_queries(1)
    batched = batched_pass_seconds(model, run.scheduler, z[0], grid, noise)
    print(f"batched pass: {1e3 * batched:.3f} ms per draw (CPU s of one forward + backward of "
          f"the mean loss over {len(grid) * opts['n_noise']} draws, fastest of 3)")

    # ---- the measured fraction: batch-1 loop and both engines side by side
    t, eps = run.recorded(c)
    xs, ts, es = run.data.images[:REF_TRAIN], t[:REF_TRAIN], eps[:REF_TRAIN]
    w = float(run.checkpoint_weights()[c])
    frac = {}
    for method in ("tracin", "retrac"):
        with Timer() as lq:
            vq = loop_query_vector(model, run.scheduler, z[0], grid, noise, method)
        with Timer() as lt:
            gl = loop_train_grads(model, run.scheduler, xs, ts, es)
        sl = gl.double() @ vq.double()
        s_loop = w * (sl / gl.norm(dim=1).double() if method == "retrac" else sl)
        n_q = len(grid) * opts["n_noise"]

        def side_rows(engine, q, tr, err):
            return {"engine": engine, "query side cpu s": q.cpu, "query wall s": q.wall,
                    "query x batched pass": q.cpu / (n_q * batched),
                    "training side cpu s": tr.cpu, "training wall s": tr.wall,
                    "training x batched pass": tr.cpu / (REF_TRAIN * batched),
                    "scores rel. error": err}

        rows = [side_rows("batch-1 loop", lq, lt, 0.0)]
        frac[method] = {"loop": (lq, lt)}
        for engine in ("ghost", "func"):
            eng = rl.attribution.engine_for(engine, model, run.scheduler)
            with Timer() as bq:
                vb = rl.attribution.query_vectors(eng, z, grid, noise,
                                                  rl.attribution.method_for(method),
                                                  chunk_size=256)
            with Timer() as bt:
                norm, dots = eng.training_terms(xs[:, None], ts[:, None], es[:, None], vb, 64)
                dots = dots[0]
            s_lib = w * (dots.double() / norm.double() if method == "retrac" else dots.double())
            err = ((s_loop - s_lib).norm() / s_loop.norm()).item()
            frac[method][engine] = (bq, bt)
            rows.append(side_rows(engine, bq, bt, err))
        print(table(rows, f"{method}: measured fraction, 1 query x 1 checkpoint x "
                          f"{len(grid) * opts['n_noise']} draws and {REF_TRAIN} training samples; "
                          f"scores against the loop ({common.load()})"))

    # ---- the whole contract with the library (fresh process each: peak memory)
    n_qc = n_queries * n_ckpt
    draws = n_qc * len(grid) * opts["n_noise"] + n_ckpt * n
    flops = draws * per_draw
    limit_cpu, limit_wall = flops / rate["cpu"] / 1e9, flops / rate["wall"] / 1e9
    full = []
    for method in ("tracin", "retrac"):
        (lq, lt) = frac[method]["loop"]
        loop_cpu = n_qc * lq.cpu + n_ckpt * n * lt.cpu / REF_TRAIN
        loop_wall = n_qc * lq.wall + n_ckpt * n * lt.wall / REF_TRAIN
        res = {e: common.run_child(Path(__file__), ["--child", method, "--engine", e]
                                   + (["--quick"] if args.quick else [])) for e in ("ghost", "func")}
        scores = {e: torch.load(rl.cache_dir() / f"bench-scores-{method}-{e}.pt") for e in res}
        agree = ((scores["ghost"] - scores["func"]).norm() / scores["func"].norm()).item()
        for e, r in res.items():
            full.append({"method": method, "engine": e, "cpu s": r["cpu"], "wall s": r["wall"],
                         "loop cpu s (extrap.)": loop_cpu, "speed-up (cpu)": loop_cpu / r["cpu"],
                         "speed-up (wall)": loop_wall / r["wall"],
                         "x FLOP limit (cpu)": r["cpu"] / limit_cpu,
                         "x FLOP limit (wall)": r["wall"] / limit_wall,
                         "x batched pass (cpu)": r["cpu"] / (draws * batched),
                         "vs func (cpu)": res["func"]["cpu"] / r["cpu"],
                         "peak RSS MiB": r["peak_rss_mb"], "ghost vs func rel. error": agree})
    ghost = {r["method"]: r for r in full if r["engine"] == "ghost"}
    print(table(full, f"Full contract: {n_queries} queries x {n_ckpt} checkpoints x "
                      f"{len(grid) * opts['n_noise']} draws + {n_ckpt} x {n} training samples "
                      f"({common.threads()} thread(s), {common.load()})"))
    print(f"FLOP limit: {draws:,} forward+backward draws x {per_draw / 1e6:.1f} MFLOP = "
          f"{flops / 1e12:.2f} TFLOP; {limit_cpu:.1f} s at {rate['cpu']:.0f} GFLOP/s per CPU second, "
          f"{limit_wall:.1f} s at {rate['wall']:.0f} GFLOP/s per wall second")
    print(f"batched-pass limit: {draws:,} draws x {1e3 * batched:.3f} ms = "
          f"{draws * batched:.1f} CPU s")
    print(f"ReTrac / TracIn (ghost, cpu): {ghost['retrac']['cpu s'] / ghost['tracin']['cpu s']:.2f}")
    print("(batch-1 loop: measured on the fraction above and extrapolated linearly: "
          f"{n_qc} x query-side time + {n_ckpt * n} x per-sample time)")


if __name__ == "__main__":
    main()
