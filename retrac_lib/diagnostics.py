"""How the per-sample gradient norm depends on the diffusion timestep (chapter 2).

Every influence score built on gradient dot products (Diffusion-TracIn, chapter 3) multiplies a
training sample's score by the norm of its loss gradient ``|g(x_i)|``. This module measures that
norm: for chosen samples across a grid of timesteps (``sweep``), for every training sample at the
timestep and noise it was last trained with (``recorded_norms``), at initialization and across
checkpoints (``bias_over_training``), binned by timestep with spread (``bin_by_timestep``), and
summarized by two numbers: the decile ratio and the rank correlation between timestep and norm.

All gradients come from ``rl.per_sample_grads``, in chunks, so at most ``chunk_size`` flattened
gradients exist at a time (the full [N, P] matrix of the book's UNet would take about 1 GB).
Checkpoints are named by their index in ``run.checkpoints`` or by ``"init"`` for the weights
before the first step. Results are CPU tensors in small dataclasses.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .timesteps import parse_timesteps
from .grads import check_batch, per_sample_grads
from .losses import check_loss, diffusion_loss
from . import seeding, validation
from .ranking import spearman
from .runs import INIT

__all__ = [
    "INIT", "grad_norms", "sample_losses", "model_at", "checkpoint_label",
    "checkpoint_keys", "sample_noise", "Sweep", "sweep", "sweep_run", "RecordedNorms",
    "recorded_norms", "BinnedStats", "bin_by_timestep", "decile_ratio",
    "BiasSummary", "summarize", "bias_over_training",
]


# ---------------------------------------------------------------------------------------------
# norms and losses of a batch


def grad_norms(model, scheduler, x, t, noise, loss: str = "mse", chunk_size: int = 64):
    """Norms ``|grad_theta l(theta; x_i, t_i, eps_i)|`` [B] of the per-sample loss gradients.

    Computed ``chunk_size`` rows at a time with ``rl.per_sample_grads``, so the [B, P] gradient
    matrix is never held. Chapter 2, "One loss gradient per training sample", derives the
    gradients.
    """
    check_loss(loss)
    check_batch(model, scheduler, x, t, noise)
    chunk_size = validation.chunk_size(chunk_size)
    norms = torch.empty(len(x))
    for a in range(0, len(x), chunk_size):
        b = min(a + chunk_size, len(x))
        g = per_sample_grads(model, scheduler, x[a:b], t[a:b], noise[a:b], loss, chunk_size)
        norms[a:b] = g.norm(dim=1).float().cpu()
    return norms


@torch.no_grad()
def sample_losses(model, scheduler, x, t, noise, loss: str = "mse", chunk_size: int = 256):
    """Per-sample DDPM losses ``mean |eps_theta(x_t, t) - eps|^p`` [B], no gradients."""
    check_loss(loss)
    check_batch(model, scheduler, x, t, noise)
    chunk_size = validation.chunk_size(chunk_size)
    device = next(model.parameters()).device
    out = torch.empty(len(x))
    for a in range(0, len(x), chunk_size):
        b = min(a + chunk_size, len(x))
        out[a:b] = diffusion_loss(model, scheduler, x[a:b].to(device), t[a:b].to(device),
                                  noise[a:b].to(device), loss).float().cpu()
    return out


# ---------------------------------------------------------------------------------------------
# checkpoints by name


def model_at(run, checkpoint):
    """The denoiser at ``checkpoint`` (an index, negative from the end, or ``"init"``)."""
    c = run.checkpoint_index(checkpoint, allow_init=True)
    return run.initial_model() if c == INIT else run.model_at(c)


def checkpoint_label(run, checkpoint) -> str:
    """``"init"`` or ``"epoch E"`` for a checkpoint, as the figures label it."""
    c = run.checkpoint_index(checkpoint, allow_init=True)
    return "init" if c == INIT else f"epoch {run.checkpoints[c].epoch}"


def checkpoint_keys(run, include_init: bool = True) -> list:
    """``["init", 0, 1, ...]``: every checkpoint of the run in training order."""
    return ([INIT] if include_init else []) + list(range(len(run.checkpoints)))


# ---------------------------------------------------------------------------------------------
# one sample across the timestep grid


def sample_noise(sample_shape, indices, n_noise: int = 1, seed: int = 0) -> torch.Tensor:
    """Seeded noise [S, K, *sample]: training sample ``i`` always gets the same K draws.

    Each sample's draws come from its own generator, the stream
    ``seeding.generator(seed, seeding.SAMPLE_NOISE, i)``, so a sample's curve does not depend on
    which other samples were chosen with it (the widget and the static figure agree).
    """
    n_noise = validation.n_noise(n_noise)
    out = [torch.randn((n_noise, *sample_shape),
                       generator=seeding.generator(seed, seeding.SAMPLE_NOISE, i))
           for i in validation.indices(indices, None).tolist()]
    return torch.stack(out) if out else torch.empty((0, n_noise, *sample_shape))


@dataclasses.dataclass
class Sweep:
    """Gradient norms and losses of S samples at every timestep of a grid, K noise draws each.

    ``norms`` and ``losses`` are [S, T, K]; ``mean_norms`` averages the draws. The same draws
    are used at every timestep, so differences along the grid come from the timestep alone.
    """

    timesteps: torch.Tensor
    norms: torch.Tensor
    losses: torch.Tensor
    indices: torch.Tensor | None = None
    label: str = ""

    @property
    def mean_norms(self) -> torch.Tensor:
        """[S, T]: the norm averaged over the noise draws."""
        return self.norms.mean(-1)

    def swing(self) -> torch.Tensor:
        """[S]: largest over smallest mean norm along the grid, per sample."""
        m = self.mean_norms
        return m.max(1).values / m.min(1).values


def sweep(model, scheduler, x, timesteps, noise, loss: str = "mse", chunk_size: int = 64,
          label: str = "") -> Sweep:
    """Norms and losses of samples ``x`` [S, *sample] at every timestep of ``timesteps`` [T],
    each with the noise draws ``noise`` [S, K, *sample] (the same draws at every timestep)."""
    timesteps = torch.as_tensor(timesteps).reshape(-1)
    if noise.ndim != x.ndim + 1 or noise.shape[0] != x.shape[0] or noise.shape[2:] != x.shape[1:]:
        raise ValueError(f"noise must be [S, K, *sample] for x of shape {tuple(x.shape)}; "
                         f"got {tuple(noise.shape)}.")
    s, k, n_t = len(x), noise.shape[1], len(timesteps)
    # Lay the draws out as one flat batch ordered (sample, timestep, draw).
    xs = x[:, None, None].expand(s, n_t, k, *x.shape[1:]).reshape(-1, *x.shape[1:])
    ts = timesteps[None, :, None].expand(s, n_t, k).reshape(-1)
    eps = noise[:, None].expand(s, n_t, k, *x.shape[1:]).reshape(-1, *x.shape[1:])
    norms = grad_norms(model, scheduler, xs, ts, eps, loss, chunk_size).reshape(s, n_t, k)
    losses = sample_losses(model, scheduler, xs, ts, eps, loss).reshape(s, n_t, k)
    return Sweep(timesteps, norms, losses, label=label)


def sweep_run(run, indices, checkpoint=-1, timesteps=50, n_noise: int = 1, seed: int = 0,
              loss: str | None = None, chunk_size: int = 64) -> Sweep:
    """``sweep`` for training samples ``indices`` of ``run`` at ``checkpoint`` (index or "init").

    ``timesteps`` is a number of evenly spaced timesteps in [1, T-1] (``timestep_grid``) or an
    explicit list; noise comes from ``sample_noise(..., seed)``; ``loss`` defaults to the
    run's training loss. Chapter 2, "One sample across the timestep grid".
    """
    indices = validation.indices(indices, len(run.data))
    grid = _grid(run, timesteps)
    noise = sample_noise(run.data.sample_shape, indices, n_noise, seed)
    out = sweep(model_at(run, checkpoint), run.scheduler, run.data.images[indices], grid, noise,
                loss or run.config.loss, chunk_size, checkpoint_label(run, checkpoint))
    out.indices = indices
    return out


def _grid(run, timesteps) -> torch.Tensor:
    return parse_timesteps(timesteps, run.scheduler.config.num_train_timesteps)


# ---------------------------------------------------------------------------------------------
# the training set at its recorded timesteps


@dataclasses.dataclass
class RecordedNorms:
    """Gradient norm and loss of training samples at their recorded timestep and noise.

    ``indices`` [n] are training-set indices, ``timesteps`` [n] their recorded timesteps,
    ``norms`` and ``losses`` [n]; ``recorded_at`` the checkpoint whose recorded timesteps
    and noise were used.
    """

    indices: torch.Tensor
    timesteps: torch.Tensor
    norms: torch.Tensor
    losses: torch.Tensor
    label: str
    recorded_at: int


def recorded_norms(run, checkpoint=-1, indices=None, loss: str | None = None,
                   chunk_size: int = 64) -> RecordedNorms:
    """``|g_c(x_i)|`` for training samples ``indices`` (default all) at ``checkpoint``.

    ``g_c(x_i)`` is the loss gradient at the timestep and noise sample ``i`` was last trained
    with before ``checkpoint``. At ``"init"`` no timestep has been recorded yet, so the last
    checkpoint's are used: the initial and the trained norms then differ only in the weights.
    Chapter 2, "The whole training set at its recorded timesteps".
    """
    c = run.checkpoint_index(checkpoint, allow_init=True)
    recorded_at = len(run.checkpoints) - 1 if c == INIT else c
    t, eps = run.recorded(recorded_at)
    idx = (torch.arange(len(run.data)) if indices is None
           else validation.indices(indices, len(run.data)))
    loss = loss or run.config.loss
    model = model_at(run, c)
    x, t, eps = run.data.images[idx], t[idx], eps[idx]
    norms = grad_norms(model, run.scheduler, x, t, eps, loss, chunk_size)
    losses = sample_losses(model, run.scheduler, x, t, eps, loss)
    return RecordedNorms(idx, t, norms, losses, checkpoint_label(run, c), recorded_at)


# ---------------------------------------------------------------------------------------------
# summaries


@dataclasses.dataclass
class BinnedStats:
    """A value binned by timestep: ``n_bins`` equal-width bins over [0, T).

    ``mean``, ``std`` (population, ddof=0), ``q25``, ``median``, ``q75`` and ``count`` are [n_bins];
    statistics of an empty bin are NaN.
    """

    edges: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    q25: torch.Tensor
    median: torch.Tensor
    q75: torch.Tensor
    count: torch.Tensor

    @property
    def centers(self) -> torch.Tensor:
        return (self.edges[:-1] + self.edges[1:]) / 2


def bin_by_timestep(timesteps, values, n_bins: int = 10,
                    num_train_timesteps: int = 1000) -> BinnedStats:
    """Mean, spread and count of ``values`` in ``n_bins`` equal-width timestep bins over [0, T).

    Sample ``i`` falls in bin ``floor(t_i * n_bins / T)``.
    """
    t = torch.as_tensor(timesteps).reshape(-1).long()
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if len(t) != len(v):
        raise ValueError(f"{len(t)} timesteps but {len(v)} values.")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}.")
    if len(t) and (t.min() < 0 or t.max() >= num_train_timesteps):
        raise ValueError(f"timesteps must lie in [0, {num_train_timesteps}).")
    which = t * n_bins // num_train_timesteps
    stats = np.full((6, n_bins), np.nan)
    for b in range(n_bins):
        vb = v[which == b].numpy()
        stats[5, b] = len(vb)
        if len(vb):
            stats[:5, b] = [vb.mean(), vb.std(), *np.quantile(vb, [0.25, 0.5, 0.75])]
    edges = torch.linspace(0, num_train_timesteps, n_bins + 1, dtype=torch.float64)
    mean, std, q25, median, q75, count = (torch.from_numpy(s) for s in stats)
    return BinnedStats(edges, mean, std, q25, median, q75, count.long())


def decile_ratio(timesteps, norms, fraction: float = 0.1) -> float:
    """Mean norm of the lowest-timestep tenth over that of the highest-timestep tenth.

    Samples are sorted by timestep (ties keep index order); each end holds
    ``max(1, floor(fraction * n))`` samples.
    """
    t = torch.as_tensor(timesteps).reshape(-1)
    v = torch.as_tensor(norms, dtype=torch.float64).reshape(-1)
    if len(t) != len(v) or len(t) < 2:
        raise ValueError(f"need matching timesteps and norms, at least 2; got {len(t)} and {len(v)}.")
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must lie in (0, 0.5], got {fraction}.")
    order = torch.sort(t, stable=True).indices
    k = max(1, int(fraction * len(t)))
    return (v[order[:k]].mean() / v[order[-k:]].mean()).item()


@dataclasses.dataclass
class BiasSummary:
    """A ``RecordedNorms`` with its timestep-binned norms and losses and its two bias numbers."""

    record: RecordedNorms
    norm_bins: BinnedStats
    loss_bins: BinnedStats
    decile_ratio: float
    spearman: float

    @property
    def label(self) -> str:
        return self.record.label


def summarize(record: RecordedNorms, n_bins: int = 10, num_train_timesteps: int = 1000) -> BiasSummary:
    """Bin a ``RecordedNorms`` by timestep and compute its decile ratio and rank correlation."""
    t = record.timesteps
    return BiasSummary(record,
                       bin_by_timestep(t, record.norms, n_bins, num_train_timesteps),
                       bin_by_timestep(t, record.losses, n_bins, num_train_timesteps),
                       decile_ratio(t, record.norms), float(spearman(t, record.norms)))


def bias_over_training(run, indices=None, include_init: bool = True, n_bins: int = 10,
                       loss: str | None = None, chunk_size: int = 64,
                       progress: bool = False) -> list[BiasSummary]:
    """``summarize(recorded_norms(run, c))`` at initialization and every checkpoint, in order.

    Each checkpoint uses its own recorded timesteps and noise; "init" uses the last checkpoint's.
    Chapter 2, "At initialization and during training".
    """
    keys = checkpoint_keys(run, include_init)
    if progress:
        from tqdm.auto import tqdm
        keys = tqdm(keys, desc="checkpoints")
    n_t = run.scheduler.config.num_train_timesteps
    return [summarize(recorded_norms(run, c, indices, loss, chunk_size=chunk_size), n_bins, n_t)
            for c in keys]
