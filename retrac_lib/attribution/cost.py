"""What an ``attribute`` call will cost, measured on a few of its own gradient passes.

``estimate`` resolves the options exactly as ``attribute`` does (so it refuses what the call
would refuse), counts the loss-gradient evaluations on the query side (C x Q x T' x K draws) and
the training side (C x N x M, M = |T'| for ``train_side="timestep_average"``, else 1), times one
chunk of each with the engine and chunk size the call would use (each pass ``repeats`` times,
the fastest kept, so one-time start-up costs are not extrapolated), and extrapolates linearly.
The command line's ``--dry-run`` prints it. Peak memory is the process's resident peak over the
measured passes (``resource``, where the system has it) or, on a GPU, torch's allocator peak.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import torch

try:
    import resource
except ImportError:   # not on Windows
    resource = None

from .. import validation
from .methods import query_vectors
from .scoring import ScoringPlan

MIB = 2 ** 20


@dataclasses.dataclass
class CostEstimate:
    """Counts of gradient evaluations, seconds extrapolated from measured passes, and memory."""

    config: object              # the resolved ``AttributionConfig``
    engine: str                 # the resolved engine: "func", "ghost" or "loop"
    query_draws: int            # loss-gradient evaluations on the query side, C x Q x T' x K
    training_gradients: int     # per-sample training gradients, C x N x M (0: a given sketch)
    seconds_per_query_draw: float
    seconds_per_training_gradient: float
    measured_query_draws: int
    measured_training_gradients: int
    fixed_seconds: float        # resolving the options and loading each checkpoint's weights
    peak_memory_bytes: int | None   # None where it cannot be measured
    memory_source: str
    result_bytes: int               # the scores, norms and query noise the result holds

    @property
    def query_seconds(self) -> float:
        return self.query_draws * self.seconds_per_query_draw

    @property
    def training_seconds(self) -> float:
        return self.training_gradients * self.seconds_per_training_gradient

    @property
    def seconds(self) -> float:
        return self.fixed_seconds + self.query_seconds + self.training_seconds

    def describe(self) -> str:
        c = self.config
        peak = ("not measurable here" if self.peak_memory_bytes is None else
                f"{self.peak_memory_bytes / MIB:.0f} MiB ({self.memory_source})")
        return "\n".join([
            f"{c.method} with engine {self.engine!r}: {len(c.checkpoints)} checkpoint(s), "
            f"{len(c.timesteps)} query timesteps x {c.n_noise} noise draws",
            f"query side: {self.query_draws} gradient draws; measured "
            f"{self.seconds_per_query_draw * 1e3:.3g} ms each on {self.measured_query_draws} "
            f"-> {self.query_seconds:.1f} s",
            f"training side: {self.training_gradients} per-sample gradients; measured "
            f"{self.seconds_per_training_gradient * 1e3:.3g} ms each on "
            f"{self.measured_training_gradients} -> {self.training_seconds:.1f} s",
            f"set-up (options, loading checkpoints): {self.fixed_seconds:.1f} s",
            f"estimated total: {self.seconds:.1f} s ({self.seconds / 3600:.2f} h)",
            f"peak memory: {peak}; the result holds {self.result_bytes / MIB:.1f} MiB",
        ])


def estimate(run, queries: torch.Tensor, method: str = "retrac", *,
             query_noise: torch.Tensor | None = None, projection=None, chunk_size: int = 64,
             device=None, engine: str = "auto", allow_out_of_range: bool = False,
             repeats: int = 2, **options) -> CostEstimate:
    """The cost of ``attribute(run, queries, method, ...)`` with the same arguments, from one
    chunk of query draws and one chunk of training gradients; nothing else is computed."""
    start = time.perf_counter()
    p = ScoringPlan.resolve(run, queries, method, query_noise, projection, options,
                            dict(chunk_size=chunk_size, device=device, engine=engine,
                                 allow_out_of_range=allow_out_of_range))
    config, grid, noise, chunk_size = p.config, p.grid, p.noise, p.chunk_size
    repeats = validation.integer(repeats, "repeats", 1)
    c = config.checkpoints[0]
    resolved = time.perf_counter()
    engine = p.engine_at(c)
    per_checkpoint = time.perf_counter() - resolved   # loading each checkpoint's weights
    n_t = max(1, min(len(grid), p.query_chunk // config.n_noise))   # one query chunk of draws
    n = len(run.data)
    span = range(0, min(chunk_size, n))
    per_sample = len(grid) if config.train_side == "timestep_average" else 1
    peak = _Peak(p.device)

    def query_pass():
        return query_vectors(engine, queries[:1], grid[:n_t], noise[:n_t], p.method,
                             p.query_chunk, c)

    q_seconds, vectors = fastest(query_pass, repeats, p.device)
    if p.sketch is not None:   # the training side is stored: nothing to measure
        t_seconds, measured = 0.0, 0
    else:
        def training_pass():
            if config.projection:   # sketch_training forms the rows
                chunks = p.training.rows(p.engine_at(c, rows=True), c, chunk_size, span)
            else:
                chunks = p.training.dots(engine, c, vectors.expand(len(queries), -1), chunk_size,
                                         span)
            return list(chunks)

        t_seconds, _ = fastest(training_pass, repeats, p.device)
        measured = len(span) * per_sample
    n_c = len(config.checkpoints)
    result_bytes = (8 * len(queries) * n + 4 * n_c * n
                    + (0 if config.noise_per_query else noise.numel() * noise.element_size()))
    return CostEstimate(
        config, p.engine, n_c * len(queries) * len(grid) * config.n_noise,
        0 if p.sketch is not None else n_c * n * per_sample,
        q_seconds / (n_t * config.n_noise), t_seconds / measured if measured else 0.0,
        n_t * config.n_noise, measured, resolved - start + n_c * per_checkpoint, *peak.read(),
        result_bytes)


def fastest(fn, repeats: int, device=None, warmup: bool = False):
    """The fastest of ``repeats`` timings of ``fn()`` (after one untimed call with ``warmup``)
    and its last result; on a GPU each reading waits for the queued work (``synchronize``)."""
    def sync():
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    if warmup:
        fn()
        sync()
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


class _Peak:
    """The peak memory of the passes that follow: torch's allocator on a GPU, else this
    process's resident peak (``resource.getrusage``), or None where neither is available."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device = device

    def read(self) -> tuple[int | None, str]:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device), "GPU, torch's allocator peak"
        if resource is None:
            return None, "unavailable"
        scale = 1 if sys.platform == "darwin" else 1024   # ru_maxrss: bytes on macOS, else KiB
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
                "CPU, this process's resident peak so far")
