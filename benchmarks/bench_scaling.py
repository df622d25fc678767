"""Scaling of ``rl.attribute``: training-set size N, parameter count P, queries, threads, chunk size.

    OMP_NUM_THREADS=1 RETRAC_CACHE=/tmp/rcache python benchmarks/bench_scaling.py [--skip-threads]

Every configuration runs in a fresh subprocess so that its peak resident memory (VmHWM) is its
own, once per gradient engine ("ghost" and "func"). The N and P sweeps use one-checkpoint runs
(1 epoch; attribution cost does not depend on how well the model is trained) and a small query
side (1 query, 10 timesteps x 4 draws), so the time is dominated by the N training gradients the
scores stream through; the query sweep uses the paper's grid (100 timesteps x 16 draws).
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

SMALL_QUERY = dict(timesteps=10, n_noise=4)
ENGINES = ("ghost", "func")


def _run(n: int, channels) -> "rl.Run":
    data = rl.data.digits("all")
    if n > len(data):  # repeat the digits (attribution cost only depends on N)
        reps = -(-n // len(data))
        data = rl.data.Dataset(f"digits-x{reps}", data.images.repeat(reps, 1, 1, 1)[:n],
                               data.labels.repeat(reps)[:n])
    elif n < len(data):
        data = data.subset(range(n), name=f"digits-first-{n}")
    cfg = rl.TrainConfig(block_out_channels=tuple(channels), epochs=1, batch_size=64, lr=2e-3,
                         checkpoint_every=1)
    return rl.load_or_train(cfg, data, progress=False)


def child_attribute(spec: dict) -> dict:
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    run = _run(spec["n"], spec["channels"])
    base = common.peak_rss_mb()
    queries = common.contract_queries(spec.get("queries", 1))
    with Timer() as tm:
        rl.attribute(run, queries, "retrac", chunk_size=spec.get("chunk", 64), progress=False,
                     engine=spec.get("engine", "auto"), **spec.get("grid", SMALL_QUERY))
    p = sum(v.numel() for v in run.checkpoints[0].params.values())
    return {"wall": tm.wall, "cpu": tm.cpu, "peak_rss_mb": common.peak_rss_mb(),
            "rss_before_mb": base, "P": p}


def child_parts(spec: dict) -> dict:
    """Query side (ReTrac, TracIn) and training side of one query and checkpoint."""
    torch.set_num_threads(spec["threads"])
    run = rl.load_or_train(*common.contract_setup(), progress=False)
    model, c = run.model_at(-1), len(run.checkpoints) - 1
    grid = rl.timesteps.timestep_grid(100)
    noise = rl.timesteps.query_noise_draws(run.data.sample_shape, 100, 16, 0)
    z = common.contract_queries(1)
    t, eps = run.recorded(c)
    out = {}
    func = rl.attribution.engine_for("func", model, run.scheduler)
    for name, fn in (
        ("ReTrac query side (1,600 draws)", lambda: rl.attribution.query_vectors(
            func, z, grid, noise, rl.attribution.ReTrac(), chunk_size=spec["query_chunk"])),
        ("TracIn query side (1,600 draws)", lambda: rl.attribution.query_vectors(
            func, z, grid, noise, rl.attribution.TracIn(), chunk_size=spec["query_chunk"])),
        ("training side (512 samples)", lambda: grads.grouped_grads(
            model, run.scheduler, run.data.images[:512, None], t[:512, None], eps[:512, None],
            "mse", spec["chunk"])),
    ):
        fn()
        with Timer() as tm:
            fn()
        out[name] = (tm.wall, tm.cpu)
    out["peak_rss_mb"] = common.peak_rss_mb()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="250,500,1000,1797,3594")
    ap.add_argument("--widths", default="16x32,32x64,64x128")
    ap.add_argument("--queries", default="1,4,16")
    ap.add_argument("--skip-threads", action="store_true")
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        fn = child_parts if spec["kind"] == "parts" else child_attribute
        print(json.dumps(fn(spec)))
        return
    me = Path(__file__)
    print(f"torch {torch.__version__}, {common.threads()} thread(s), {common.load()}")

    # ---- N
    rows = []
    for n, engine in ((n, e) for n in map(int, args.sizes.split(",")) for e in ENGINES):
        _run(n, (16, 32))  # train (cached) outside the timed child
        r = common.run_child(me, ["--child", json.dumps({"kind": "attr", "n": n, "channels": [16, 32],
                                                          "engine": engine})])
        rows.append({"N": n, "engine": engine, "wall s": r["wall"], "cpu s": r["cpu"], "cpu ms / sample": 1e3 * r["cpu"] / n,
                     "peak RSS MiB": r["peak_rss_mb"], "RSS before MiB": r["rss_before_mb"],
                     "load": common.load()})
    print(table(rows, "Time and memory against N (ReTrac, 1 checkpoint, P = 159,697, chunk 64, "
                      "1 query x 10 x 4 draws)"))

    # ---- P
    rows = []
    for w, engine in ((w, e) for w in args.widths.split(",") for e in ENGINES):
        ch = [int(c) for c in w.split("x")]
        run = _run(500, ch)
        fl = common.flops_per_draw(run.model_at(0), run.scheduler, run.data.sample_shape)
        r = common.run_child(me, ["--child", json.dumps({"kind": "attr", "n": 500, "channels": ch,
                                                          "engine": engine})])
        rows.append({"channels": w, "engine": engine, "P": r["P"], "MFLOP/draw": (fl["forward"] + fl["backward"]) / 1e6,
                     "wall s": r["wall"], "cpu s": r["cpu"], "cpu ms / sample": 2 * r["cpu"],
                     "peak RSS MiB": r["peak_rss_mb"], "chunk rows MiB": 64 * r["P"] * 4 / 2 ** 20,
                     "load": common.load()})
    print(table(rows, "Time and memory against P (ReTrac, N = 500, 1 checkpoint, chunk 64)"))

    # ---- queries, on the paper's grid
    rows = []
    for q, engine in ((q, e) for q in map(int, args.queries.split(",")) for e in ENGINES):
        r = common.run_child(me, ["--child", json.dumps({"kind": "attr", "n": 1797, "channels": [16, 32],
                                                          "engine": engine, "queries": q,
                                                          "grid": common.CONTRACT})])
        rows.append({"queries": q, "engine": engine, "wall s": r["wall"], "cpu s": r["cpu"],
                     "cpu s / query": r["cpu"] / q, "peak RSS MiB": r["peak_rss_mb"],
                     "load": common.load()})
    print(table(rows, "Time and memory against queries (ReTrac, N = 1,797, 1 checkpoint, "
                      "100 timesteps x 16 draws per query)"))
    if args.skip_threads:
        return

    # ---- threads and chunk sizes
    rows = []
    for threads, chunk, query_chunk in ((1, 64, 256), (2, 64, 256), (1, 16, 256), (1, 32, 256),
                                        (1, 128, 256), (1, 256, 256), (1, 64, 64), (1, 64, 1024)):
        r = common.run_child(me, ["--child", json.dumps({"kind": "parts", "threads": threads,
                                                          "chunk": chunk, "query_chunk": query_chunk})],
                             env={"OMP_NUM_THREADS": str(threads)})
        row = {"threads": threads, "train chunk": chunk, "query chunk": query_chunk}
        for k, (wall, cpu) in ((k, v) for k, v in r.items() if k != "peak_rss_mb"):
            row[k.split(" (")[0] + " wall s"] = wall
            row[k.split(" (")[0] + " cpu s"] = cpu
        row["peak RSS MiB"] = r["peak_rss_mb"]
        row["load"] = common.load()
        rows.append(row)
    print(table(rows, "Threads and chunk sizes: one query and checkpoint (1,600 draws), 512 "
                      "training samples (library path)"))


if __name__ == "__main__":
    main()
