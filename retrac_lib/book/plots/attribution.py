"""Figures for chapters 3 and 4: who the proponents are, how often they repeat, when they trained.

They draw ``AttributionResult``s (``rl.attribute``) on a run. ``results`` arguments are either
one result or a dict ``{"tracin": ..., "retrac": ...}``; methods keep their colour from
``METHOD_COLORS`` in every figure. Images are captioned with the training index, the score and
the *dominant* recorded timestep: the timestep a sample was trained at before the checkpoint
where its weighted gradient norm was largest (``metrics.dominant_timesteps``), the term that
dominates its TracIn sum. Every function returns the figure it drew.
"""
from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import TwoSlopeNorm
from matplotlib.gridspec import GridSpec

from ...evaluation import metrics
from . import (METHOD_COLORS, METHOD_LABELS, SMALL, image_grid, log_axis, page_panels, tile_size,
               to_numpy)

ALL_COLOR = "#9a9a9a"          # the whole training set, for reference
REPEAT_CMAP = "tab10"          # one frame colour per generally influential sample
INFLUENCE_CMAP = "RdBu_r"      # red: proponent (helps the query), blue: opponent


def _as_dict(results) -> dict:
    return dict(results) if isinstance(results, dict) else {results.config.method: results}


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _color(method: str) -> str:
    return METHOD_COLORS.get(method, "black")


def caption_timesteps(result, run) -> torch.Tensor:
    """[N] the dominant recorded timestep of every training sample (see the module docstring)."""
    return metrics.dominant_timesteps(result.recorded_timesteps(run), result.train_grad_norms,
                                      result.checkpoint_weights)


def _query_names(queries_or_names, n) -> list[str]:
    if queries_or_names is None:
        return [f"query {q}" for q in range(n)]
    return list(queries_or_names)


def _frame(ax, color, width=2.5):
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _caption(run, i, score, t) -> str:
    return f"#{i} ({int(run.data.labels[i])})\nt={int(t)}\n{score:+.1e}"


def _caption_height(lines: int) -> float:
    """Inches that ``lines`` lines of an image caption take above its tile."""
    return lines * 1.25 * SMALL / 72 + 0.05


def _header(fig, ax_first, ax_last, text, color="black", caption_lines=3):
    x0 = ax_first.get_position().x0
    x1 = ax_last.get_position().x1
    y = ax_first.get_position().y1 + (_caption_height(caption_lines) + 0.05) / fig.get_figheight()
    fig.text((x0 + x1) / 2, y, text, ha="center", va="bottom",
             fontsize=9, color=color, fontweight="bold")


def _grid_figure(n_rows, blocks, size, title, caption_lines=3):
    """A figure with ``n_rows`` rows of image blocks separated by narrow gaps; returns (fig, axes).

    ``axes[r][b]`` is the list of axes of block ``b`` in row ``r``.
    """
    ratios = []
    for b, width in enumerate(blocks):
        ratios += [1.0] * width + ([0.35] if b < len(blocks) - 1 else [])
    size = tile_size(sum(ratios), size, margin=0.2)
    caption_h = _caption_height(caption_lines)
    height = (size + caption_h) * n_rows + 0.65
    fig = plt.figure(figsize=(size * sum(ratios) + 0.2, height))
    gs = GridSpec(n_rows, len(ratios), figure=fig, width_ratios=ratios, wspace=0.08,
                  hspace=caption_h / size, top=1 - (0.6 + caption_h) / height,
                  bottom=0.05 / fig.get_figheight(), left=0.01, right=0.99)
    axes = []
    for r in range(n_rows):
        col, row_axes = 0, []
        for b, width in enumerate(blocks):
            row_axes.append([fig.add_subplot(gs[r, col + j]) for j in range(width)])
            col += width + 1
        axes.append(row_axes)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / fig.get_figheight(), va="top")
    return fig, axes


def proponent_grid(result, run, queries, query_indices=None, k: int = 6, opponents: bool = True,
                   query_names=None, title: str | None = None, size: float = 1.05):
    """One row per query: the query, its top-``k`` proponents and (``opponents``) bottom-``k`` opponents.

    Captions: training index (label), dominant recorded timestep t, and the score.
    """
    queries = torch.as_tensor(queries)
    rows = list(range(len(queries))) if query_indices is None else [int(q) for q in query_indices]
    names = _query_names(query_names, len(queries))
    t_dom = caption_timesteps(result, run)
    blocks = [1, k] + ([k] if opponents else [])
    fig, axes = _grid_figure(len(rows), blocks, size, title)
    scores = result.scores
    top, bottom = result.proponents(k), result.opponents(k) if opponents else None
    for r, q in enumerate(rows):
        image_grid(queries[q:q + 1], [names[q]], axes=axes[r][0])
        _frame(axes[r][0][0], "black", 1.5)
        for b, idx in enumerate([top[q]] + ([bottom[q]] if opponents else [])):
            caps = [_caption(run, int(i), float(scores[q, i]), t_dom[i]) for i in idx]
            image_grid(run.data.images[idx], caps, axes=axes[r][1 + b])
    _header(fig, axes[0][0][0], axes[0][0][0], "query")
    _header(fig, axes[0][1][0], axes[0][1][-1], f"top-{k} proponents (largest score first)",
            _color(result.config.method))
    if opponents:
        _header(fig, axes[0][2][0], axes[0][2][-1], f"top-{k} opponents (most negative first)",
                "#555555")
    return fig


def query_proponent_grid(result, run, queries, k: int = 8, share: float = 0.5, query_indices=None,
                         query_names=None, title: str | None = None, size: float = 0.9):
    """Queries (rows) against their top-``k`` proponents; samples that come back are framed.

    A proponent in the top-``k`` of at least ``share`` of *all* the result's queries gets a
    coloured frame, one colour per sample, so repeats are visible at a glance; the header says
    how many are framed (or that none is).
    """
    queries = torch.as_tensor(queries)
    rows = list(range(len(queries))) if query_indices is None else [int(q) for q in query_indices]
    names = _query_names(query_names, len(queries))
    top = result.proponents(k)
    general, counts = metrics.generally_influential(top, share)
    cmap = plt.get_cmap(REPEAT_CMAP)
    colors = {int(i): cmap(j % 10) for j, i in enumerate(general)}
    fig, axes = _grid_figure(len(rows), [1, k], size, title, caption_lines=1)
    for r, q in enumerate(rows):
        image_grid(queries[q:q + 1], [names[q]], axes=axes[r][0])
        caps = [f"#{int(i)}" for i in top[q]]
        image_grid(run.data.images[top[q]], caps, axes=axes[r][1])
        for ax, i in zip(axes[r][1], top[q].tolist()):
            if i in colors:
                _frame(ax, colors[i], 3)
                ax.title.set_color(colors[i])
                ax.title.set_fontweight("bold")
    note = (f"{len(general)} framed, one colour each" if len(general) else
            f"none framed: no sample is in the top-{k} of >= {share:.0%} of the {len(top)} queries")
    _header(fig, axes[0][1][0], axes[0][1][-1], f"top-{k} proponents ({note})",
            _color(result.config.method), caption_lines=1)
    _header(fig, axes[0][0][0], axes[0][0][0], "query", caption_lines=1)
    return fig


def appearance_counts(results, k: int = 10, share: float = 0.5, n_show: int = 30, ax=None,
                      title: str | None = None):
    """For each method: how many queries' top-``k`` each training sample is in, most frequent first.

    Bars for the ``n_show`` most frequent samples; the dashed line marks ``share`` of the queries.
    Flat and low means every query has its own proponents; a few tall bars mean the same
    samples come back for every query.
    """
    results = _as_dict(results)
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
    fig = ax.figure
    width = 0.8 / len(results)
    q = None
    for m, (name, res) in enumerate(results.items()):
        counts = metrics.appearance_counts(res.proponents(k), res.scores.shape[1])
        q = res.scores.shape[0]
        top = counts.sort(descending=True).values[:n_show]
        x = np.arange(len(top)) + (m - (len(results) - 1) / 2) * width
        ax.bar(x, to_numpy(top), width=width, color=_color(name), label=_label(name))
    ax.axhline(share * q, color="black", ls="--", lw=1, label=f"{share:.0%} of the {q} queries")
    ax.set_xlabel(f"training samples, sorted by how often they are a top-{k} proponent")
    ax.set_ylabel(f"queries with it in their top-{k}")
    ax.set_xlim(-0.7, n_show - 0.3)
    ax.legend(fontsize=SMALL)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or f"How often the same training samples come back (top-{k})", fontsize=10)
    fig.tight_layout()
    return fig


def _dominant_pairs(result, run):
    """[N] dominant recorded timestep and the (unweighted) gradient norm at that checkpoint."""
    t = result.recorded_timesteps(run)
    norms = torch.as_tensor(result.train_grad_norms, dtype=torch.float64)
    c = (norms * result.checkpoint_weights.double()[:, None]).argmax(0, keepdim=True)
    return t.gather(0, c)[0], norms.gather(0, c)[0]


def timestep_bias(results, run, k: int = 10, title: str | None = None):
    """When and at what gradient norm the top-``k`` proponents were trained, per method.

    Left: the recorded timesteps of every (proponent, checkpoint) pair against those of all
    training samples (uniform by construction). Then one panel per method: every training sample
    at its dominant checkpoint (the one with the largest weighted norm, which dominates its TracIn
    sum): recorded timestep against gradient norm (log scale), proponents highlighted.
    """
    results = _as_dict(results)
    fig, axes = page_panels(1 + len(results), 4.5, 3.6, layout="constrained")
    ax = axes[0]
    bins = np.linspace(0, 1000, 21)
    first = next(iter(results.values()))
    t_all = first.recorded_timesteps(run)
    ax.hist(to_numpy(t_all.flatten()), bins=bins, density=True, color=ALL_COLOR, alpha=0.5,
            label="all training samples")
    for name, res in results.items():
        t_prop, _ = metrics.proponent_timesteps(res.proponents(k), res.recorded_timesteps(run))
        ax.hist(to_numpy(t_prop), bins=bins, density=True, histtype="step", lw=2, color=_color(name),
                label=f"top-{k} proponents, {_label(name)}")
    ax.set_xlabel("recorded training timestep t")
    ax.set_ylabel("density")
    ax.legend(fontsize=SMALL)
    ax.set_title("Recorded t of every (proponent, checkpoint)", fontsize=10)
    for ax, (name, res) in zip(axes[1:], results.items()):
        t, norms = _dominant_pairs(res, run)
        top = res.proponents(k).unique()
        ax.scatter(to_numpy(t), to_numpy(norms), s=3, color=ALL_COLOR, alpha=0.5, rasterized=True,
                   label="every training sample")
        ax.scatter(to_numpy(t[top]), to_numpy(norms[top]), s=14, color=_color(name), edgecolor="black",
                   lw=0.3, label=f"top-{k} proponents of any query")
        log_axis(ax)
        ax.set_xlabel("dominant recorded timestep t")
        ax.set_ylabel(r"gradient norm $|g_c(x_i)|$ at that checkpoint")
        ax.legend(fontsize=SMALL, loc="upper right")
        ax.set_title(f"{_label(name)}: proponents' norms", fontsize=10, color=_color(name))
        ax.grid(True, which="major", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def influence_2d(results, run, query, k: int = 10, title: str | None = None, norm_panel: bool = False):
    """2-D training points coloured by their influence on one query point, one panel per method.

    Red helps the query (proponent), blue hurts it (opponent); the colour scale is symmetric
    around zero and clipped at the 99th percentile of |score| so that a few extreme points do
    not wash out the rest. The query is the black star; the top-``k`` proponents are circled.
    ``norm_panel`` adds a last panel plotting every point's influence (first method) against its
    training-gradient norm (log scale), coloured by distance to the query: a fan that widens with
    the norm is the norm factor of TracIn's dot product.
    """
    results = _as_dict(results)
    query = torch.as_tensor(query).flatten()
    n_panels = len(results) + int(norm_panel)
    fig, axes = page_panels(n_panels, 4.5, 3.8, layout="constrained")
    pts = to_numpy(run.data.images)
    if norm_panel:
        first = dict([next(iter(results.items()))])
        influence_vs_norm(first, run, query, axes=[axes[-1]])
    for ax, (name, res) in zip(axes, results.items()):
        if res.scores.shape[0] != 1:
            raise ValueError(f"influence_2d draws one query; the {name} result has "
                             f"{res.scores.shape[0]}. Pass a result for that query alone.")
        s = to_numpy(res.scores[0])
        vmax = float(np.quantile(np.abs(s), 0.99)) or 1.0
        order = np.argsort(np.abs(s))  # strongest on top
        sc = ax.scatter(pts[order, 0], pts[order, 1], c=s[order], s=14, cmap=INFLUENCE_CMAP,
                        norm=TwoSlopeNorm(0.0, -vmax, vmax), edgecolor="none")
        top = to_numpy(res.proponents(k)[0]).astype(int)
        ax.scatter(pts[top, 0], pts[top, 1], s=60, facecolor="none", edgecolor="black", lw=1,
                   label=f"top-{k} proponents")
        ax.scatter([float(query[0])], [float(query[1])], marker="*", s=320, color="black",
                   edgecolor="white", lw=1.2, label="query", zorder=5)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.legend(fontsize=SMALL, loc="lower left")
        ax.set_title(f"{_label(name)}", fontsize=10, color=_color(name))
        cb = fig.colorbar(sc, ax=ax, shrink=0.8, extend="both")
        cb.set_label("influence on the query (clipped)", fontsize=SMALL)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def method_comparison(results, run, queries, query_indices=None, k: int = 5, query_names=None,
                      title: str | None = None, size: float = 1.0):
    """One row per query: the query, then each method's top-``k`` proponents side by side."""
    results = _as_dict(results)
    queries = torch.as_tensor(queries)
    rows = list(range(len(queries))) if query_indices is None else [int(q) for q in query_indices]
    names = _query_names(query_names, len(queries))
    fig, axes = _grid_figure(len(rows), [1] + [k] * len(results), size, title)
    for b, (name, res) in enumerate(results.items()):
        top, t_dom = res.proponents(k), caption_timesteps(res, run)
        for r, q in enumerate(rows):
            if b == 0:
                image_grid(queries[q:q + 1], [names[q]], axes=axes[r][0])
                _frame(axes[r][0][0], "black", 1.5)
            caps = [_caption(run, int(i), float(res.scores[q, i]), t_dom[i]) for i in top[q]]
            image_grid(run.data.images[top[q]], caps, axes=axes[r][1 + b])
            for ax in axes[r][1 + b]:
                _frame(ax, _color(name), 1.2)
        _header(fig, axes[0][1 + b][0], axes[0][1 + b][-1], f"{_label(name)}: top-{k}", _color(name))
    _header(fig, axes[0][0][0], axes[0][0][0], "query")
    return fig


def metric_bars(table, metrics_to_show, title: str | None = None):
    """Small bar charts of chosen rows of a ``metrics.MetricTable``, one panel per metric."""
    fig, axes = page_panels(len(metrics_to_show), 2.25, 3.0, layout="constrained")
    for ax, metric in zip(axes, metrics_to_show):
        values = [table.value(metric, c) for c in table.columns]
        ax.bar(range(len(values)), values, color=[_color(c) for c in table.columns])
        ax.set_xticks(range(len(values)), [_label(c).replace("Diffusion-", "") for c in table.columns])
        for x, v in enumerate(values):
            ax.text(x, v, f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}", ha="center",
                    va="bottom", fontsize=9)
        ax.set_title(textwrap.fill(table.row_name(metric), 22), fontsize=9)
        ax.margins(y=0.2)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def timestep_cosines(grads, timesteps, title: str | None = None, ax=None):
    """Cosine similarity between the query's averaged gradients at each pair of grid timesteps.

    ``grads`` [T', P] holds ``m_c(z, t)`` for each timestep of ``timesteps`` [T']. Where a block
    of timesteps is bright, their gradients point the same way: after ReTrac's per-timestep
    normalization that block outvotes the rest of the grid in the query vector.
    """
    g = torch.as_tensor(grads, dtype=torch.float64)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = to_numpy(g @ g.T)
    t = to_numpy(timesteps).astype(int)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.8, 4.0))
    fig = ax.figure
    im = ax.imshow(cos, cmap=INFLUENCE_CMAP, vmin=-1, vmax=1, origin="lower")
    ticks = np.linspace(0, len(t) - 1, min(len(t), 6)).round().astype(int)
    ax.set_xticks(ticks, t[ticks])
    ax.set_yticks(ticks, t[ticks])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep t'")
    fig.colorbar(im, ax=ax, shrink=0.85).set_label(r"cosine of $m_c(z,t)$ and $m_c(z,t')$",
                                                   fontsize=SMALL)
    ax.set_title(title or "Which timesteps' query gradients point the same way", fontsize=10)
    fig.tight_layout()
    return fig


def influence_vs_norm(results, run, query, title: str | None = None, axes=None):
    """Each training point's influence on one query against its training-gradient norm, per method.

    Norm on a log axis (mean over checkpoints), points coloured by distance to the query. When the
    spread of influence widens with the norm (a fan), the norm scales the scores, as in TracIn's
    dot product; a band of even width means the norm does not matter.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    results = _as_dict(results)
    query = torch.as_tensor(query).flatten()
    if axes is None:
        axes = page_panels(len(results), 4.5, 3.6, layout="constrained")[1]
    fig = axes[0].figure
    pts = to_numpy(run.data.images)
    dist = np.linalg.norm(pts - to_numpy(query)[None], axis=1)
    for ax, (name, res) in zip(axes, results.items()):
        norms = to_numpy(metrics.sample_norms(res.train_grad_norms, res.checkpoint_weights))
        sc = ax.scatter(norms, to_numpy(res.scores[0]), c=dist, s=10, cmap="viridis_r",
                        edgecolor="none")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(r"training-gradient norm $|g_c(x_i)|$ (mean over checkpoints)")
        ax.set_ylabel("influence on the query")
        ax.set_title(f"{_label(name)}: influence against norm", fontsize=10, color=_color(name))
        ax.grid(True, which="major", alpha=0.3)
        fig.colorbar(sc, ax=ax, shrink=0.8).set_label("distance to the query", fontsize=SMALL)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
