"""D-TRAK as published (Zheng et al., "Intriguing Properties of Data Attribution on Diffusion
Models", ICLR 2024), at the book's scale (chapter 5).

D-TRAK is TRAK applied to a diffusion model with a different output function:

* **Output function** ``f(theta; x, t, eps) = mean eps_theta(x_t, t)^2`` (the loss
  ``"square_norm"`` of ``rl.losses``): the squared norm of the predicted noise, which ignores the
  true noise.
* **Features** ``phi(x) = P^T (1/|S|) sum_{t in S} grad_theta f(theta; x, t, eps_t)``: the gradient
  averaged over a set ``S`` of timesteps (one seeded noise draw each), then projected by a dense
  Gaussian random matrix ``P`` [params, k] (TRAK's projection).
* **Score** ``tau(z, x_i) = phi(z)^T (Phi^T Phi + lambda I)^{-1} phi(x_i)``, ``Phi`` [N, k] the
  training features: the query feature whitened by the (damped) feature kernel.

The published settings (CIFAR-2, the official code's defaults): ``S = {0, 100, ..., 900}``
(10 timesteps, ``uniform_timesteps``), one noise draw per timestep, ``k = 32768``, the final
checkpoint only, and ``lambda`` chosen from a grid of 1e-2 to 5e6 by the LDS itself. The book
differs where its scale or honesty requires: ``k = 2048`` by default (the toy models have 2e4 to
2e5 parameters, not 3.6e7), and ``lambda`` fixed in advance to ``damping`` times the mean
eigenvalue of the kernel's non-zero part (``trace / min(N, k)``) instead of tuned on the test it is
scored by.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cache, seeding, validation
from .attribution import AttributionResult
from .attribution.options import DTrakConfig   # there, so saved scores load without rl.dtrak
from .attribution.results import load_or_compute, load_self_scores, save_self_scores
from .grads import grouped_grads
from .models import check_samples
from .projection import GaussianProjection
from .runs import run_identity

OUTPUT_FUNCTION = DTrakConfig.output_function   # "square_norm"


def resolve_config(run, *, checkpoints=(-1,), timesteps: int = 10, proj_dim: int = 2048,
                   damping: float = 0.1, seed: int = 0) -> DTrakConfig:
    """``attribute_dtrak``'s options for ``run``, validated and resolved (module docstring):
    what names its scores, in its result and in its cache key."""
    damping = validation.real(damping, "damping", positive=True)
    grid = uniform_timesteps(timesteps, run.scheduler.config.num_train_timesteps)
    return DTrakConfig(validation.checkpoints(checkpoints, len(run.checkpoints)),
                       tuple(grid.tolist()), validation.integer(proj_dim, "proj_dim", 1), damping,
                       validation.integer(seed, "seed", 0))


def uniform_timesteps(k: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The official code's timestep set ``range(0, T, T // k)``: for k = 10, 0, 100, ..., 900."""
    k = validation.integer(k, "timesteps", 1)
    if k > num_train_timesteps:
        raise ValueError(f"timesteps={k} exceeds the {num_train_timesteps} timesteps of the schedule.")
    return torch.arange(0, num_train_timesteps, num_train_timesteps // k)[:k]


def averaged_gradients(model, scheduler, x: torch.Tensor, timesteps: torch.Tensor, seed: int,
                       chunk_size: int = 64, purpose: int | None = None) -> torch.Tensor:
    """``(1/|S|) sum_{t in S} grad f(theta; x, t, eps_t)`` [B, P] for every sample of ``x``, one
    seeded noise draw per sample and timestep (``f`` = D-TRAK's output function), drawn from
    ``seed`` or, with a ``purpose``, from that stream of it (``seeding.generator``)."""
    gen = seeding.generator(seed, purpose)
    noise = torch.randn((len(x), len(timesteps), *x.shape[1:]), generator=gen)
    xs = x[:, None].expand(-1, len(timesteps), *x.shape[1:])
    ts = timesteps[None].expand(len(x), -1)
    return grouped_grads(model, scheduler, xs, ts, noise, OUTPUT_FUNCTION, chunk_size)


def whitened_scores(query_features: torch.Tensor, train_features: torch.Tensor,
                    lam: float) -> torch.Tensor:
    """``phi_q (Phi^T Phi + lam I_k)^{-1} Phi^T`` [Q, N] in float64, solved in the smaller of the
    two spaces: for N < k through ``Phi^T (Phi Phi^T + lam I_N)^{-1}``, the same matrix."""
    if lam <= 0:
        raise ValueError(f"lam must be > 0 (the kernel is singular when k > N); got {lam}.")
    q, f = query_features.double(), train_features.double()
    n, k = f.shape
    if n < k:
        return torch.linalg.solve(f @ f.T + lam * torch.eye(n, dtype=f.dtype), f @ q.T).T
    return q @ torch.linalg.solve(f.T @ f + lam * torch.eye(k, dtype=f.dtype), f.T)


def damping_lambda(train_features: torch.Tensor, damping: float) -> float:
    """``damping`` times the mean non-zero eigenvalue of ``Phi^T Phi``, ``trace / min(N, k)``."""
    f = train_features.double()
    return float(damping * f.square().sum() / min(f.shape))


def attribute_dtrak(run, queries: torch.Tensor, *, checkpoints=(-1,), timesteps: int = 10,
                    proj_dim: int = 2048, damping: float = 0.1, seed: int = 0,
                    chunk_size: int = 64, device=None, progress: bool = True) -> AttributionResult:
    """D-TRAK scores [Q, N] of every training sample of ``run`` for every query.

    Args:
        checkpoints: indices into ``run.checkpoints`` (default the final model, as published);
            with several, the scores are averaged (TRAK's ensemble over models).
        timesteps: ``|S|``, the number of timesteps of ``uniform_timesteps``.
        proj_dim: ``k`` of the Gaussian projection.
        damping: ``lambda`` relative to the kernel's mean non-zero eigenvalue (``damping_lambda``).
        seed: seeds the projection and the noise draws (the training side ``seed`` itself, the
            queries its stream ``seeding.DTRAK_QUERY_NOISE``).
        progress: a progress bar over the checkpoints.

    ``train_grad_norms`` holds the norms of the unprojected training features.
    """
    start = time.perf_counter()
    device = validation.device(device)
    config = resolve_config(run, checkpoints=checkpoints, timesteps=timesteps, proj_dim=proj_dim,
                            damping=damping, seed=seed)
    check_samples(run.model_at(-1), validation.tensor(queries, "queries"), "queries")
    grid = torch.tensor(config.timesteps)
    scores = torch.zeros(len(queries), len(run.data), dtype=torch.float64)
    n_ckpt = len(config.checkpoints)
    norms = torch.zeros(n_ckpt, len(run.data))
    for j, c in enumerate(tqdm(config.checkpoints, desc="dtrak", disable=not progress)):
        model = run.model_at(c).to(device)
        train = averaged_gradients(model, run.scheduler, run.data.images, grid, config.seed,
                                   chunk_size)
        query = averaged_gradients(model, run.scheduler, queries, grid, config.seed, chunk_size,
                                   seeding.DTRAK_QUERY_NOISE)
        norms[j] = train.norm(dim=1).cpu()
        project = GaussianProjection(train.shape[1], config.proj_dim, config.seed)
        phi, phi_q = project(train).cpu(), project(query).cpu()
        scores += whitened_scores(phi_q, phi, damping_lambda(phi, config.damping)) / n_ckpt
    weights = torch.full((n_ckpt,), 1 / n_ckpt, dtype=torch.float64)
    return AttributionResult(scores, config, weights, norms, time.perf_counter() - start)


_HOW = ("chunk_size", "device", "progress")   # how to compute: not part of the cache key


def cache_key(run, queries: torch.Tensor, config: DTrakConfig) -> dict:
    """What cached D-TRAK scores depend on: the run (``run_identity``), the query values, the
    resolved ``config`` and ``seeding.DRAWS_VERSION`` (its noise and projection draws)."""
    return {"kind": "dtrak", **run_identity(run), "queries": cache.tensor_fingerprint(queries),
            "config": config.to_dict(), "draws": seeding.DRAWS_VERSION}


def _key(run, queries: torch.Tensor, options: dict) -> dict:
    """``cache_key`` for ``attribute_dtrak``'s ``options``, validated as computing them would."""
    config = resolve_config(run, **{k: v for k, v in options.items() if k not in _HOW})
    validation.device(options.get("device"))
    if "chunk_size" in options:
        validation.chunk_size(options["chunk_size"])
    check_samples(run.model_at(-1), validation.tensor(queries, "queries"), "queries")
    return cache_key(run, queries, config)


def load_or_attribute_dtrak(run, queries: torch.Tensor, root: Path | None = None,
                            **options) -> AttributionResult:
    """``attribute_dtrak`` with a cache (folder ``root``, default ``rl.config.cache_dir()``):
    the saved result for exactly this run, queries and resolved options (``cache_key``)."""
    payload = _key(run, queries, options)
    return load_or_compute(payload, root, AttributionResult.load,
                           lambda: attribute_dtrak(run, queries, **options),
                           lambda res, folder: res.save(folder, key=payload, exist_ok=True))


def load_or_self_scores(run, root: Path | None = None, **options) -> torch.Tensor:
    """D-TRAK's self-influence [N], the diagonal of its scores with every training image as a
    query, cached alone (not the [N, N] matrix it comes from); ``options`` are
    ``attribute_dtrak``'s."""
    payload = {**_key(run, run.data.images, options), "kind": "dtrak_self_scores"}
    return load_or_compute(
        payload, root, load_self_scores,
        lambda: attribute_dtrak(run, run.data.images, **options).scores.diagonal().clone(),
        lambda values, folder: save_self_scores(values, folder, payload))
