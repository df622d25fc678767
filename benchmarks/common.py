"""Helpers shared by the benchmark scripts: the paper-contract run, timers, machine limits.

Benchmarks print tables; they are not tests. Timings are wall-clock seconds and CPU seconds of
the process (user + system, children excluded): on a shared machine the CPU time is the steadier
of the two, so every table carries both and the load average when it was measured.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import retrac_lib as rl

# The paper's contract: 100 timesteps x 16 noise draws, 3 checkpoints, all 1,797 digits, 16 queries.
CONTRACT = dict(timesteps=100, n_noise=16)
N_QUERIES = 16


def contract_setup(n: int | None = None, block_out_channels=(16, 32), epochs: int = 30,
                   checkpoint_every: int = 10):
    """(TrainConfig, Dataset) of the benchmark run: the book's UNet on all 1,797 digits (or the
    first ``n``), 3 checkpoints by default."""
    data = rl.data.digits("all")
    if n is not None and n != len(data):
        data = data.subset(range(n), name=f"digits-first-{n}")
    cfg = rl.TrainConfig(block_out_channels=tuple(block_out_channels), epochs=epochs, batch_size=64,
                         lr=2e-3, checkpoint_every=checkpoint_every)
    return cfg, data


def contract_queries(n: int = N_QUERIES) -> torch.Tensor:
    """The first ``n`` test-split digits (they are also training digits of the all-digits run)."""
    return rl.data.digits("test").images[:n]


class Timer:
    """``with Timer() as t: ...`` then ``t.wall``, ``t.cpu`` (seconds)."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w, _cpu() - self._c


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def threads() -> int:
    return torch.get_num_threads()


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict:
    """Measured float32 ``torch.mm`` rate (GFLOP/s) per wall second and per CPU second."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    with Timer() as t:
        for _ in range(repeats):
            a @ b
    flops = 2 * n ** 3 * repeats
    return {"wall": flops / t.wall / 1e9, "cpu": flops / t.cpu / 1e9}


def flops_per_draw(model, scheduler, sample_shape, loss: str = "mse", batch: int = 64) -> dict:
    """FLOPs of one forward and one backward pass of the DDPM loss, per draw (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *sample_shape)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
    noise = torch.randn_like(x)
    with FlopCounterMode(display=False) as fwd:
        value = rl.losses.diffusion_loss(model, scheduler, x, t, noise, loss).mean()
    with FlopCounterMode(display=False) as bwd:
        value.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": fwd.get_total_flops() / batch, "backward": bwd.get_total_flops() / batch}


def run_child(script: Path, args: list[str], env: dict | None = None) -> dict:
    """Run ``script --child ...`` in a fresh process; it prints one JSON line last."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], title: str) -> str:
    """A plain-text table of ``rows`` (dicts with the same keys), floats to 3 significant digits."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
        return str(v)
    keys = list(rows[0])
    cells = [[fmt(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "| " + " | ".join(v.rjust(w) for v, w in zip(vals, widths)) + " |"  # noqa
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"\n{title}", line(keys), sep, *(line(c) for c in cells)])
