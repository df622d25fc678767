"""Diffusion-TracIn and Diffusion-ReTrac scores (chapters 3 and 4), and their cached twin.

For training sample ``x_i``, query ``z`` and checkpoints ``c`` with weights ``w_c``:

* TracIn:  ``I(x_i, z) = sum_c w_c < g_c(x_i), (1/|T'|) sum_t m_c(z, t) >``
* ReTrac:  ``I(x_i, z) = sum_c w_c < g_c(x_i)/|g_c(x_i)|, (1/|T'|) sum_t m_c(z, t)/|m_c(z, t)| >``

A call is validated once, at the door, into a ``ScoringPlan`` (``ScoringPlan.resolve``);
``score`` then adds up the checkpoints: the method object (``methods``) owns each formula's
normalizations and forms the query vectors, ``sides`` streams the training gradients against
them, a gradient engine (``engines``) computes both. Chapter 3, "TracIn
by hand, for one checkpoint", and chapter 4, "ReTrac by hand, for one checkpoint", compute both
in a few lines of tensor code and check ``attribute`` against them.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import validation
from ..losses import check_loss
from ..models import check_samples
from ..timesteps import parse_timesteps, per_query_noise_draws, query_noise_draws
from .engines import BY_NAME as ENGINE_CLASSES, Engine, FuncEngine, engine_name
from .methods import ReTrac, TracIn, method_for, query_vectors
from .options import TRAIN_SIDES, AttributionConfig
from .results import (AttributionResult, cache_key, load_or_compute, load_self_scores,
                      save_self_scores)
from .sides import TrainingGradients
from .sketch import TrainingSketch, projection_size, sketch_training

_OPTIONS = tuple(f.name for f in dataclasses.fields(AttributionConfig) if f.name != "method")
# how to compute, not what: not in the key
_HOW = ("chunk_size", "device", "progress", "engine", "allow_out_of_range")
# self-influence scores the training images, which are in range: no allow_out_of_range
_SELF_HOW = ("chunk_size", "device", "progress", "engine")


def attribute(run, queries: torch.Tensor, method: str = "retrac", *,
              query_noise: torch.Tensor | None = None, projection=None, chunk_size: int = 64,
              device=None, progress: bool = True, train_slice=None, engine: str = "auto",
              allow_out_of_range: bool = False, **options) -> AttributionResult:
    """Influence of every training sample of ``run`` on every query: ``result.scores`` [Q, N].

    Args:
        queries: [Q, *sample] images or points (training images, held-out or generated ones).
        method: "tracin" (Diffusion-TracIn), "retrac" (Diffusion-ReTrac) or "cosine" (the
            gradient cosine, ReTrac's "cosine" placement; ``methods`` has the formulas).
        query_noise: the K query noise draws, [K, *sample] (reused at every timestep) or
            [T', K, *sample]; by default they are drawn from ``noise_seed``, the same for every
            query and checkpoint. ``result.query_noise`` [T', K, *sample] holds those used
            (saved with the result), so passing it back reproduces the scores.
        projection: None (exact, default); an int ``k`` to score in a ``k``-dimensional
            CountSketch of the gradients (seeded by ``projection_seed``); or a
            ``TrainingSketch`` from ``sketch_training`` to reuse stored training gradients.
            Training-gradient norms (and ReTrac's normalization) stay exact.
        chunk_size: training samples (and query draws / 4) per batched gradient call; bounds memory.
        device: where gradients are computed (default the CPU; pass "cuda" to use a GPU); scores
            come back on the CPU.
        train_slice: a ``range`` of training indices to score (default all); the other columns
            of ``scores`` and ``train_grad_norms`` stay 0. ``rl.distributed`` gives each process
            one slice.
        engine: "func" forms per-sample gradient rows with ``torch.func`` (the readable path the
            chapters teach); "ghost" takes dot products and norms from layer factors without
            forming rows (``retrac_lib.ghost``, chapter 7; faster, same scores to float32
            rounding); "loop" takes one plain backward pass per draw (the slow reference);
            "auto" (default) uses "ghost" when the model's layers allow it.
        allow_out_of_range: score queries on another scale than the training images (beyond
            their range, such as 0..255 pixels on a [-1, 1] run) with an ``OutOfRangeWarning``
            instead of the ``ValueError`` (``validation.data_range``); the scores and their
            cache key do not depend on it.
        **options: the fields of ``AttributionConfig``, which the scores depend on:
            ``checkpoints`` (indices into ``run.checkpoints``, default all, each weighted by
            ``lr * visits / N``: its lr, by default the last step's, times the samples trained
            on since the previous checkpoint); ``timesteps`` (the query grid T': a number of evenly
            spaced timesteps in [1, T-1] or a list; default 100); ``n_noise`` (K draws per
            timestep, default 16); ``noise_seed``; ``noise_per_query`` (fresh seeded query noise
            for every query and checkpoint, as the paper's official code draws it);
            ``train_side`` ("recorded", "fresh_noise" or "timestep_average"); ``normalization``
            (ReTrac's query-side placement: "per_timestep" by default, "per_draw" or "cosine";
            ignored by TracIn, fixed by cosine); ``loss`` ("mse" or "l1", default the run's);
            ``projection_seed``.
    """
    start = time.perf_counter()
    how = dict(chunk_size=chunk_size, device=device, progress=progress, engine=engine,
               allow_out_of_range=allow_out_of_range, train_slice=train_slice)
    return score(ScoringPlan.resolve(run, queries, method, query_noise, projection, options,
                                     how), start)


def load_or_attribute(run, queries: torch.Tensor, method: str = "retrac", root: Path | None = None,
                      *, query_noise: torch.Tensor | None = None, projection=None,
                      **kwargs) -> AttributionResult:
    """``attribute`` with a cache: the saved result for exactly this run, queries and options.

    The key (``results.cache_key``) covers the run's configuration and data (and a recorded run's
    weights and log), the query values, the resolved ``AttributionConfig`` and the query noise
    values, so nothing is reused when any of them changed. ``kwargs`` are ``attribute``'s;
    those that say how to compute (engine, device, chunk_size) are validated even when the
    result comes from the cache, as they would be for computing it.
    """
    if kwargs.get("train_slice") is not None:
        raise ValueError("load_or_attribute caches whole score matrices; call attribute for a "
                         "train_slice.")
    start = time.perf_counter()
    options = {name: kwargs.pop(name) for name in _OPTIONS if name in kwargs}
    the_plan = ScoringPlan.resolve(run, queries, method, query_noise, projection, options, kwargs)
    payload = cache_key(run, queries, the_plan.noise, the_plan.config)
    result = load_or_compute(payload, root, AttributionResult.load,
                             lambda: score(the_plan, start),
                             lambda res, folder: res.save(folder, key=payload, exist_ok=True))
    if result.query_noise is None and not the_plan.config.noise_per_query:
        result.query_noise = the_plan.noise   # saved before results held it: the key's noise
    return result


@dataclasses.dataclass(frozen=True, eq=False)
class ScoringPlan:
    """Everything an ``attribute`` call computes, validated once: the resolved ``config`` (saved
    with the scores, part of their cache key), its method object and engine name, the query grid
    [T'] and shared query noise [T', K, *sample], the training side, a given ``TrainingSketch``
    (a projection size ``k`` alone is in ``config.projection``) and how to compute."""

    run: object
    queries: torch.Tensor
    config: AttributionConfig
    method: TracIn | ReTrac
    engine: str              # resolved: "func", "ghost" or "loop"
    grid: torch.Tensor
    noise: torch.Tensor
    training: TrainingGradients
    sketch: TrainingSketch | None
    chunk_size: int          # training samples per chunk
    query_chunk: int         # query draws per chunk
    device: torch.device
    progress: bool
    train_slice: range | None

    @classmethod
    def resolve(cls, run, queries, method: str, query_noise, projection, options: dict,
                how: dict) -> "ScoringPlan":
        """Validate an ``attribute`` call (its ``options`` name what the scores depend on,
        ``how`` how to compute them) and resolve what the defaults leave open: all checkpoints,
        the run's loss, the grid's timesteps, the query noise drawn from ``noise_seed``.

        Queries on another scale than the training data are refused
        (``validation.data_range``), or with ``allow_out_of_range`` scored with a warning.
        """
        _refuse_unknown(options, _OPTIONS)
        _refuse_unknown(how, _HOW + ("train_slice",))
        how = {**dict(chunk_size=64, device=None, progress=True, engine="auto",
                      allow_out_of_range=False, train_slice=None), **how}
        train_slice = _train_slice(how["train_slice"], len(run.data), projection)
        config = AttributionConfig(method=method, **options)
        run.require_log()
        the_method = method_for(config.method, config.normalization)
        validation.choice(config.train_side, "train_side", TRAIN_SIDES)
        loss = config.loss or run.config.loss
        check_loss(loss)
        checkpoints = validation.checkpoints(config.checkpoints, len(run.checkpoints))
        model = run.model_at(checkpoints[0])
        _check_queries(queries, run, model, how["allow_out_of_range"])
        grid, noise = _query_noise(config, run, queries, query_noise, model)
        k, seed = projection_size(projection, config.projection_seed)
        config = dataclasses.replace(
            config, checkpoints=checkpoints, timesteps=tuple(grid.tolist()),
            n_noise=noise.shape[1], normalization=the_method.normalization, loss=loss,
            noise_per_query=bool(config.noise_per_query), projection=k, projection_seed=seed)
        sketch = projection if isinstance(projection, TrainingSketch) else None
        if sketch is not None:
            sketch.check_matches(run, config)
        chunk_size = validation.chunk_size(how["chunk_size"])
        return cls(run, queries, config, the_method, engine_name(how["engine"], model), grid,
                   noise, TrainingGradients(run, config.train_side, grid, config.noise_seed),
                   sketch, chunk_size, 4 * chunk_size, validation.device(how["device"]),
                   bool(how["progress"]), train_slice)

    def engine_at(self, c: int, rows: bool = False) -> Engine:
        """The plan's engine bound to checkpoint ``c``'s model (on the plan's device), the run's
        scheduler and the loss; ``rows=True`` the ``torch.func`` engine, for sketches."""
        engine = FuncEngine if rows else ENGINE_CLASSES[self.engine]
        return engine(self.run.model_at(c).to(self.device), self.run.scheduler, self.config.loss)


def _refuse_unknown(given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown}; attribute takes query_noise, "
                        f"{', '.join(_HOW)}, train_slice and the options {', '.join(_OPTIONS)}.")


def _check_queries(queries, run, model, allow_out_of_range) -> None:
    check_samples(model, validation.tensor(queries, "queries"), "queries")
    validation.float_samples(queries, "queries", next(model.parameters()).dtype)
    if len(queries) == 0:
        raise ValueError("queries is empty: pass at least one query, shape [Q, *sample] with "
                         "Q >= 1.")
    validation.data_range(queries, run.data.images, "queries",
                          validation.flag(allow_out_of_range, "allow_out_of_range"))


def _query_noise(config: AttributionConfig, run, queries, query_noise, model):
    """The grid [T'] and the shared query noise [T', K, *sample]: ``query_noise`` checked, or
    drawn from ``noise_seed``."""
    n_noise = validation.n_noise(config.n_noise)
    validation.integer(config.noise_seed, "noise_seed", 0)
    if config.noise_per_query and query_noise is not None:
        raise ValueError("noise_per_query=True draws fresh noise for every query; pass either it "
                         "or query_noise, not both.")
    grid = parse_timesteps(config.timesteps, run.scheduler.config.num_train_timesteps)
    shape = run.data.sample_shape
    if query_noise is not None:
        dtype = next(model.parameters()).dtype
        return grid, validation.query_noise(query_noise, len(grid), shape, dtype)
    validation.grid_memory(len(grid), n_noise, shape,
                           len(queries) if config.noise_per_query else 1)
    return grid, query_noise_draws(shape, len(grid), n_noise, config.noise_seed)


def score(p: ScoringPlan, start: float | None = None) -> AttributionResult:
    """The scores of the plan ``p``: for every checkpoint, the query vectors and the training
    side's dot products with them (exact, or from a CountSketch), normalized by the method and
    weighted by the checkpoint. ``result.seconds`` counts from ``start`` (default: now)."""
    start = time.perf_counter() if start is None else start
    config = p.config
    n = len(p.run.data)
    scores = torch.zeros(len(p.queries), n, dtype=torch.float64)
    norms = torch.zeros(len(config.checkpoints), n)
    weights = p.run.checkpoint_weights()[list(config.checkpoints)]
    sketch = _sketch(p)
    n_scored = n if p.train_slice is None else len(p.train_slice)
    steps_per_checkpoint = 1 + (0 if sketch is not None else -(-n_scored // p.chunk_size))
    bar = tqdm(total=len(config.checkpoints) * steps_per_checkpoint, desc=config.method,
               disable=not p.progress)
    for j, c in enumerate(config.checkpoints):
        engine = p.engine_at(c)
        v = query_vectors(engine, p.queries, p.grid, _noise_at(p, c), p.method, p.query_chunk, c)
        bar.update()
        if sketch is not None:
            s = sketch.checkpoints.index(c)
            norms[j] = sketch.norms[s]
            dots = sketch.projector()(v.cpu()) @ sketch.sketches[s].T   # S is linear
            scores += weights[j] * p.method.training_scores(dots, norms[j]).double()
            continue
        for idx, norm, dots in p.training.dots(engine, c, v, p.chunk_size, p.train_slice):
            norms[j, idx] = norm.cpu()
            scores[:, idx] += weights[j] * p.method.training_scores(dots, norm).double().cpu()
            bar.update()
    bar.close()
    return AttributionResult(scores, config, weights, norms, time.perf_counter() - start,
                             query_noise=None if config.noise_per_query else
                             p.noise.detach().cpu().contiguous())


def self_scores(run, method: str = "retrac", *, chunk_size: int = 64, device=None,
                progress: bool = True, engine: str = "auto", **options) -> torch.Tensor:
    """Self-influence ``I(x_i, x_i)`` [N] (float64) of every training sample of ``run``: the
    diagonal of ``attribute(run, run.data.images, method, **options).scores``, without the
    other N x (N - 1) scores.

    Each chunk of ``chunk_size`` training samples is scored as queries against itself only, so
    the cost grows with N, not N^2 (the query side, N x T' x K draws, is the same). ``options``
    and the other arguments are ``attribute``'s; exact gradients only (no projection).
    """
    how = dict(chunk_size=chunk_size, device=device, progress=progress, engine=engine)
    return _diagonal(_self_plan(run, method, options, how))


def load_or_self_scores(run, method: str = "retrac", root: Path | None = None,
                        **kwargs) -> torch.Tensor:
    """``self_scores`` with a cache (folder ``root``, default ``rl.config.cache_dir()``): the
    saved scores for exactly this run, method and options, under ``load_or_attribute``'s key
    with every training image as a query (kind "self_scores"). The arguments that say how to
    compute are validated even when the scores come from the cache."""
    how = {name: kwargs.pop(name) for name in _SELF_HOW if name in kwargs}
    p = _self_plan(run, method, kwargs, how)
    payload = {**cache_key(run, run.data.images, p.noise, p.config), "kind": "self_scores"}
    return load_or_compute(payload, root, load_self_scores, lambda: _diagonal(p),
                           lambda values, folder: save_self_scores(values, folder, payload))


def _self_plan(run, method: str, options: dict, how: dict) -> ScoringPlan:
    """The ``ScoringPlan`` of ``self_scores``, for one chunk of the training images as
    queries: only one chunk's per-query noise is ever held, so its memory check counts one."""
    exact = [name for name in ("projection", "projection_seed") if name in options]
    if exact:
        raise ValueError(f"self_scores computes exact gradients only; do not pass {exact} (for "
                         "projected self-influence, take the diagonal of attribute's scores).")
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        exact_options = ", ".join(o for o in _OPTIONS if not o.startswith("projection"))
        raise TypeError(f"Unknown option(s) {unknown}; self_scores takes "
                        f"{', '.join(_SELF_HOW)} (load_or_self_scores also root) and the "
                        f"options {exact_options}.")
    chunk = validation.chunk_size(how.get("chunk_size", 64))
    return ScoringPlan.resolve(run, run.data.images[:chunk], method, None, None, options, how)


def _diagonal(p: ScoringPlan) -> torch.Tensor:
    """The self-influence scores [N] of the plan ``p`` of ``_self_plan``."""
    run, config = p.run, p.config
    images, n = run.data.images, len(run.data)
    out = torch.zeros(n, dtype=torch.float64)
    weights = run.checkpoint_weights()[list(config.checkpoints)]
    bar = tqdm(total=len(config.checkpoints) * -(-n // p.chunk_size),
               desc=f"{config.method} self-influence", disable=not p.progress)
    for j, c in enumerate(config.checkpoints):
        engine_c = p.engine_at(c)

        def vectors_for(idx):   # the query vectors of these training samples
            span = range(int(idx[0]), int(idx[-1]) + 1)
            return query_vectors(engine_c, images[idx], p.grid, _noise_at(p, c, span),
                                 p.method, p.query_chunk, c, first=span.start)

        for idx, norm, dots in p.training.self_dots(engine_c, c, vectors_for, p.chunk_size):
            out[idx] += weights[j] * p.method.training_scores(dots, norm).double().cpu()
            bar.update()
    bar.close()
    return out


def _noise_at(p: ScoringPlan, c: int, queries: range | None = None) -> torch.Tensor:
    """The query noise at checkpoint ``c``: the shared draws, or with ``noise_per_query`` fresh
    draws [Q, T', K, *sample] for every query (or for the queries of the range ``queries``)."""
    config = p.config
    if not config.noise_per_query:
        return p.noise
    queries = range(len(p.queries)) if queries is None else queries
    return per_query_noise_draws(p.run.data.sample_shape, len(queries), len(p.grid),
                                 config.n_noise, config.noise_seed, c, first=queries.start)


def _sketch(p: ScoringPlan) -> TrainingSketch | None:
    """The sketch to score against: the one given, one built for a projection size ``k``, or
    None for exact scores."""
    config = p.config
    if p.sketch is not None or not config.projection:
        return p.sketch
    return sketch_training(p.run, config.projection, checkpoints=config.checkpoints,
                           timesteps=p.grid, train_side=config.train_side, loss=config.loss,
                           noise_seed=config.noise_seed, seed=config.projection_seed,
                           chunk_size=p.chunk_size, device=p.device, progress=p.progress)


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
