"""Retrains in ensembles (``rl.ensemble.train_many``) against one ``rl.train`` at a time: seconds
per member-step for M members at once, on a device, for the study's n250 rung model or one of
chapter 5's retraining setups.

    RETRAC_CACHE=/tmp/rcache OMP_NUM_THREADS=1 python benchmarks/bench_ensemble.py --device cpu
    OMP_NUM_THREADS=1 python benchmarks/bench_ensemble.py --device cpu --setup ch5-points
    python benchmarks/bench_ensemble.py --device cuda --sizes 1,4,16,32,64 --steps 8

``--setup n250`` (default): the n250 rung's model and recipe (``retrac_lib.evaluation.study``:
the (8, 16, 32) UNet on 32x32 MNIST, batch 32, Adam), the data the rung's first ``--steps`` x
32 digits. ``ch5-points`` and ``ch5-digits``: chapter 5's retrains (``book.setups``: the MLP on
two-moons points, batch 64; the (8, 16) UNet on 8x8 digits, batch 32), the data half of the
setup's training set, as its LDS subsets (``--steps`` is ignored). A step's cost is marginal:
(seconds of 3 epochs - seconds of 1 epoch) / (2 x steps per epoch), after one warm-up, so
building, stacking and moving the models and the recorder's first-step replay drop out. Wall
seconds, and CPU seconds of the process (the steadier figure on a shared CPU; on a GPU only the
wall seconds count). ``rl.train`` always runs on
the CPU (it has no device); ``train_many`` on ``--device``. ``--tiny``: the setup's smoke
sizes (for n250: 11 digits, batch 16), M = 1, 2 (checks the plumbing in seconds). ``--out FILE`` appends the table
(markdown) to FILE.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import table  # noqa: E402

from retrac_lib import machine  # noqa: E402
from retrac_lib.evaluation import study  # noqa: E402
from retrac_lib.ensemble import train_many  # noqa: E402
from retrac_lib.training import train  # noqa: E402


def per_step(train_for, steps: int) -> tuple[float, float]:
    """Marginal (wall, CPU) seconds per step of ``train_for(epochs)``: 3 epochs less 1."""
    timers = []
    for epochs in (3, 1):
        with common.Timer() as t:
            train_for(epochs)
        timers.append(t)
    return ((timers[0].wall - timers[1].wall) / (2 * steps),
            (timers[0].cpu - timers[1].cpu) / (2 * steps))


def retrains(setup: str, tiny: bool, steps: int):
    """``(config, training data, label)`` of one retrain of ``setup``."""
    if setup == "n250":
        rung = study.get_rung("n250", smoke=tiny)
        data = study.rung_data(rung)[0]
        data = data.subset(range(min(len(data), steps * rung.config.batch_size)))
        return rung.config, data, f"{rung.label} model {rung.config.block_out_channels}"
    from retrac_lib.book import setups

    chapter = (setups.counterfactual_setup if setup == "ch5-points"
               else setups.digits_counterfactual_setup)(smoke=tiny)
    data = chapter.data.subset(range(len(chapter.data) // 2))
    model = "MLP" if chapter.config.model == "mlp" else f"UNet {chapter.config.block_out_channels}"
    return chapter.config, data, f"chapter 5's {setup[4:]} retrains ({model}, N = {len(data)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="1,4,16", help="ensemble sizes M, comma-separated")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps per epoch")
    ap.add_argument("--tiny", action="store_true", help="the smoke sizes, M = 1, 2")
    ap.add_argument("--setup", choices=("n250", "ch5-points", "ch5-digits"), default="n250",
                    help="whose retrains: the study's n250 rung or one of chapter 5's setups")
    ap.add_argument("--out", type=Path, help="append the table (markdown) to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = [1, 2] if args.tiny else [int(m) for m in args.sizes.split(",")]
    cfg, data, label = retrains(args.setup, args.tiny, args.steps)
    steps = -(-len(data) // cfg.batch_size)
    name = machine.device_name(device)

    warm = data.subset(range(min(len(data), cfg.batch_size)))
    train(cfg.replace(epochs=1), warm, progress=False)
    train_many([cfg.replace(epochs=1, seed=i) for i in range(2)], [warm] * 2, device)
    wall, cpu = per_step(lambda e: train(cfg.replace(epochs=e), data, progress=False), steps)
    rows = [{"trainer": "rl.train (cpu)", "M": 1, "s per step": wall,
             "s per member-step": wall, "CPU s per member-step": cpu,
             "speed-up vs rl.train (wall)": 1.0}]
    for m in sizes:
        w, c = per_step(lambda e: train_many([cfg.replace(epochs=e, seed=i) for i in range(m)],
                                             [data] * m, device), steps)
        rows.append({"trainer": f"train_many ({device.type})", "M": m, "s per step": w,
                     "s per member-step": w / m, "CPU s per member-step": c / m,
                     "speed-up vs rl.train (wall)": wall * m / w})
        print(f"M = {m}: {w / m:.3g} s per member-step", file=sys.stderr, flush=True)
    title = (f"## Retrains in ensembles: {device} ({name})\n\n{label}, "
             f"batch {cfg.batch_size}, {steps} steps per epoch; torch "
             f"{torch.__version__}, diffusers {diffusers.__version__}; {common.load()}; "
             "train_many in full float32 (no TF32), its draws made in a second thread\n")
    text = table(rows, title) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
