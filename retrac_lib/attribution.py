"""Diffusion-TracIn and Diffusion-ReTrac scores (chapters 3 and 4).

For training sample ``x_i``, query ``z`` and checkpoints ``c`` with weights ``w_c``:

* TracIn:  ``I(x_i, z) = sum_c w_c < g_c(x_i), (1/|T'|) sum_t m_c(z, t) >``
* ReTrac:  ``I(x_i, z) = sum_c w_c < g_c(x_i)/|g_c(x_i)|, (1/|T'|) sum_t m_c(z, t)/|m_c(z, t)| >``

``g_c(x_i)`` is the loss gradient of ``x_i`` at the timestep and noise it was last trained with
before ``c``; ``m_c(z, t)`` the query's loss gradient averaged over ``K`` noise draws at timestep
``t`` of the grid ``T'``. Both sums collapse to one *query vector* per query and checkpoint, so
scoring streams the training gradients in chunks against a [Q, P] matrix: memory is bounded by
the chunk, never N x P. The query side never loops over draws: the mean of gradients is the
gradient of the mean loss, so each averaged gradient is one batched backward pass
(``grads.grouped_grads``).

To score many query sets against one run, ``sketch_training`` stores the training gradients
once, CountSketch-projected to ``k`` dimensions (``retrac_lib.projection``), and
``attribute(..., projection=sketch)`` scores against them: approximate, rank agreement measured
in ``benchmarks/bench_scaling.py``.
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cache, metrics, models
from .config import cache_dir
from .grads import grouped_grads
from .losses import check_loss
from .models import check_samples
from .projection import CountSketch
from .training import run_key

METHODS = ("tracin", "retrac")
# Where ReTrac normalizes the query side: after averaging the K draws of each timestep (the
# paper's official code), each single (t, eps) draw, or once for the fully averaged vector.
QUERY_NORMALIZATIONS = ("per_timestep", "per_draw", "cosine")
TRAIN_SIDES = ("recorded", "fresh_noise", "timestep_average")


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    """Every choice behind a score matrix; saved with it and part of its cache key."""

    method: str
    checkpoints: tuple[int, ...]
    timesteps: tuple[int, ...]
    n_noise: int
    noise_seed: int
    train_side: str
    normalization: str
    loss: str
    projection: int = 0          # k of the CountSketch the scores were computed in; 0 = exact
    projection_seed: int = 0
    noise_per_query: bool = False  # fresh query noise for every query and checkpoint

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.projection:  # exact results keep the keys they had before projections existed
            del d["projection"], d["projection_seed"]
        if not self.noise_per_query:  # likewise for shared query noise, the default
            del d["noise_per_query"]
        return d


@dataclasses.dataclass
class AttributionResult:
    """Scores [Q, N] of every training sample for every query, with what produced them.

    ``train_grad_norms`` [C, N] holds ``|g_c(x_i)|`` for each used checkpoint, the quantity the
    timestep bias lives in.
    """

    scores: torch.Tensor
    config: AttributionConfig
    checkpoint_weights: torch.Tensor
    train_grad_norms: torch.Tensor
    seconds: float = 0.0

    def top_k(self, k: int, largest: bool = True) -> torch.Tensor:
        """Indices [Q, k] of the ``k`` highest (or lowest) scoring training samples per query."""
        return metrics.top_k(self.scores, k, largest)

    def proponents(self, k: int) -> torch.Tensor:
        """The ``k`` training samples whose training step most reduced each query's loss."""
        return self.top_k(k, largest=True)

    def opponents(self, k: int) -> torch.Tensor:
        """The ``k`` training samples whose training step most increased each query's loss."""
        return self.top_k(k, largest=False)

    def save(self, folder: Path, key: dict | None = None) -> Path:
        """Write the result atomically (safetensors + JSON); ``key`` describes what produced it."""
        with cache.atomic_folder(Path(folder)) as tmp:
            cache.save_tensors(tmp / "scores.safetensors", {
                "scores": self.scores, "checkpoint_weights": self.checkpoint_weights,
                "train_grad_norms": self.train_grad_norms})
            cache.write_json(tmp / "config.json", {"config": self.config.to_dict(),
                                                   "seconds": self.seconds, "key": key})
        return Path(folder)

    @classmethod
    def load(cls, folder: Path) -> "AttributionResult":
        """Read a result written by ``save``, refusing a corrupted or partial folder."""
        cache.verify_folder(folder)
        tensors = cache.load_tensors(Path(folder) / "scores.safetensors")
        meta = cache.read_json(Path(folder) / "config.json")
        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        return cls(config=AttributionConfig(**cfg), seconds=meta["seconds"], **tensors)


def timestep_grid(n: int = 100, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``n`` evenly spaced timesteps in [1, T - 1] (the paper: 100 in [1, 999])."""
    return torch.linspace(1, num_train_timesteps - 1, n).round().long()


def query_noise_draws(sample_shape, n_timesteps: int, n_noise: int, seed: int) -> torch.Tensor:
    """Seeded noise [T', K, *sample]: the same draws for every query and checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n_timesteps, n_noise, *sample_shape), generator=gen)


def per_query_noise_draws(sample_shape, n_queries: int, n_timesteps: int, n_noise: int, seed: int,
                          checkpoint: int) -> torch.Tensor:
    """Seeded noise [Q, T', K, *sample]: fresh draws for every query and checkpoint, as the
    paper's official code draws them (``attribute(..., noise_per_query=True)``)."""
    return torch.stack([query_noise_draws(sample_shape, n_timesteps, n_noise,
                                          seed + 7919 * (q + 1) + 1_000_003 * (checkpoint + 1))
                        for q in range(n_queries)])


def _nonzero(norm: torch.Tensor) -> torch.Tensor:
    """Norms safe to divide by: a zero gradient then gets a zero normalized score, not NaN."""
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def _normalize_rows(g: torch.Tensor) -> torch.Tensor:
    return g / _nonzero(g.norm(dim=1, keepdim=True))


def _check_finite(g: torch.Tensor, what: str, offset: int, checkpoint: int) -> None:
    bad = (~torch.isfinite(g).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise FloatingPointError(
            f"The gradient of {what} {offset + int(bad[0])} at checkpoint {checkpoint} is NaN or "
            "infinite. Check that sample for NaN/inf values and the checkpoint for diverged weights."
        )


def query_vectors(model, scheduler, queries, timesteps, noise, method: str,
                  normalization: str = "per_timestep", loss: str = "mse",
                  chunk_size: int = 256, checkpoint: int = 0) -> torch.Tensor:
    """The query side [Q, P]: ``(1/|T'|) sum_t m(z, t)`` for TracIn, its normalized variants for ReTrac.

    ``noise`` is [T', K, *sample], the same for every query, or [Q, T', K, *sample]. Each query's draws are grouped so that one batched backward
    pass yields each averaged gradient: one group of T' x K draws for TracIn and "cosine", T'
    groups of K for "per_timestep", T' x K groups of one draw for "per_draw".
    """
    per_query = noise.dim() == queries.dim() + 2
    n_t, k = noise.shape[1:3] if per_query else noise.shape[:2]
    draws_per_group = {"tracin": n_t * k, "per_timestep": k, "per_draw": 1, "cosine": n_t * k}
    group = draws_per_group["tracin" if method == "tracin" else normalization]
    out = []
    for q, z in enumerate(queries):
        x = z.expand(n_t * k, *z.shape).reshape(-1, group, *z.shape)
        t = timesteps.repeat_interleave(k).reshape(-1, group)
        eps = noise[q] if per_query else noise
        g = grouped_grads(model, scheduler, x, t, eps.reshape(-1, group, *z.shape), loss, chunk_size)
        _check_finite(g.reshape(1, -1), "query", q, checkpoint)
        if method == "retrac":
            g = _normalize_rows(g)
        out.append(g.mean(0))
    return torch.stack(out)


def training_draws(run, c: int, train_side: str, timesteps: torch.Tensor,
                   noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [N, M] and noise [N, M, *sample] defining ``g_c(x_i)`` for each training sample.

    "recorded" (M = 1): the timestep and noise each sample was last trained with before ``c``;
    "fresh_noise" (M = 1): the recorded timestep with new seeded noise; "timestep_average"
    (M = |T'|): one seeded draw at every grid timestep, averaged (an image-level variant).
    """
    n, shape = len(run.data), run.data.sample_shape
    gen = torch.Generator().manual_seed(noise_seed + 1_000_003 * (c + 1))
    if train_side == "timestep_average":
        t = timesteps.expand(n, -1)
        return t, torch.randn((n, len(timesteps), *shape), generator=gen)
    t, noise = run.recorded(c)
    if train_side == "fresh_noise":
        noise = torch.randn(noise.shape, generator=gen)
    return t[:, None], noise[:, None]


def training_gradient_chunks(run, model, c: int, train_side: str, timesteps: torch.Tensor,
                             noise_seed: int, loss: str, chunk_size: int, train_slice=None):
    """Yield ``(indices, g_c(x_i) rows)`` over the training set (or the ``range`` of training
    indices ``train_slice``), ``chunk_size`` samples at a time.

    Memory is bounded by one chunk x P; a NaN or infinite gradient raises, naming the sample.
    """
    t, eps = training_draws(run, c, train_side, timesteps, noise_seed)
    x = run.data.images[:, None].expand(-1, t.shape[1], *run.data.sample_shape)
    span = range(len(run.data)) if train_slice is None else train_slice
    for a in range(span.start, span.stop, chunk_size):
        idx = torch.arange(a, min(a + chunk_size, span.stop))
        g = grouped_grads(model, run.scheduler, x[idx], t[idx], eps[idx], loss, chunk_size)
        _check_finite(g, "training sample", a, c)
        yield idx, g


def attribute(run, queries: torch.Tensor, method: str = "retrac", *, checkpoints=None,
              timesteps=100, n_noise: int = 16, query_noise: torch.Tensor | None = None,
              noise_seed: int = 0, train_side: str = "recorded",
              normalization: str = "per_timestep", loss: str | None = None,
              chunk_size: int = 64, device=None, progress: bool = True,
              projection=None, projection_seed: int = 0, train_slice=None,
              noise_per_query: bool = False) -> AttributionResult:
    """Influence of every training sample of ``run`` on every query: ``result.scores`` [Q, N].

    Args:
        queries: [Q, *sample] images or points (training images, held-out or generated ones).
        method: "tracin" (Diffusion-TracIn) or "retrac" (Diffusion-ReTrac).
        checkpoints: indices into ``run.checkpoints`` to sum over (default all), each weighted
            by ``lr * steps * batch / N``.
        timesteps: the query grid T': a number of evenly spaced timesteps in [1, T-1] or a list.
        n_noise: K, noise draws per timestep. ``query_noise`` passes them explicitly, [K, *sample]
            (reused at every timestep) or [T', K, *sample]; otherwise they are drawn from
            ``noise_seed``, the same for every query and checkpoint.
        noise_per_query: draw fresh seeded query noise for every query and checkpoint instead
            (``per_query_noise_draws``), as the paper's official code does.
        train_side: "recorded" (default), "fresh_noise" or "timestep_average".
        normalization: ReTrac's query-side placement, "per_timestep" (default), "per_draw" or
            "cosine"; ignored by TracIn.
        loss: "mse" or "l1"; default the loss the run was trained with.
        chunk_size: training samples (and query draws / 4) per batched gradient call; bounds memory.
        device: where gradients are computed (default the CPU; pass "cuda" to use a GPU); scores
            come back on the CPU.
        projection: None (exact, default); an int ``k`` to score in a ``k``-dimensional
            CountSketch of the gradients (seeded by ``projection_seed``); or a
            ``TrainingSketch`` from ``sketch_training`` to reuse stored training gradients.
            Training-gradient norms (and ReTrac's normalization) stay exact.
        train_slice: a ``range`` of training indices to score (default all); the other columns
            of ``scores`` and ``train_grad_norms`` stay 0. ``rl.distributed`` gives each process
            one slice.
    """
    start = time.perf_counter()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1; got {chunk_size}.")
    train_slice = _train_slice(train_slice, len(run.data), projection)
    config, grid, noise = resolve(run, queries, method, checkpoints, timesteps, n_noise,
                                  query_noise, noise_seed, train_side, normalization, loss,
                                  projection, projection_seed, noise_per_query)
    n = len(run.data)
    scores = torch.zeros(len(queries), n, dtype=torch.float64)
    norms = torch.zeros(len(config.checkpoints), n)
    weights = run.checkpoint_weights()[list(config.checkpoints)]
    sketch = projection
    if config.projection and not isinstance(projection, TrainingSketch):
        sketch = sketch_training(run, config.projection, checkpoints=config.checkpoints,
                                 timesteps=grid, train_side=train_side, loss=config.loss,
                                 noise_seed=noise_seed, seed=projection_seed,
                                 chunk_size=chunk_size, device=device, progress=progress)
    if config.projection:
        sketch.check_matches(run, config)
    n_scored = n if train_slice is None else len(train_slice)
    bar = tqdm(total=len(config.checkpoints) * (1 + (0 if config.projection else -(-n_scored // chunk_size))),
               desc=method, disable=not progress)
    for j, c in enumerate(config.checkpoints):
        model = run.model_at(c).to(device or "cpu")
        if noise_per_query:
            noise = per_query_noise_draws(run.data.sample_shape, len(queries), len(grid),
                                          config.n_noise, noise_seed, c)
        v = query_vectors(model, run.scheduler, queries, grid, noise, method,
                          config.normalization, config.loss, 4 * chunk_size, c)
        bar.update()
        if config.projection:
            s = sketch.checkpoints.index(c)
            g, norms[j] = sketch.sketches[s], sketch.norms[s]
            if method == "retrac":  # S is linear: S(g / |g|) = S(g) / |g|
                g = g / _nonzero(norms[j])[:, None]
            sv = sketch.projector()(v.cpu())
            scores += weights[j] * (sv @ g.T).double()
            continue
        for idx, g in training_gradient_chunks(run, model, c, train_side, grid, noise_seed,
                                               config.loss, chunk_size, train_slice):
            norm = g.norm(dim=1)
            norms[j, idx] = norm.cpu()
            dots = v @ g.T
            if method == "retrac":  # <v, g/|g|> = <v, g>/|g|, without a normalized copy of g
                dots = dots / _nonzero(norm)
            scores[:, idx] += weights[j] * dots.double().cpu()
            bar.update()
    bar.close()
    return AttributionResult(scores, config, weights, norms, time.perf_counter() - start)


@dataclasses.dataclass
class TrainingSketch:
    """Training gradients of a run stored once, CountSketch-projected to ``k`` dimensions.

    ``sketches`` [C, N, k] holds ``S g_c(x_i)`` (unnormalized, so one sketch serves TracIn and
    ReTrac) and ``norms`` [C, N] the exact ``|g_c(x_i)|``. C x N x k floats instead of the
    C x N x P that storing exact gradients would take; ``attribute(..., projection=sketch)``
    scores any queries against it without recomputing training gradients.
    """

    sketches: torch.Tensor
    norms: torch.Tensor
    checkpoints: tuple[int, ...]
    timesteps: tuple[int, ...]
    train_side: str
    loss: str
    noise_seed: int
    k: int
    seed: int
    n_params: int
    run: str

    @property
    def nbytes(self) -> int:
        return self.sketches.numel() * self.sketches.element_size()

    def projector(self) -> CountSketch:
        return CountSketch(self.n_params, self.k, self.seed)

    def check_matches(self, run, config: AttributionConfig) -> None:
        """Refuse to score with a sketch of another run or other training-side options."""
        wanted = dict(run=run_key(run.config, run.data), train_side=config.train_side,
                      loss=config.loss, noise_seed=config.noise_seed)
        if config.train_side == "timestep_average":
            wanted["timesteps"] = config.timesteps
        have = {key: getattr(self, key) for key in wanted}
        missing = [c for c in config.checkpoints if c not in self.checkpoints]
        if have != wanted or missing:
            diff = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
            raise ValueError(
                f"This TrainingSketch does not fit the call: (sketch, call) differ in {diff}"
                + (f"; checkpoints {missing} were not sketched" if missing else "")
                + ". Build it with sketch_training for this run and these options."
            )


def sketch_training(run, k: int, *, checkpoints=None, timesteps=100, train_side: str = "recorded",
                    loss: str | None = None, noise_seed: int = 0, seed: int = 0,
                    chunk_size: int = 64, device=None, progress: bool = True) -> TrainingSketch:
    """Every training gradient ``g_c(x_i)`` of ``run``, CountSketch-projected to ``k`` dimensions.

    Streams the gradients in chunks of ``chunk_size`` (memory: one chunk x P plus the C x N x k
    result); the options mean what they mean in ``attribute``.
    """
    if train_side not in TRAIN_SIDES:
        raise ValueError(f"train_side must be one of {TRAIN_SIDES}, got {train_side!r}.")
    k, seed = _projection(k, seed)
    run.require_log()
    loss = loss or run.config.loss
    check_loss(loss)
    checkpoints = _checkpoints(run, checkpoints)
    grid = parse_timesteps(timesteps, run.scheduler.config.num_train_timesteps)
    n = len(run.data)
    n_params = models.n_params(run.model_at(checkpoints[0]))
    project = CountSketch(n_params, k, seed)
    sketches = torch.zeros(len(checkpoints), n, k)
    norms = torch.zeros(len(checkpoints), n)
    bar = tqdm(total=len(checkpoints) * -(-n // chunk_size), desc="sketch", disable=not progress)
    for j, c in enumerate(checkpoints):
        model = run.model_at(c).to(device or "cpu")
        for idx, g in training_gradient_chunks(run, model, c, train_side, grid, noise_seed,
                                               loss, chunk_size):
            norms[j, idx] = g.norm(dim=1).cpu()
            sketches[j, idx] = project(g).cpu()
            bar.update()
    bar.close()
    return TrainingSketch(sketches, norms, checkpoints, tuple(grid.tolist()), train_side, loss,
                          noise_seed, k, seed, n_params, run_key(run.config, run.data))


def resolve(run, queries, method, checkpoints, timesteps, n_noise, query_noise, noise_seed,
            train_side, normalization, loss, projection=None, projection_seed: int = 0,
            noise_per_query: bool = False) -> tuple[AttributionConfig, torch.Tensor, torch.Tensor]:
    """Validate the options of ``attribute``; return its config, timestep grid and query noise."""
    run.require_log()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if normalization not in QUERY_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {QUERY_NORMALIZATIONS}, got {normalization!r}.")
    if train_side not in TRAIN_SIDES:
        raise ValueError(f"train_side must be one of {TRAIN_SIDES}, got {train_side!r}.")
    loss = loss or run.config.loss
    check_loss(loss)
    checkpoints = _checkpoints(run, checkpoints)
    model = run.model_at(checkpoints[0])
    check_samples(model, queries, "queries")
    dtype = next(model.parameters()).dtype
    if queries.dtype != dtype:
        raise ValueError(f"queries have dtype {queries.dtype} but the model computes in {dtype}; "
                         f"pass queries.to({dtype}).")
    if len(queries) == 0:
        raise ValueError("queries is empty: pass at least one query, shape [Q, *sample] with Q >= 1.")
    if query_noise is None and n_noise < 1:
        raise ValueError(f"n_noise must be at least 1 noise draw per timestep; got {n_noise}.")
    if noise_per_query and query_noise is not None:
        raise ValueError("noise_per_query=True draws fresh noise for every query; pass either it "
                         "or query_noise, not both.")
    grid = parse_timesteps(timesteps, run.scheduler.config.num_train_timesteps)
    noise = _query_noise(query_noise, grid, n_noise, noise_seed, run.data.sample_shape)
    k, seed = _projection(projection, projection_seed)
    config = AttributionConfig(method, checkpoints, tuple(grid.tolist()), noise.shape[1],
                               noise_seed, train_side,
                               normalization if method == "retrac" else "none", loss, k, seed,
                               bool(noise_per_query))
    return config, grid, noise


def _train_slice(train_slice, n: int, projection) -> range | None:
    if train_slice is None:
        return None
    if not isinstance(train_slice, range) or train_slice.step != 1 or not (
            0 <= train_slice.start <= train_slice.stop <= n):
        raise ValueError(f"train_slice must be a range(start, stop) of training indices with "
                         f"0 <= start <= stop <= {n}; got {train_slice!r}.")
    if projection is not None:
        raise ValueError("train_slice scores exact gradients only; pass projection=None.")
    return train_slice


def _checkpoints(run, checkpoints) -> tuple[int, ...]:
    """The checkpoint indices to sum over (default all), refusing ones the run does not have."""
    n_ckpt = len(run.checkpoints)
    checkpoints = tuple(range(n_ckpt)) if checkpoints is None else tuple(int(c) for c in checkpoints)
    missing = [c for c in checkpoints if not -n_ckpt <= c < n_ckpt]
    if missing or not checkpoints:
        raise ValueError(f"Checkpoints {missing or '[]'} do not exist: the run has checkpoints "
                         f"0..{n_ckpt - 1} (or negative from the end).")
    return tuple(c % n_ckpt for c in checkpoints)


def _projection(projection, seed) -> tuple[int, int]:
    if projection is None:
        return 0, 0
    if isinstance(projection, TrainingSketch):
        return projection.k, projection.seed
    if isinstance(projection, bool) or not isinstance(projection, int) or projection < 1:
        raise ValueError(f"projection must be None, a positive int k or a TrainingSketch; "
                         f"got {projection!r}.")
    return projection, int(seed)


def load_or_attribute(run, queries: torch.Tensor, method: str = "retrac", root: Path | None = None,
                      **options) -> AttributionResult:
    """``attribute`` with a cache: the saved result for exactly this run, queries and options.

    The key covers the run's configuration and data, the query values, the resolved options and
    the query noise values, so nothing is reused when any of them changed.
    """
    if options.get("train_slice") is not None:
        raise ValueError("load_or_attribute caches whole score matrices; call attribute for a train_slice.")
    defaults = {name: p.default for name, p in inspect.signature(attribute).parameters.items()}
    resolved = {name: options.get(name, defaults[name])
                for name in inspect.signature(resolve).parameters if name not in ("run", "queries", "method")}
    config, _, noise = resolve(run, queries, method, **resolved)
    payload = {"kind": "attribution", "run": run_key(run.config, run.data),
               "queries": cache.tensor_fingerprint(queries),
               "noise": cache.tensor_fingerprint(noise), "config": config.to_dict()}
    folder = Path(root or cache_dir()) / "attributions" / cache.key_for(payload)
    if folder.exists():
        saved = cache.read_json(folder / "config.json").get("key")
        if saved != payload:
            raise cache.CacheError(f"The cached attribution in {folder} was computed for another "
                                   "run, queries or options. Delete the folder to recompute it.")
        return AttributionResult.load(folder)
    result = attribute(run, queries, method, **options)
    result.save(folder, key=payload)
    return result


def parse_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    """A timestep grid from a count (evenly spaced in [1, T-1]) or an explicit list of timesteps."""
    count = isinstance(timesteps, numbers.Integral) and not isinstance(timesteps, bool)
    if isinstance(timesteps, torch.Tensor) and timesteps.ndim == 0:
        count, timesteps = True, int(timesteps)
    if count:
        if timesteps < 1:
            raise ValueError(f"timesteps must be a positive number of grid points or a list; got {timesteps}.")
        return timestep_grid(int(timesteps), num_train_timesteps)
    grid = torch.as_tensor(timesteps, dtype=torch.long).flatten()
    if len(grid) == 0 or grid.min() < 0 or grid.max() >= num_train_timesteps:
        raise ValueError(f"timesteps must be a non-empty list in [0, {num_train_timesteps}).")
    return grid


def _query_noise(query_noise, grid, n_noise, seed, sample_shape) -> torch.Tensor:
    if query_noise is None:
        return query_noise_draws(sample_shape, len(grid), n_noise, seed)
    shape = tuple(query_noise.shape)
    if shape[1:] == tuple(sample_shape):
        return query_noise.expand(len(grid), *shape)
    if shape[0] == len(grid) and shape[2:] == tuple(sample_shape):
        return query_noise
    raise ValueError(
        f"query_noise has shape {shape}; expected [K, {', '.join(map(str, sample_shape))}] or "
        f"[{len(grid)} timesteps, K, {', '.join(map(str, sample_shape))}]."
    )
