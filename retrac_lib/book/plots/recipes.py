"""Figures for ``notebooks/04b_recipes.ipynb`` (the paper's recipe and ours): the timestep bias
under each loss and noise schedule, and what the query grid's size buys. Each function returns
its figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter
from matplotlib.transforms import Bbox

from . import METHOD_COLORS, METHOD_LABELS, PAGE_WIDTH, SMALL, log_axis
from .bias import _binned_line

RECIPE_COLORS = ["#4c72b0", "#8172b2", "#c44e52", "#dd8452"]   # one per loss x schedule run


def bias_by_recipe(biases: dict, title: str | None = None):
    """Mean gradient norm per timestep bin (band: middle half) for each run of ``biases``
    (name -> ``recipes.RunBias``), on a log axis; the legend gives each decile ratio."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for color, (name, bias) in zip(RECIPE_COLORS, biases.items()):
        _binned_line(ax, bias.summary.norm_bins, color,
                     f"{name}: decile ratio {bias.decile_ratio:.1f}x, Spearman {bias.spearman:+.2f}")
    log_axis(ax)
    ax.set_xlabel("recorded timestep t (bins of a tenth of T)")
    ax.set_ylabel("per-sample gradient norm |g|")
    ax.legend(fontsize=SMALL)
    ax.set_title(title or "Gradient norm against recorded timestep, per loss and schedule")
    fig.tight_layout()
    return fig


def grid_cost(rows: list[dict], title: str | None = None):
    """Agreement with the reference grid against the number of query draws T' x K.

    ``rows``: dicts with ``method``, ``timesteps``, ``n_noise``, ``spearman``, ``overlap`` and
    ``seconds``. Left: mean Spearman (circles) and top-10 overlap (squares); right: time. Each
    point is labelled with its grid (the first method's labels left of its points, the second's
    right, stacked where they would overlap); grids with the same number of draws share an x.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 4.4))
    for side, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        draws = np.array([r["timesteps"] * r["n_noise"] for r in mine])
        color, label = METHOD_COLORS[method], METHOD_LABELS[method]
        left.scatter(draws, [r["spearman"] for r in mine], marker="o", color=color,
                     label=f"{label}: Spearman")
        left.scatter(draws, [r["overlap"] for r in mine], marker="s", facecolors="none",
                     edgecolors=color, label=f"{label}: top-10 overlap")
        right.scatter(draws, [r["seconds"] for r in mine], marker="o", color=color, label=label)
        dx, align = (-7, "right") if side == 0 else (7, "left")   # first method left of its points
        for r, x in zip(mine, draws):
            for ax, y in ((left, r["overlap"]), (right, r["seconds"])):
                ax.annotate(f"{r['timesteps']}x{r['n_noise']}", (x, y), xytext=(dx, 0),
                            textcoords="offset points", fontsize=SMALL, color=color, ha=align,
                            va="center")
    for ax in (left, right):
        ax.set_xscale("log")
        ticks = sorted({r["timesteps"] * r["n_noise"] for r in rows})
        ax.set_xticks(ticks, _spaced_labels(ticks))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.18, y=0.1)   # room for the outermost point labels
        ax.set_xlabel("query draws per query and checkpoint,\nT' x K (log scale)")
        ax.legend(fontsize=SMALL, loc="lower right" if ax is left else "upper left")
    left.set_ylabel("agreement with the reference grid")
    left.set_ylim(0, 1.08)
    right.set_ylabel("attribution time (s), training side included")
    fig.suptitle(title or "Rankings on smaller query grids against the reference grid")
    fig.tight_layout()
    for ax in (left, right):
        _separate(ax, ax.collections)
    return fig


def _spaced_labels(ticks, gap: float = 0.2) -> list[str]:
    """Labels of log-axis ``ticks``, blank where a tick is within ``gap`` decades of the last
    labelled one (so that 160 and 200 do not run together)."""
    labels, last = [], -np.inf
    for t in ticks:
        keep = np.log10(t) - last >= gap
        labels.append(str(t) if keep else "")
        last = np.log10(t) if keep else last
    return labels


def _separate(ax, markers, step: float = 9.0):
    """Move ``ax``'s point labels up or down, in steps of ``step`` points, until none overlaps
    another label or a marker of ``markers`` (scatter collections) or leaves the axes, keeping
    each as close to its point as it can."""
    renderer = ax.figure.canvas.get_renderer()
    placed = [_marker_box(ax, c, xy) for c in markers for xy in c.get_offsets()]
    for text in sorted(ax.texts, key=lambda t: (t.xy[0], -t.xy[1])):
        dx, _ = text.xyann
        for shift in (0, -1, 1, -2, 2, -3, 3, -4, 4):
            text.xyann = (dx, shift * step)
            box = text.get_window_extent(renderer)
            inside = ax.bbox.containsy(box.y0) and ax.bbox.containsy(box.y1)
            if inside and not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def _marker_box(ax, collection, xy):
    """The display box of one scatter marker of ``collection`` at data point ``xy``."""
    x, y = ax.transData.transform(xy)
    r = np.sqrt(collection.get_sizes()[0]) / 2 * ax.figure.dpi / 72
    return Bbox.from_extents(x - r, y - r, x + r, y + r)
