"""The timestep grid and the seeded query noise that diagnostics, attribution and retraining share.

A leaf below ``diagnostics`` (chapter 2) and ``attribution`` (chapters 3-4): the grid ``T'`` of
evenly spaced timesteps (chapter 2, "One sample across the timestep grid"; chapter 3, "TracIn
by hand, for one checkpoint") and the noise draws ``eps_{t,k}`` that the query side averages over.
"""
from __future__ import annotations

import torch

from . import seeding, validation


def timestep_grid(n: int = 100, num_train_timesteps: int = 1000) -> torch.Tensor:
    """``n`` evenly spaced timesteps in [1, T - 1] (the paper: 100 in [1, 999])."""
    return torch.linspace(1, num_train_timesteps - 1, n).round().long()


def parse_timesteps(timesteps, num_train_timesteps: int) -> torch.Tensor:
    """A timestep grid from a count (evenly spaced in [1, T-1]) or an explicit list of distinct
    integer timesteps (``validation.timesteps`` says what is refused)."""
    spec = validation.timesteps(timesteps, num_train_timesteps)
    if isinstance(spec, int):
        return timestep_grid(spec, num_train_timesteps)
    return torch.tensor(spec, dtype=torch.long)


def query_noise_draws(sample_shape, n_timesteps: int, n_noise: int, seed: int) -> torch.Tensor:
    """Seeded noise [T', K, *sample]: the same draws for every query and checkpoint."""
    gen = seeding.generator(seed, name="noise_seed")
    return torch.randn((n_timesteps, n_noise, *sample_shape), generator=gen)


def per_query_noise_draws(sample_shape, n_queries: int, n_timesteps: int, n_noise: int, seed: int,
                          checkpoint: int, first: int = 0) -> torch.Tensor:
    """Seeded noise [Q, T', K, *sample]: fresh draws for every query and checkpoint, as the
    paper's official code draws them (``attribute(..., noise_per_query=True)``), each from its
    own stream of ``seed`` (``seeding.PER_QUERY_NOISE``, checkpoint, query); the queries are
    numbered from ``first``, so a slice of the queries gets the draws it has in the whole."""
    shape = (n_timesteps, n_noise, *sample_shape)
    return torch.stack([torch.randn(shape, generator=seeding.generator(
        seed, seeding.PER_QUERY_NOISE, checkpoint, q, name="noise_seed"))
        for q in range(first, first + n_queries)])
