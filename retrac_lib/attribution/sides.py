"""The two sides of an influence score: query vectors and streamed training gradients.

Both sums of chapter 3's formula collapse to one *query vector* per query and checkpoint
(``query_vectors``); the training side is streamed in chunks of ``g_c(x_i)`` against those vectors
(``training_dots``), so memory is bounded by one chunk, never N x P. The query side never loops
over draws: the mean of gradients is the gradient of the mean loss, so each averaged gradient is
one batched backward pass (``grads.grouped_grads``). Chapter 3, "TracIn by hand, for one checkpoint", writes
the same sums for one checkpoint as a few lines of tensor code.
"""
from __future__ import annotations

import torch

from .. import ghost, seeding, validation
from ..grads import grouped_grads
from .options import ENGINES


def clamp_norm(norm: torch.Tensor) -> torch.Tensor:
    """Norms clamped to the smallest positive float, safe to divide by: a zero gradient then gets
    a zero normalized score, not NaN."""
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


def check_finite(g: torch.Tensor, what: str, offset: int, checkpoint: int) -> None:
    """Refuse rows [n, P] of gradients with a NaN or infinite entry, naming the first one."""
    bad = (~torch.isfinite(g).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise FloatingPointError(
            f"The gradient of {what} {offset + int(bad[0])} at checkpoint {checkpoint} is NaN or "
            "infinite. Check that sample for NaN/inf values and the checkpoint for diverged weights."
        )


def resolve_engine(engine: str, model) -> str:
    """The gradient engine to use: "auto" is "ghost" when it covers every layer of ``model``."""
    validation.choice(engine, "engine", ENGINES)
    if engine == "ghost":
        ghost.check_supported(model)
    if engine == "auto":
        return "func" if ghost.unsupported_layers(model) else "ghost"
    return engine


def query_vectors(model, scheduler, queries, timesteps, noise, method: str,
                  normalization: str = "per_timestep", loss: str = "mse",
                  chunk_size: int = 256, checkpoint: int = 0, engine: str = "func") -> torch.Tensor:
    """The query side [Q, P]: ``(1/|T'|) sum_t m(z, t)`` for TracIn, its normalized variants for ReTrac.

    ``noise`` is [T', K, *sample], the same for every query, or [Q, T', K, *sample]. Each
    query's draws are grouped so that one batched backward pass yields each averaged gradient:
    one group of T' x K draws for TracIn and "cosine", T' groups of K for "per_timestep",
    T' x K groups of one draw for "per_draw". With ``engine="ghost"`` small groups are
    normalized and summed from layer factors (``ghost.weighted_sum``) instead of one gradient
    row per group. Derived in chapter 3, "TracIn by hand, for one checkpoint", and chapter 4,
    "Re-normalizing the dot product".
    """
    per_query = noise.dim() == queries.dim() + 2
    n_t, k = noise.shape[1:3] if per_query else noise.shape[:2]
    draws_per_group = {"tracin": n_t * k, "per_timestep": k, "per_draw": 1, "cosine": n_t * k}
    group = draws_per_group["tracin" if method == "tracin" else normalization]
    out = []
    for q, z in enumerate(queries):
        x, t, eps = _query_groups(z, timesteps, noise[q] if per_query else noise, group)
        if engine == "ghost":
            weights_of = (lambda n: 1 / clamp_norm(n)) if method == "retrac" else torch.ones_like
            v, norms = ghost.weighted_sum(model, scheduler, x, t, eps, weights_of, loss, chunk_size)
            check_finite(torch.cat([norms, v])[None], "query", q, checkpoint)
            out.append(v / len(t))
            continue
        g = grouped_grads(model, scheduler, x, t, eps, loss, chunk_size)
        check_finite(g.reshape(1, -1), "query", q, checkpoint)
        if method == "retrac":
            g = g / clamp_norm(g.norm(dim=1, keepdim=True))
        out.append(g.mean(0))
    return torch.stack(out)


def _query_groups(z, timesteps, noise, group: int):
    """The T' x K noised copies of query ``z`` (``noise`` [T', K, *sample]) as groups of ``group``
    draws: ``(x, t, eps)`` of shapes [G, group, *sample], [G, group], [G, group, *sample]."""
    n_t, k = noise.shape[:2]
    x = z.expand(n_t * k, *z.shape).reshape(-1, group, *z.shape)
    t = timesteps.repeat_interleave(k).reshape(-1, group)
    return x, t, noise.reshape(-1, group, *z.shape)


def timestep_gradients(model, scheduler, z, timesteps, noise, loss: str = "mse",
                       chunk_size: int = 64) -> torch.Tensor:
    """``m(z, t)`` [T', P] for one query ``z``: its loss gradient at each grid timestep, averaged
    over that timestep's K draws of ``noise`` [T', K, *sample] (chapter 4, "Every metric, both
    methods", draws their cosines); ReTrac normalizes these rows before averaging them."""
    x, t, eps = _query_groups(z, timesteps, noise, noise.shape[1])
    return grouped_grads(model, scheduler, x, t, eps, loss, chunk_size)


def training_draws(run, c: int, train_side: str, timesteps: torch.Tensor,
                   noise_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps [N, M] and noise [N, M, *sample] defining ``g_c(x_i)`` for each training sample.

    "recorded" (M = 1): the timestep and noise each sample was last trained with before ``c``;
    "fresh_noise" (M = 1): the recorded timestep with new seeded noise; "timestep_average"
    (M = |T'|): one seeded draw at every grid timestep, averaged (an image-level variant).
    """
    n, shape = len(run.data), run.data.sample_shape
    gen = seeding.generator(noise_seed, seeding.TRAINING_NOISE, c, name="noise_seed")
    if train_side == "timestep_average":
        t = timesteps.expand(n, -1)
        return t, torch.randn((n, len(timesteps), *shape), generator=gen)
    t, noise = run.recorded(c)
    if train_side == "fresh_noise":
        noise = torch.randn(noise.shape, generator=gen)
    return t[:, None], noise[:, None]


def _training_batches(run, c, train_side, timesteps, noise_seed, chunk_size, train_slice=None):
    """Yield ``(indices, x, t, noise)`` of ``chunk_size`` training samples at a time ([n, M, ...]),
    over the training set or the ``range`` ``train_slice``."""
    t, eps = training_draws(run, c, train_side, timesteps, noise_seed)
    x = run.data.images[:, None].expand(-1, t.shape[1], *run.data.sample_shape)
    span = range(len(run.data)) if train_slice is None else train_slice
    for a in range(span.start, span.stop, chunk_size):
        idx = torch.arange(a, min(a + chunk_size, span.stop))
        yield idx, x[idx], t[idx], eps[idx]


def training_gradient_chunks(run, model, c: int, train_side: str, timesteps: torch.Tensor,
                             noise_seed: int, loss: str, chunk_size: int, train_slice=None):
    """Yield ``(indices, g_c(x_i) rows)`` over the training set (or the ``range`` of training
    indices ``train_slice``), ``chunk_size`` samples at a time.

    Memory is bounded by one chunk x P; a NaN or infinite gradient raises, naming the sample.
    """
    for idx, x, t, eps in _training_batches(run, c, train_side, timesteps, noise_seed, chunk_size,
                                            train_slice):
        g = grouped_grads(model, run.scheduler, x, t, eps, loss, chunk_size)
        check_finite(g, "training sample", int(idx[0]), c)
        yield idx, g


def training_dots(run, model, c: int, train_side: str, timesteps: torch.Tensor, noise_seed: int,
                  loss: str, chunk_size: int, vectors: torch.Tensor, engine: str = "func",
                  train_slice=None):
    """Yield ``(indices, |g_c(x_i)| [n], <vectors, g_c(x_i)> [Q, n])`` over the training set
    (or the indices ``train_slice``).

    ``engine="func"`` forms the gradient rows (``training_gradient_chunks``); ``"ghost"`` takes
    norms and dot products from layer factors (``ghost.group_terms``) without forming them.
    """
    if engine == "func":
        for idx, g in training_gradient_chunks(run, model, c, train_side, timesteps, noise_seed,
                                               loss, chunk_size, train_slice):
            yield idx, g.norm(dim=1), vectors @ g.T
        return
    for idx, x, t, eps in _training_batches(run, c, train_side, timesteps, noise_seed, chunk_size,
                                            train_slice):
        sq, dots = ghost.group_terms(model, run.scheduler, x, t, eps, loss, vectors, chunk_size)
        norm = sq.clamp_min(0).sqrt()
        check_finite(torch.cat([norm[:, None], dots], 1), "training sample", int(idx[0]), c)
        yield idx, norm, dots.T
