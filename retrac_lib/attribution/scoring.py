"""Diffusion-TracIn and Diffusion-ReTrac scores (chapters 3 and 4), and their cached twin.

For training sample ``x_i``, query ``z`` and checkpoints ``c`` with weights ``w_c``:

* TracIn:  ``I(x_i, z) = sum_c w_c < g_c(x_i), (1/|T'|) sum_t m_c(z, t) >``
* ReTrac:  ``I(x_i, z) = sum_c w_c < g_c(x_i)/|g_c(x_i)|, (1/|T'|) sum_t m_c(z, t)/|m_c(z, t)| >``

Chapter 3, "TracIn by hand, for one checkpoint", computes the first in a few lines of tensor code
and checks ``attribute`` against it; chapter 4, "Re-normalizing the dot product", derives the
second. ``sides`` computes the two factors at scale.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import cache, validation
from ..timesteps import per_query_noise_draws
from .options import AttributionConfig
from .results import AttributionResult, cache_key, cached
from .sides import clamp_norm, query_vectors, resolve_engine, training_dots
from .sketch import TrainingSketch, projection_size, sketch_training

_OPTIONS = tuple(f.name for f in dataclasses.fields(AttributionConfig) if f.name != "method")
# how to compute, not what: not in the key
_HOW = ("chunk_size", "device", "progress", "engine", "allow_out_of_range")


def attribute(run, queries: torch.Tensor, method: str = "retrac", *,
              query_noise: torch.Tensor | None = None, projection=None, chunk_size: int = 64,
              device=None, progress: bool = True, train_slice=None, engine: str = "auto",
              allow_out_of_range: bool = False, **options) -> AttributionResult:
    """Influence of every training sample of ``run`` on every query: ``result.scores`` [Q, N].

    Args:
        queries: [Q, *sample] images or points (training images, held-out or generated ones).
        method: "tracin" (Diffusion-TracIn) or "retrac" (Diffusion-ReTrac).
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
            rounding); "auto" (default) uses "ghost" when the model's layers allow it.
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
            (ReTrac's query-side placement: "per_timestep", "per_draw" or "cosine"; ignored by
            TracIn); ``loss`` ("mse" or "l1", default the run's); ``projection_seed``.
    """
    start = time.perf_counter()
    train_slice = _train_slice(train_slice, len(run.data), projection)
    resolved = _resolve(run, queries, method, query_noise, projection, options, allow_out_of_range)
    return _timed_score(start, run, queries, resolved, projection, chunk_size, device, progress,
                        train_slice, engine)


def load_or_attribute(run, queries: torch.Tensor, method: str = "retrac", root: Path | None = None,
                      *, query_noise: torch.Tensor | None = None, projection=None,
                      allow_out_of_range: bool = False, **kwargs) -> AttributionResult:
    """``attribute`` with a cache: the saved result for exactly this run, queries and options.

    The key (``results.cache_key``) covers the run's configuration and data (and a recorded run's
    weights and log), the query values, the resolved ``AttributionConfig`` and the query noise
    values, so nothing is reused when any of them changed. ``kwargs`` are ``attribute``'s.
    """
    if kwargs.get("train_slice") is not None:
        raise ValueError("load_or_attribute caches whole score matrices; call attribute for a train_slice.")
    start = time.perf_counter()
    options = {name: kwargs.pop(name) for name in _OPTIONS if name in kwargs}
    _refuse_unknown(kwargs, _HOW + ("train_slice",))
    resolved = _resolve(run, queries, method, query_noise, projection, options, allow_out_of_range)
    payload = cache_key(run, queries, resolved[2], resolved[0])
    folder, result = cached(payload, root)
    if result is not None:
        if result.query_noise is None and not resolved[0].noise_per_query:
            result.query_noise = resolved[2]   # saved before results held it: the key's noise
        return result
    can_save = cache.prepare(folder)
    result = _timed_score(start, run, queries, resolved, projection, **kwargs)
    if can_save:
        cache.try_save(lambda: result.save(folder, key=payload, exist_ok=True), folder)
    return result


def _refuse_unknown(given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"Unknown option(s) {unknown}; attribute takes query_noise, projection, "
                        f"{', '.join(_HOW)}, train_slice and the options {', '.join(_OPTIONS)}.")


def _resolve(run, queries, method, query_noise, projection, options: dict, allow_out_of_range):
    _refuse_unknown(options, _OPTIONS)
    config = AttributionConfig(method=method, **options)
    resolved, grid, noise = config.resolve(run, queries, query_noise, allow_out_of_range)
    k, seed = projection_size(projection, config.projection_seed)
    return dataclasses.replace(resolved, projection=k, projection_seed=seed), grid, noise


def _timed_score(start, run, queries, resolved, projection, chunk_size=64, device=None,
                 progress=True, train_slice=None, engine="auto") -> AttributionResult:
    """``_score`` for ``_resolve``'s output, timed from ``start``; the arguments of how to compute
    are checked here."""
    chunk_size, device = validation.chunk_size(chunk_size), validation.device(device)
    result = _score(run, queries, *resolved, projection, chunk_size, device, progress,
                    train_slice, engine)
    result.seconds = time.perf_counter() - start
    return result


def _score(run, queries, config: AttributionConfig, grid, noise, projection, chunk_size, device,
           progress, train_slice, engine) -> AttributionResult:
    """The scores for a resolved ``config``: query vectors per checkpoint, training gradients
    streamed against them (or read from a sketch)."""
    method = config.method
    engine = resolve_engine(engine, run.model_at(config.checkpoints[0]))
    n = len(run.data)
    scores = torch.zeros(len(queries), n, dtype=torch.float64)
    norms = torch.zeros(len(config.checkpoints), n)
    weights = run.checkpoint_weights()[list(config.checkpoints)]
    sketch = projection
    if config.projection and not isinstance(projection, TrainingSketch):
        sketch = sketch_training(run, config.projection, checkpoints=config.checkpoints,
                                 timesteps=grid, train_side=config.train_side, loss=config.loss,
                                 noise_seed=config.noise_seed, seed=config.projection_seed,
                                 chunk_size=chunk_size, device=device, progress=progress)
    if config.projection:
        sketch.check_matches(run, config)
    n_scored = n if train_slice is None else len(train_slice)
    steps_per_checkpoint = 1 + (0 if config.projection else -(-n_scored // chunk_size))
    bar = tqdm(total=len(config.checkpoints) * steps_per_checkpoint, desc=method,
               disable=not progress)
    for j, c in enumerate(config.checkpoints):
        model = run.model_at(c).to(device)
        if config.noise_per_query:
            noise = per_query_noise_draws(run.data.sample_shape, len(queries), len(grid),
                                          config.n_noise, config.noise_seed, c)
        v = query_vectors(model, run.scheduler, queries, grid, noise, method,
                          config.normalization, config.loss, 4 * chunk_size, c, engine)
        bar.update()
        if config.projection:
            s = sketch.checkpoints.index(c)
            g, norms[j] = sketch.sketches[s], sketch.norms[s]
            if method == "retrac":  # S is linear: S(g / |g|) = S(g) / |g|
                g = g / clamp_norm(norms[j])[:, None]
            sv = sketch.projector()(v.cpu())
            scores += weights[j] * (sv @ g.T).double()
            continue
        for idx, norm, dots in training_dots(run, model, c, config.train_side, grid,
                                             config.noise_seed, config.loss, chunk_size, v,
                                             engine, train_slice):
            norms[j, idx] = norm.cpu()
            if method == "retrac":  # <v, g/|g|> = <v, g>/|g|, without a normalized copy of g
                dots = dots / clamp_norm(norm)
            scores[:, idx] += weights[j] * dots.double().cpu()
            bar.update()
    bar.close()
    return AttributionResult(scores, config, weights, norms,
                             query_noise=None if config.noise_per_query else
                             noise.detach().cpu().contiguous())


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
