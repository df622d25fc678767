"""The training side of an influence score, streamed; and a query's per-timestep gradients.

Both sums of chapter 3's formula collapse to one *query vector* per query and checkpoint
(``methods.query_vectors``); the training side (``TrainingGradients``) is streamed in chunks of
``g_c(x_i)`` against those vectors, so memory is bounded by one chunk, never N x P.
``timestep_gradients`` gives chapter 4 the per-timestep gradients ``m(z, t)`` that ReTrac
normalizes.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import seeding
from ..grads import grouped_grads
from .engines import Engine, FuncEngine
from .methods import check_finite, query_groups


def timestep_gradients(model, scheduler, z, timesteps, noise, loss: str = "mse",
                       chunk_size: int = 64) -> torch.Tensor:
    """``m(z, t)`` [T', P] for one query ``z``: its loss gradient at each grid timestep, averaged
    over that timestep's K draws of ``noise`` [T', K, *sample] (chapter 4, "Every metric, both
    methods", draws their cosines); ReTrac normalizes these rows before averaging them."""
    x, t, eps = query_groups(z, timesteps, noise, noise.shape[1])
    return grouped_grads(model, scheduler, x, t, eps, loss, chunk_size)


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingGradients:
    """What defines ``g_c(x_i)`` for every training sample of ``run`` (with the loss, which the
    engine holds): the training side, the query grid (for "timestep_average") and the seed of
    fresh noise.

    ``train_side`` "recorded" (M = 1 draw per sample): the timestep and noise each sample was
    last trained with before checkpoint ``c``; "fresh_noise" (M = 1): the recorded timestep with
    new seeded noise; "timestep_average" (M = |T'|): one seeded draw at every grid timestep,
    averaged (an image-level variant).
    """

    run: object
    train_side: str
    timesteps: torch.Tensor
    noise_seed: int

    def draws(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps [N, M] and noise [N, M, *sample] of every training sample at
        checkpoint ``c``."""
        n, shape = len(self.run.data), self.run.data.sample_shape
        gen = seeding.generator(self.noise_seed, seeding.TRAINING_NOISE, c, name="noise_seed")
        if self.train_side == "timestep_average":
            t = self.timesteps.expand(n, -1)
            return t, torch.randn((n, len(self.timesteps), *shape), generator=gen)
        t, noise = self.run.recorded(c)
        if self.train_side == "fresh_noise":
            noise = torch.randn(noise.shape, generator=gen)
        return t[:, None], noise[:, None]

    def _batches(self, c: int, chunk_size: int, span: range | None):
        """``(indices, x, t, noise)`` of ``chunk_size`` samples at a time ([n, M, ...]), over the
        training set or the ``range`` ``span``."""
        t, eps = self.draws(c)
        data = self.run.data
        x = data.images[:, None].expand(-1, t.shape[1], *data.sample_shape)
        span = range(len(data)) if span is None else span
        for a in range(span.start, span.stop, chunk_size):
            idx = torch.arange(a, min(a + chunk_size, span.stop))
            yield idx, x[idx], t[idx], eps[idx]

    def rows(self, engine: FuncEngine, c: int, chunk_size: int, span: range | None = None):
        """Yield ``(indices, g_c(x_i) rows [n, P])`` from a row engine, ``chunk_size`` samples
        at a time (memory: one chunk x P); a NaN or infinite gradient raises, naming the sample."""
        for idx, x, t, eps in self._batches(c, chunk_size, span):
            g = engine.rows(x, t, eps, chunk_size)
            check_finite(g, "training sample", int(idx[0]), c)
            yield idx, g

    def dots(self, engine: Engine, c: int, vectors: torch.Tensor, chunk_size: int,
             span: range | None = None):
        """Yield ``(indices, |g_c(x_i)| [n], <vectors, g_c(x_i)> [Q, n])`` over the training set
        (or the indices ``span``), from ``engine.training_terms``."""
        yield from self._terms(engine, c, lambda idx: vectors, chunk_size, span)

    def self_dots(self, engine: Engine, c: int, vectors_for, chunk_size: int):
        """Yield ``(indices, |g_c(x_i)| [n], <v_i, g_c(x_i)> [n])`` over the training set, each
        sample against its own query vector only: ``vectors_for(indices)`` gives those samples'
        query vectors [n, P] (self-influence)."""
        for idx, norm, dots in self._terms(engine, c, vectors_for, chunk_size, None):
            yield idx, norm, dots.diagonal()

    def _terms(self, engine: Engine, c: int, vectors_for, chunk_size: int, span: range | None):
        """``dots`` with the query vectors of each chunk's ``indices`` from ``vectors_for``."""
        for idx, x, t, eps in self._batches(c, chunk_size, span):
            norm, dots = engine.training_terms(x, t, eps, vectors_for(idx), chunk_size)
            check_finite(torch.cat([norm[:, None], dots.T], 1), "training sample", int(idx[0]), c)
            yield idx, norm, dots
