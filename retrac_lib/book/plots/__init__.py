"""Figures for the book: one module per concern, shared style here.

Every figure uses the same colour for a method (``METHOD_COLORS``) everywhere in the book.

Page rule: the book's column is about 730 px wide and the inline backend draws at 100 dpi, so
no figure is wider than ``PAGE_WIDTH`` inches (shown at >= 80 %) and no text is smaller than
``SMALL`` points (>= 9 px on the page). Rows of panels wrap (``page_panels``), image tiles
shrink to fit (``tile_size``) and log axes are labelled with plain numbers (``log_axis``).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import Formatter

PAGE_WIDTH = 9.0   # inches: the widest figure
SMALL = 8          # points: the smallest text (captions, legends, annotations)

METHOD_COLORS = {
    "tracin": "#d95f02",   # orange: Diffusion-TracIn
    "retrac": "#1b9e77",   # green: Diffusion-ReTrac
    "dtrak": "#7570b3",    # purple: D-TRAK (Zheng et al., 2024)
    "cosine": "#e7298a",   # pink: plain gradient cosine
    "pixel": "#66a61e",    # olive: nearest neighbour in pixel space
    "feature": "#a6761d",  # brown: nearest neighbour in a CNN classifier's feature space
    "random": "#999999",   # grey: random scores
    "data": "#4c72b0",     # blue: the training data itself
}
METHOD_LABELS = {
    "tracin": "Diffusion-TracIn", "retrac": "Diffusion-ReTrac", "dtrak": "D-TRAK",
    "cosine": "gradient cosine", "pixel": "pixel neighbours",
    "feature": "feature neighbours", "random": "random",
}


def to_numpy(x) -> np.ndarray:
    """A tensor (or array-like) as a float64 NumPy array on the CPU, for matplotlib."""
    return torch.as_tensor(x).detach().cpu().double().numpy()


def page_panels(n: int, panel_width: float, height: float, max_cols: int | None = None,
                **kwargs):
    """A figure of ``n`` panels about ``panel_width`` x ``height`` inches each, wrapped into as
    few rows as keep it within ``PAGE_WIDTH`` (and ``max_cols`` columns), balanced.

    Returns ``(fig, axes)``, ``axes`` a flat list of ``n``; ``kwargs`` go to ``plt.subplots``.
    """
    ncols = max(1, min(n, max_cols or n, int(PAGE_WIDTH // panel_width)))
    nrows = -(-n // ncols)
    ncols = -(-n // nrows)   # balanced rows: 4 panels as 2 x 2, not 3 + 1
    fig, axes = plt.subplots(nrows, ncols, squeeze=False, **kwargs,
                             figsize=(min(PAGE_WIDTH, panel_width * ncols), height * nrows))
    for ax in axes.flat[n:]:
        ax.remove()
    return fig, list(axes.flat[:n])


def tile_size(ncols: float, size: float, margin: float = 0.0) -> float:
    """``size`` (inches per image tile), shrunk so ``ncols`` tiles and ``margin`` fit the page."""
    return min(size, (PAGE_WIDTH - margin) / ncols)


class _PlainLogFormatter(Formatter):
    """Log-axis labels as plain numbers (0.2, 1, 5); 2x and 5x ticks only on short axes."""

    def __init__(self, minor: bool):
        self.minor = minor

    def __call__(self, x, pos=None):
        if x <= 0:
            return ""
        if self.minor:
            lo, hi = self.axis.get_view_interval()
            mantissa = round(x / 10 ** np.floor(np.log10(x) + 1e-9))
            if hi / max(lo, 1e-300) > 10 ** 2.5 or mantissa not in (2, 5):
                return ""
        return f"{x:g}"


def plain_log_labels(axis):
    """Label a log-scaled matplotlib ``axis`` (``ax.yaxis``, a colorbar's) with plain numbers."""
    axis.set_major_formatter(_PlainLogFormatter(minor=False))
    axis.set_minor_formatter(_PlainLogFormatter(minor=True))


def log_axis(ax, axis: str = "y"):
    """A logarithmic ``axis`` ("x" or "y") of ``ax`` labelled with plain numbers."""
    getattr(ax, f"set_{axis}scale")("log")
    plain_log_labels(getattr(ax, f"{axis}axis"))
    return ax


def image_grid(images, captions=None, ncols: int = 8, title: str | None = None,
               size: float = 1.1, axes=None, cmap: str = "gray_r"):
    """Show [n, 1, H, W] images in [-1, 1] in a grid, each with an optional caption.

    Pass ``axes`` (a flat sequence of matplotlib axes) to draw into an existing figure.
    """
    images = torch.as_tensor(images).detach().cpu()
    n = len(images)
    if axes is None:
        nrows = max(1, int(np.ceil(n / ncols)))
        size = tile_size(ncols, size)
        fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.15),
                                 squeeze=False)
        axes = axes.ravel()
    else:
        fig = axes[0].figure
    for i, ax in enumerate(axes):
        ax.set_xticks([]), ax.set_yticks([])
        if i >= n:
            ax.axis("off")
            continue
        ax.imshow(images[i, 0].numpy(), cmap=cmap, vmin=-1, vmax=1)
        if captions is not None:
            ax.set_title(captions[i], fontsize=SMALL, pad=2)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
