"""Benchmark per-sample gradients: torch.func vmap (several chunk sizes) against the autograd loop.

    OMP_NUM_THREADS=2 python benchmarks/bench_grads.py              # the book's UNet and MLP, CPU
    python benchmarks/bench_grads.py --device cuda --batch 1024      # on a GPU
    python benchmarks/bench_grads.py --smoke                         # tiny sizes, seconds

For each configuration it prints, as a Markdown table:

* ``grads/s``: per-sample gradients per second, the best of ``--repeats`` timed calls after one
  warm-up call, for a batch of ``--batch`` training samples at their recorded timesteps and noise
  (final checkpoint of the book's cached run: ``setups.digits_setup()`` / ``points_setup()``).
* ``peak MiB``: the extra memory the call needed at its peak, the returned [B, P] matrix included.
  On CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus the allocation before it
  (exact, PyTorch's allocator). On CPU: the process's resident set size (``/proc/self/statm``),
  sampled every millisecond by a helper thread during the call, minus the RSS just before it;
  freed heap memory is handed back to the OS (``malloc_trim``) between calls so each starts from
  the same baseline. Sampling can miss spikes shorter than a millisecond, so read it as a close
  lower bound. ``resource.getrusage`` reports the whole process's peak RSS at the end.
* ``out MiB``: the size of the returned matrix, B x P x 4 bytes, for comparison.

This is a script, not a test: timings depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import resource
import threading
import time

import torch

import retrac_lib as rl
from retrac_lib.book import setups as book_setups
from retrac_lib.grads import per_sample_grads_loop

MiB = 2 ** 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS baselines are then less tight
        pass


class _PeakRSS:
    """Highest RSS seen by a thread polling every millisecond while the block runs."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def measure(fn, device: str, repeats: int) -> tuple[float, float]:
    """(best seconds, peak extra bytes) of ``fn()``, after one warm-up call."""
    fn()
    best, peak = float("inf"), 0
    for _ in range(repeats):
        _trim()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        else:
            with _PeakRSS() as mem:
                start = time.perf_counter()
                out = fn()
                best = min(best, time.perf_counter() - start)
            peak = max(peak, mem.extra)
        del out
    return best, peak


def engines() -> dict:
    """The per-sample gradient implementations to time, by name: the torch.func path."""
    return {"vmap": rl.per_sample_grads}


def bench(name, run, device, batch, chunks, loop_batch, repeats):
    model = run.model_at(-1).to(device)
    t, eps = run.recorded(-1)
    n = min(batch, len(run.data))
    x, t, eps = run.data.images[:n].to(device), t[:n].to(device), eps[:n].to(device)
    p = rl.models.n_params(model)
    nl = min(loop_batch, n)
    sec, mem = measure(lambda: per_sample_grads_loop(model, run.scheduler, x[:nl], t[:nl], eps[:nl]),
                       device, repeats)
    yield (name, p, "loop", "-", nl, sec, nl / sec, mem / MiB, nl * p * 4 / MiB)
    for method, fn in engines().items():
        for chunk in chunks:
            sec, mem = measure(lambda: fn(model, run.scheduler, x, t, eps, chunk_size=chunk),
                               device, repeats)
            yield (name, p, method, chunk, n, sec, n / sec, mem / MiB, n * p * 4 / MiB)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="samples per vmap call")
    parser.add_argument("--loop-batch", type=int, default=32, help="samples for the (slow) loop")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny runs and sizes (seconds)")
    parser.add_argument("--models", nargs="+", default=["unet", "mlp"], choices=["unet", "mlp"])
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.loop_batch, args.chunks, args.repeats = 16, 8, [4, 16], 1
    print(f"engines: loop, {', '.join(engines())}")

    setups = {"unet": ("digits UNet", book_setups.digits_setup),
              "mlp": ("moons MLP", book_setups.points_setup)}
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          f"{' (smoke sizes)' if args.smoke else ''}\n")
    head = ("model", "P", "method", "chunk", "batch", "seconds", "grads/s", "peak MiB", "out MiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|", flush=True)
    for key in args.models:
        name, setup = setups[key]
        run = rl.load_or_train(*setup(smoke=args.smoke), progress=False)
        for row in bench(name, run, args.device, args.batch, args.chunks, args.loop_batch, args.repeats):
            name_, p, method, chunk, n, sec, rate, mem, out = row
            print(f"| {name_} | {p:,} | {method} | {chunk} | {n} | {sec:.2f} | {rate:,.0f} | "
                  f"{mem:,.0f} | {out:,.0f} |", flush=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"\nprocess peak RSS (getrusage ru_maxrss): {peak_kib / 1024:,.0f} MiB")


if __name__ == "__main__":
    main()
