"""Figures for the book: one module per concern, shared style here.

Every figure uses the same colour for a method (``METHOD_COLORS``) everywhere in the book.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

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
    "cosine": "gradient cosine", "pixel": "pixel neighbour",
    "feature": "feature neighbour", "random": "random",
}


def to_numpy(x) -> np.ndarray:
    """A tensor (or array-like) as a float64 NumPy array on the CPU, for matplotlib."""
    return torch.as_tensor(x).detach().cpu().double().numpy()


def image_grid(images, captions=None, ncols: int = 8, title: str | None = None,
               size: float = 1.1, axes=None, cmap: str = "gray_r"):
    """Show [n, 1, H, W] images in [-1, 1] in a grid, each with an optional caption.

    Pass ``axes`` (a flat sequence of matplotlib axes) to draw into an existing figure.
    """
    images = torch.as_tensor(images).detach().cpu()
    n = len(images)
    if axes is None:
        nrows = max(1, int(np.ceil(n / ncols)))
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
            ax.set_title(captions[i], fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
