"""Figures for chapter 2 (``notebooks/02_timestep_bias.ipynb``): how the per-sample gradient norm
depends on the diffusion timestep, over the training set, across checkpoints and beside the loss.

They draw the dataclasses of ``retrac_lib.diagnostics`` (``Sweep``, ``BiasSummary``). Every function
returns the matplotlib figure it drew, so a notebook cell is one call. Norms span decades, so the
norm axes are logarithmic.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm

from . import (METHOD_COLORS, PAGE_WIDTH, SMALL, image_grid, log_axis, page_panels,
               plain_log_labels, tile_size, to_numpy)

INIT_COLOR = "#555555"        # the untrained model, drawn dashed
SAMPLE_CMAP = "tab10"         # one colour per chosen sample
CHECKPOINT_CMAP = "viridis"   # checkpoints from early (purple) to late (yellow)


def checkpoint_colors(labels) -> list:
    """A colour per checkpoint label: grey for "init", then viridis from early to late."""
    trained = [lab for lab in labels if lab != "init"]
    cmap = plt.get_cmap(CHECKPOINT_CMAP)
    shades = iter(cmap(np.linspace(0.0, 0.9, max(len(trained), 1))))
    return [INIT_COLOR if lab == "init" else next(shades) for lab in labels]


def _style(lab):
    return "--" if lab == "init" else "-"


def _sample_name(run, i) -> str:
    if run is None:
        return f"#{i}"
    return f"#{i} (label {int(run.data.labels[i])})"


def norm_vs_timestep(sweep, run=None, ax=None, title: str | None = None):
    """Gradient norm of each swept sample against the timestep (log scale), one line per sample.

    The line is the mean over the sweep's noise draws; the band spans the smallest to largest draw.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4))
    fig = ax.figure
    t = to_numpy(sweep.timesteps)
    colors = plt.get_cmap(SAMPLE_CMAP)(np.arange(len(sweep.norms)) % 10)
    for s, color in enumerate(colors):
        name = _sample_name(run, int(sweep.indices[s])) if sweep.indices is not None else f"sample {s}"
        ax.plot(t, to_numpy(sweep.mean_norms[s]), color=color, lw=1.6, label=name)
        if sweep.norms.shape[-1] > 1:
            ax.fill_between(t, to_numpy(sweep.norms[s].min(-1).values), to_numpy(sweep.norms[s].max(-1).values),
                            color=color, alpha=0.15, lw=0)
    log_axis(ax)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("gradient norm |g|")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=SMALL)
    ax.set_title(title or f"Gradient norm of each sample against t ({sweep.label})", fontsize=10)
    return fig


def _binned_line(ax, bins, color, label, ls="-", band=True):
    x, m = to_numpy(bins.centers), to_numpy(bins.mean)
    ax.plot(x, m, ls, color=color, lw=2, marker="o", ms=4, label=label)
    if band:
        ax.fill_between(x, to_numpy(bins.q25), to_numpy(bins.q75), color=color, alpha=0.15, lw=0)


def recorded_scatter(summary, ax=None, title: str | None = None, color: str | None = None):
    """Every training sample's recorded timestep against its gradient norm, with the binned mean.

    The band around the mean spans the 25th to 75th percentile of each timestep bin.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4))
    fig = ax.figure
    rec = summary.record
    color = color or METHOD_COLORS["data"]
    ax.scatter(to_numpy(rec.timesteps), to_numpy(rec.norms), s=5, alpha=0.35, color=color, lw=0,
               label=f"{len(rec.norms)} training samples")
    _binned_line(ax, summary.norm_bins, "black", "mean per bin (band: 25-75 %)")
    log_axis(ax)
    ax.set_xlabel("recorded training timestep t")
    ax.set_ylabel("gradient norm |g|")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=SMALL, loc="upper right")
    ax.set_title(title or (f"{rec.label}: lowest-t tenth has {summary.decile_ratio:.1f}x the norm "
                           f"of the highest-t tenth"), fontsize=10)
    return fig


def over_training(summaries, title: str | None = None):
    """Binned mean norm against timestep for every checkpoint (left) and the decile ratio (right)."""
    fig, (ax, ax2) = page_panels(2, 4.5, 4.2, gridspec_kw={"width_ratios": [1.6, 1]})
    labels = [s.label for s in summaries]
    colors = checkpoint_colors(labels)
    for s, color in zip(summaries, colors):
        _binned_line(ax, s.norm_bins, color, s.label, _style(s.label), band=False)
    log_axis(ax)
    ax.set_xlabel("recorded training timestep t (bin centre)")
    ax.set_ylabel("mean gradient norm in bin")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=SMALL, title="weights", title_fontsize=SMALL)
    ax.set_title("Mean norm per timestep bin\nat each checkpoint", fontsize=10)
    ratios = [s.decile_ratio for s in summaries]
    ax2.bar(range(len(ratios)), ratios, color=colors)
    ax2.axhline(1, color="black", lw=0.8, ls=":")
    for i, r in enumerate(ratios):
        ax2.text(i, r, f"{r:.1f}x", ha="center", va="bottom", fontsize=9)
    ax2.set_xticks(range(len(ratios)), labels, rotation=30, ha="right", rotation_mode="anchor")
    log_axis(ax2)
    ax2.set_ylim(min(0.5, min(ratios) / 1.5), max(ratios) * 2)
    ax2.set_ylabel("decile ratio (lowest-t / highest-t tenth)")
    ax2.set_title("Decile ratio\nat each set of weights", fontsize=10)
    fig.suptitle(title or "Gradient norm per timestep bin, from initialization to the last "
                 "checkpoint", fontsize=11)
    fig.tight_layout()
    return fig


def loss_beside_norm(summaries, title: str | None = None):
    """Binned mean loss (left) and mean gradient norm (right) against timestep, per checkpoint."""
    fig, axes = page_panels(2, 4.5, 4.0)
    colors = checkpoint_colors([s.label for s in summaries])
    for s, color in zip(summaries, colors):
        _binned_line(axes[0], s.loss_bins, color, s.label, _style(s.label), band=False)
        _binned_line(axes[1], s.norm_bins, color, s.label, _style(s.label), band=False)
    for ax, what in zip(axes, ("per-sample loss (mean per bin)", "gradient norm |g| (mean per bin)")):
        log_axis(ax)
        ax.set_xlabel("recorded timestep t (bin centre)")
        ax.set_ylabel(what)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=SMALL)
    axes[0].set_title("Loss per timestep", fontsize=10)
    axes[1].set_title("Gradient norm per timestep", fontsize=10)
    fig.suptitle(title or "Loss and gradient norm per timestep bin", fontsize=11)
    fig.tight_layout()
    return fig


def points_bias(run, summaries, title: str | None = None):
    """The 2-D version: points coloured by gradient norm, norm against t, curves per checkpoint."""
    last = summaries[-1]
    rec = last.record
    fig, axes = page_panels(3, 4.5, 4.0)
    pts = to_numpy(run.data.images[rec.indices])
    norms = to_numpy(rec.norms)
    sc = axes[0].scatter(pts[:, 0], pts[:, 1], c=norms, cmap="magma_r", s=10,
                         norm=LogNorm(norms.min(), norms.max()))
    bar = fig.colorbar(sc, ax=axes[0], label="gradient norm at recorded t (log)")
    plain_log_labels(bar.ax.yaxis)
    axes[0].set_aspect("equal")
    axes[0].set_xlabel("x1")
    axes[0].set_ylabel("x2")
    axes[0].set_title(f"Training points, {rec.label}", fontsize=10)
    recorded_scatter(last, ax=axes[1],
                     title=f"Norm vs recorded t: {last.decile_ratio:.1f}x decile ratio")
    colors = checkpoint_colors([s.label for s in summaries])
    for s, color in zip(summaries, colors):
        _binned_line(axes[2], s.norm_bins, color, s.label, _style(s.label), band=False)
    log_axis(axes[2])
    axes[2].set_xlabel("recorded timestep t (bin centre)")
    axes[2].set_ylabel("mean gradient norm in bin")
    axes[2].grid(True, which="major", alpha=0.3)
    axes[2].legend(fontsize=SMALL)
    axes[2].set_title("Across checkpoints", fontsize=10)
    fig.suptitle(title or "The same measurements on 2-D points with an MLP denoiser", fontsize=11)
    fig.tight_layout()
    return fig


def sweep_panel(ax, sweeps, index: int, image=None):
    """One sample's norm-vs-t curve at every checkpoint of ``sweeps`` (a list of ``Sweep``)."""
    labels = [s.label for s in sweeps]
    for sw, color, lab in zip(sweeps, checkpoint_colors(labels), labels):
        row = int((sw.indices == index).nonzero()[0, 0]) if sw.indices is not None else index
        ax.plot(to_numpy(sw.timesteps), to_numpy(sw.mean_norms[row]), _style(lab), color=color, lw=1.5, label=lab)
    log_axis(ax)
    ax.grid(True, which="major", alpha=0.3)
    if image is not None:
        inset = ax.inset_axes([0.02, 0.03, 0.24, 0.34])  # lower left: small t, small norm stays empty
        inset.imshow(to_numpy(image)[0], cmap="gray_r", vmin=-1, vmax=1)
        inset.set_xticks([]), inset.set_yticks([])
    return ax


def small_multiples(run, sweeps, ncols: int = 3, title: str | None = None):
    """A panel per swept sample, each with its norm-vs-t curve at every checkpoint.

    The static counterpart of ``retrac_lib.book.widgets.TimestepExplorer`` (which the rendered book
    cannot run): every (sample, checkpoint) choice of the explorer is one curve here.
    """
    indices = [int(i) for i in sweeps[0].indices]
    nrows = int(np.ceil(len(indices) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(min(3.6 * ncols, PAGE_WIDTH), 2.8 * nrows),
                             sharex=True,
                             sharey=True, squeeze=False)
    for ax, i in zip(axes.flat, indices):
        sweep_panel(ax, sweeps, i, run.data.images[i] if run.data.is_image else None)
        ax.set_title(_sample_name(run, i), fontsize=9)
    for ax in axes.flat[len(indices):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("timestep t")
    for ax in axes[:, 0]:
        ax.set_ylabel("gradient norm |g|")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=SMALL,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(title or "Each swept sample: gradient norm against t at every set of weights", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def proponents_preview(run, queries, top, recorded_t, title: str | None = None):
    """Each query (first column) and its top proponents, captioned with their recorded timestep."""
    k = top.shape[1]
    size = tile_size(k + 1, 1.15)
    fig, axes = plt.subplots(len(queries), k + 1, squeeze=False,
                             figsize=(size * (k + 1), 1.2 * size * len(queries) + 0.5))
    for q in range(len(queries)):
        image_grid(queries[q:q + 1], ["query"], axes=axes[q, :1])
        rows = top[q].tolist()
        image_grid(run.data.images[rows], [f"t={int(recorded_t[i])}" for i in rows], axes=axes[q, 1:])
        for ax in axes[q, 1:]:
            ax.title.set_color(METHOD_COLORS["tracin"])
    fig.suptitle(title or "Top TracIn proponents and the timestep each was trained at", fontsize=11)
    fig.tight_layout()
    return fig
