"""Figures for chapter 1 (``notebooks/01_train_toy_ddpm.ipynb``): the data, the forward process,
the training loss, generated samples and what the training log recorded.

Every function returns the matplotlib figure it drew, so a notebook cell is one call.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ... import seeding
from . import PAGE_WIDTH, METHOD_COLORS, image_grid, page_panels, tile_size, to_numpy

GENERATED_COLOR = "#222222"   # samples drawn from a trained model (not a method, so not in METHOD_COLORS)
CHECKPOINT_COLOR = "#999999"  # vertical markers at checkpoints


def digits_grid(data, n: int = 32, ncols: int = 8, title: str | None = None):
    """The first ``n`` images of an image ``Dataset``, captioned with their index and label (chapter 1)."""
    n = min(n, len(data))
    captions = [f"#{i}: {int(data.labels[i])}" for i in range(n)]
    title = title or f"The first {n} training digits (index: label), 8x8 pixels in [-1, 1]"
    return image_grid(data.images[:n], captions, ncols=min(ncols, n), title=title)


def points_scatter(data, samples=None, ax=None, title: str | None = None, s: float = 6):
    """A 2-D point ``Dataset`` in the data colour, with generated ``samples`` [n, 2] on top (chapter 1)."""
    fig, ax = _fig_ax(ax, (4.2, 4))
    x = to_numpy(data.images)
    ax.scatter(x[:, 0], x[:, 1], s=s, color=METHOD_COLORS["data"], alpha=0.6,
               label=f"training data ({len(x)})")
    if samples is not None:
        y = to_numpy(samples)
        ax.scatter(y[:, 0], y[:, 1], s=s, color=GENERATED_COLOR, marker="x", linewidths=0.7,
                   label=f"generated ({len(y)})")
    ax.set_xlabel("$x_1$ (standardized)")
    ax.set_ylabel("$x_2$ (standardized)")
    ax.set_aspect("equal", adjustable="box")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title(title or f"{data.name}: {len(x)} points in 2-D", fontsize=10)
    return fig


def forward_process(scheduler, x, timesteps, noise=None, seed: int = 0):
    """One image noised at each of ``timesteps`` with one noise draw (top), and the schedule's
    signal and noise scales ``sqrt(abar_t)``, ``sqrt(1 - abar_t)`` against t (bottom). Chapter 1.

    ``x`` is one image [1, H, W]; pixels of ``x_t`` outside [-1, 1] are shown clipped.
    """
    x = torch.as_tensor(x).float()
    t = torch.as_tensor(list(timesteps), dtype=torch.long)
    if noise is None:
        noise = torch.randn(x.shape, generator=seeding.generator(seed))
    xs = x.expand(len(t), *x.shape)
    x_t = scheduler.add_noise(xs, noise.expand_as(xs), t)
    abar = scheduler.alphas_cumprod

    fig = plt.figure(figsize=(min(PAGE_WIDTH, max(6.0, 1.1 * len(t))), 4.2))
    grid = fig.add_gridspec(2, len(t), height_ratios=[1.0, 2.2], hspace=0.38, top=0.84, bottom=0.12)
    img_axes = [fig.add_subplot(grid[0, j]) for j in range(len(t))]
    image_grid(x_t, [f"t={int(s)}\n$\\bar\\alpha_t$={float(abar[s]):.4g}" for s in t], axes=img_axes)

    ax = fig.add_subplot(grid[1, :])
    steps = np.arange(len(abar))
    ax.plot(steps, to_numpy(abar.sqrt()), color=METHOD_COLORS["data"], label=r"signal $\sqrt{\bar\alpha_t}$")
    ax.plot(steps, to_numpy((1 - abar).sqrt()), color=GENERATED_COLOR, ls="--",
            label=r"noise $\sqrt{1-\bar\alpha_t}$")
    for s in t:
        ax.axvline(int(s), color=CHECKPOINT_COLOR, lw=0.6, alpha=0.6)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("scale of $x$ and of $\\epsilon$ in $x_t$")
    ax.set_xlim(0, len(abar) - 1)
    ax.legend(fontsize=8, loc="center right")
    fig.suptitle("The forward process fades the digit into pure noise as t grows", fontsize=11, y=0.98)
    return fig


def running_mean(y, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    y = np.asarray(y, dtype=float)
    c = np.concatenate([[0.0], np.cumsum(y)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(0, hi - window)
    return (c[hi] - c[lo]) / (hi - lo)


def loss_curve(losses, checkpoint_steps=(), window: int = 25, ax=None):
    """Batch loss per optimizer step (faint), its running mean over ``window`` steps, and
    checkpoints as vertical lines, on a log scale (chapter 1)."""
    fig, ax = _fig_ax(ax, (7, 3.4))
    y = to_numpy(losses).astype(float)
    steps = np.arange(len(y))
    ax.plot(steps, y, color=METHOD_COLORS["data"], alpha=0.3, lw=0.8, label="batch loss per step")
    window = max(1, min(window, len(y)))
    ax.plot(steps, running_mean(y, window), color=METHOD_COLORS["data"], lw=2,
            label=f"mean of the last {window} steps")
    for i, s in enumerate(checkpoint_steps):
        ax.axvline(s, color=CHECKPOINT_COLOR, lw=0.8, ls=":",
                   label="checkpoint" if i == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(r"loss  mean $|\epsilon_\theta(x_t,t)-\epsilon|^2$")
    ax.set_xlim(0, max(1, len(y) - 1))
    ax.legend(fontsize=8)
    ax.set_title("Training loss of every step, with its running mean",
                 fontsize=10)
    return fig


def samples_vs_data(samples, real, ncols: int = 8, title: str | None = None):
    """Generated images (left) next to training images (right), same grid size (chapter 1)."""
    samples, real = torch.as_tensor(samples), torch.as_tensor(real)
    nrows = int(np.ceil(max(len(samples), len(real)) / ncols))
    size = tile_size(2 * ncols + 0.5, 0.8)
    fig, axes = plt.subplots(nrows, 2 * ncols + 1, squeeze=False,
                             figsize=(size * (2 * ncols + 0.5), size * nrows + 0.8),
                             gridspec_kw={"width_ratios": [1] * ncols + [0.5] + [1] * ncols})
    for ax in axes[:, ncols]:
        ax.axis("off")
    image_grid(samples, axes=axes[:, :ncols].ravel())
    image_grid(real, axes=axes[:, ncols + 1:].ravel())
    axes[0, ncols // 2].set_title(f"generated ({len(samples)})", fontsize=10, x=0.0, pad=6)
    axes[0, ncols + 1 + ncols // 2].set_title(f"training data ({len(real)})", fontsize=10,
                                              x=0.0, pad=6)
    fig.suptitle(title or "Generated digits (left) beside training digits (right)", fontsize=11)
    return fig


def samples_by_checkpoint(samples, labels, title: str | None = None):
    """One row of generated images per checkpoint (``samples``: a list of [n, 1, H, W]), each
    row labelled by ``labels`` (e.g. "epoch 10"). Same seed in every row (chapter 1)."""
    nrows, ncols = len(samples), max(len(s) for s in samples)
    size = tile_size(ncols, 0.9, margin=0.8)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 0.8, 1.05 * size * nrows + 0.6),
                             squeeze=False)
    for row, (imgs, label) in enumerate(zip(samples, labels)):
        image_grid(imgs, axes=axes[row])
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.subplots_adjust(top=0.9)
    fig.suptitle(title or "Samples at every checkpoint "
                 "(same starting noise in every row, one row per checkpoint)", fontsize=11)
    return fig


def points_by_checkpoint(data, samples, labels, title: str | None = None):
    """The 2-D training data with generated points, one panel per checkpoint (chapter 1)."""
    fig, axes = page_panels(len(samples), 3.0, 3.2, sharex=True, sharey=True,
                            layout="constrained")
    for ax, pts, label in zip(axes, samples, labels):
        points_scatter(data, pts, ax=ax, title=label, s=4)
        ax.get_legend().remove()
        if not ax.get_subplotspec().is_first_col():
            ax.set_ylabel("")
        if not ax.get_subplotspec().is_last_row():
            ax.set_xlabel("")
    fig.suptitle(title or "The 2-D model's samples at every checkpoint",
                 fontsize=11)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=2, fontsize=9, markerscale=2.5,
               frameon=False)
    return fig


def timestep_histogram(t, num_train_timesteps: int, bins: int = 20, ax=None,
                       title: str | None = None):
    """Histogram of recorded timesteps with the count a uniform draw would give per bin (chapter 1)."""
    fig, ax = _fig_ax(ax, (6, 3.2))
    t = to_numpy(t)
    bins = max(1, min(bins, len(t) // 5 or 1))
    edges = np.linspace(0, num_train_timesteps, bins + 1)
    ax.hist(t, bins=edges, color=METHOD_COLORS["data"], alpha=0.8, edgecolor="white",
            label=f"recorded timesteps ({len(t)} samples)")
    ax.axhline(len(t) / bins, color=GENERATED_COLOR, ls="--", lw=1,
               label="expected count if uniform")
    ax.set_xlabel("recorded timestep t")
    ax.set_ylabel("number of training samples")
    ax.set_xlim(0, num_train_timesteps)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "Recorded timesteps of the training set over [0, T)", fontsize=10)
    return fig


def timestep_history(epochs, timesteps, checkpoint_epochs, recorded, sample_index: int,
                     num_train_timesteps: int, ax=None):
    """The timestep one training sample got in every epoch, with the value each checkpoint
    records for it (its last visit before the checkpoint) circled (chapter 1).

    ``epochs`` and ``timesteps`` list the sample's visits (epochs counted from 1);
    ``recorded`` is ``run.recorded(c)[0][sample_index]`` for each checkpoint epoch.
    """
    fig, ax = _fig_ax(ax, (7, 3.2))
    ax.plot(to_numpy(epochs), to_numpy(timesteps), "o-", color=METHOD_COLORS["data"], ms=3.5, lw=0.8,
            label=f"timestep of sample {sample_index} in each epoch")
    ax.scatter(to_numpy(checkpoint_epochs), to_numpy(recorded), s=110, facecolors="none",
               edgecolors=GENERATED_COLOR, linewidths=1.5, zorder=3,
               label="recorded for the checkpoint at the end of that epoch")
    for e in to_numpy(checkpoint_epochs):
        ax.axvline(e, color=CHECKPOINT_COLOR, lw=0.8, ls=":")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training timestep t")
    ax.set_ylim(-30, num_train_timesteps * 1.32)
    ax.set_yticks([v for v in ax.get_yticks() if 0 <= v <= num_train_timesteps])
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    ax.set_title(f"Sample {sample_index} gets a fresh random timestep every epoch; "
                 "each checkpoint keeps only the last one", fontsize=10)
    return fig


def loss_vs_timestep(t, losses, ax=None, title: str | None = None):
    """Per-sample loss against the timestep it was computed at, log scale (chapter 1)."""
    fig, ax = _fig_ax(ax, (6, 3.4))
    ax.scatter(to_numpy(t), to_numpy(losses), s=5, color=METHOD_COLORS["data"], alpha=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("recorded timestep t")
    ax.set_ylabel("per-sample loss (log scale)")
    ax.set_title(title or "Per-sample loss of the final model against its recorded timestep", fontsize=10)
    return fig


def _fig_ax(ax, figsize):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax
