"""Figures of chapter 5: removal test, linear datamodeling score, planted outliers."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from . import METHOD_COLORS, METHOD_LABELS, PAGE_WIDTH, SMALL, page_panels, tile_size


def _label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


def _dots(ax, values: dict[str, np.ndarray], title: str, xlabel: str, zero: bool = True):
    """One row per method: every query as a dot, the mean with its standard error as a bar."""
    methods = list(values)
    rng = np.random.default_rng(0)
    for row, m in enumerate(methods):
        v = np.asarray(values[m], dtype=float)
        colour = METHOD_COLORS.get(m, "black")
        ax.scatter(v, row + rng.uniform(-0.15, 0.15, len(v)), s=16, color=colour, alpha=0.55,
                   edgecolor="none")
        sem = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
        ax.errorbar(v.mean(), row, xerr=sem, fmt="D", color=colour, markeredgecolor="black",
                    markersize=7, capsize=4, zorder=3)
    if zero:
        ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(methods)), [_label(m) for m in methods])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)


def removal_figure(result, methods=None, relative: bool = True):
    """Loss increase of each query after removing each method's top-k proponents."""
    methods = methods or result.methods
    get = result.relative_increase if relative else result.increase
    values = {m: 100 * get(m).numpy() if relative else get(m).numpy() for m in methods}
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.4))
    best = max(methods, key=lambda m: values[m].mean())
    _dots(ax, values, f"Removing the top {result.k} proponents raises the query loss most for "
          f"{_label(best)}", "query loss increase after retraining (% of full-data loss)"
          if relative else "query loss increase after retraining")
    ax.text(0.99, 0.02, "dots: queries; diamond: mean ± s.e.", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=SMALL, color="0.3")
    fig.tight_layout()
    return fig


def lds_figure(results: dict, example: str, query: int = 0):
    """Left: one query's retrained losses against a method's predictions; right: LDS per method."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(PAGE_WIDTH, 0.45 * len(results) + 2.8),
                               gridspec_kw=dict(width_ratios=[1, 1.3]))
    r = results[example]
    a.scatter(r.predicted[:, query], r.losses[:, query], s=18, color=METHOD_COLORS.get(example),
              edgecolor="black", linewidth=0.3)
    a.set_xlabel(f"summed {_label(example)} score of the subset")
    a.set_ylabel("query loss after retraining\non the subset")
    a.set_title(f"Query {query}: Spearman with -loss = {float(r.per_query[query]):+.2f}",
                fontsize=10)
    a.grid(alpha=0.3)
    values = {m: res.per_query.numpy() for m, res in results.items()}
    best = max(values, key=lambda m: values[m].mean())
    _dots(b, values, f"Linear datamodeling score:\nhighest for {_label(best)}",
          "LDS per query (Spearman;\n1 = perfect, 0 = no information)")
    fig.tight_layout()
    return fig


def outlier_rank_figure(self_influence: dict, is_outlier, aucs: dict | None = None):
    """Where the planted outliers fall when each method ranks training samples by self-influence."""
    is_outlier = torch.as_tensor(is_outlier)
    methods = list(self_influence)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(methods) + 1.5))
    n = len(is_outlier)
    for row, m in enumerate(methods):
        order = torch.as_tensor(self_influence[m]).argsort(descending=True)
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)
        pct = 100 * rank[is_outlier].double().numpy() / (n - 1)
        ax.scatter(pct, np.full(len(pct), row), s=40, marker="|", linewidth=2.5,
                   color=METHOD_COLORS.get(m, "black"))
        if aucs is not None:
            ax.text(1.01, row, f"AUC {aucs[m]:.2f}", va="center", fontsize=SMALL,
                    transform=ax.get_yaxis_transform())
    ax.axvspan(0, 100 * int(is_outlier.sum()) / n, color="0.85", zorder=0)
    ax.set_yticks(range(len(methods)), [_label(m) for m in methods])
    ax.invert_yaxis()
    ax.set_xlim(-2, 102)
    ax.set_xlabel("rank by self-influence (percent of the training set; 0 = highest)")
    best = max(methods, key=lambda m: aucs[m]) if aucs else methods[0]
    ax.set_title(f"Planted outliers by self-influence: {_label(best)} ranks them highest\n"
                 "(each tick is one outlier; shaded: where a perfect method puts them)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def proponent_rows(query: torch.Tensor, images: torch.Tensor, top: dict, highlight=None,
                   title: str | None = None, size: float = 0.9):
    """One row per method: the query image, then its top proponents; ``highlight`` [N] marks
    training samples to frame in red (the planted outliers)."""
    methods = list(top)
    k = max(len(v) for v in top.values())
    size = tile_size(k + 1, size, margin=1.4)
    fig, axes = plt.subplots(len(methods), k + 1, squeeze=False,
                             figsize=(size * (k + 1) + 1.4, size * len(methods) * 1.1 + 0.7))
    for row, m in enumerate(methods):
        for col in range(k + 1):
            ax = axes[row, col]
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.imshow(query[0], cmap="gray_r", vmin=-1, vmax=1)
                ax.set_ylabel(_label(m), rotation=0, ha="right", va="center", fontsize=9,
                              color=METHOD_COLORS.get(m, "black"))
                if row == 0:
                    ax.set_title("query", fontsize=SMALL)
                continue
            i = int(top[m][col - 1])
            ax.imshow(images[i, 0], cmap="gray_r", vmin=-1, vmax=1)
            if highlight is not None and bool(highlight[i]):
                for spine in ax.spines.values():
                    spine.set_edgecolor("red"), spine.set_linewidth(2.5)
            if row == 0:
                ax.set_title(f"#{col}", fontsize=SMALL)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def points_proponents(data, queries: torch.Tensor, top: dict, query: int = 0, title: str | None = None):
    """2-D data: one panel per method, the training points, a query and its top proponents."""
    methods = list(top)
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.9 * rows), squeeze=False,
                             sharex=True, sharey=True)
    x = data.images.numpy()
    for ax, m in zip(axes.ravel(), methods):
        ax.scatter(x[:, 0], x[:, 1], s=5, color="0.75")
        idx = np.asarray(top[m][query])
        ax.scatter(x[idx, 0], x[idx, 1], s=16, color=METHOD_COLORS.get(m, "black"),
                   edgecolor="black", linewidth=0.3, label="top proponents")
        z = queries[query].numpy()
        ax.scatter([z[0]], [z[1]], marker="*", s=220, color="gold", edgecolor="black", zorder=3,
                   label="query")
        ax.set_title(_label(m), fontsize=10, color=METHOD_COLORS.get(m, "black"))
        ax.set_aspect("equal")
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    axes[0, 0].legend(loc="lower left", fontsize=SMALL)
    fig.suptitle(title or f"Query {query} and its top {len(top[methods[0]][query])} proponents",
                 fontsize=10)
    fig.tight_layout()
    return fig


def paired_figure(panels: dict, title: str | None = None):
    """Paired comparisons: one panel per entry of ``panels`` (a title -> {(method, against):
    ``PairedDifference``}); per row the per-query differences as dots and their mean with its
    bootstrap interval as a bar. Colour: the first method of the pair."""
    n_rows = max(len(p) for p in panels.values())
    fig, axes = page_panels(len(panels), PAGE_WIDTH, 0.45 * n_rows + 1.3, max_cols=1,
                            layout="constrained")
    rng = np.random.default_rng(0)
    for ax, (name, pairs) in zip(axes, panels.items()):
        for row, ((m, ref), d) in enumerate(pairs.items()):
            colour = METHOD_COLORS.get(m, "black")
            v = d.per_query.numpy()
            ax.scatter(v, row + rng.uniform(-0.15, 0.15, len(v)), s=14, color=colour, alpha=0.5,
                       edgecolor="none")
            ax.errorbar(d.mean, row, xerr=[[d.mean - d.low], [d.high - d.mean]], fmt="D",
                        color=colour, markeredgecolor="black", markersize=7, capsize=4, zorder=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(pairs)), [f"{_label(m)} − {_label(ref)}" for m, ref in pairs])
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    level = next(iter(next(iter(panels.values())).values())).level
    fig.suptitle(title or f"Paired differences per query (dots) with their mean and "
                          f"{100 * level:.0f} % bootstrap interval", fontsize=10)
    return fig
