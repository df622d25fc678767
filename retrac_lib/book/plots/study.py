"""Figures of the scale ladder's stored results (chapter 9): each method's same-label rate,
self-influence AUC of the planted minority, LDS and removal test, rung by rung, with their
intervals; and the generated images each rung keeps, with the classifier's labels."""
from __future__ import annotations

import matplotlib.pyplot as plt

from . import METHOD_COLORS, METHOD_LABELS, PAGE_WIDTH, SMALL, image_grid, page_panels

MINORITY_COLOR = "#d62728"   # a minority-like generated image
NORMAL_95 = 1.96   # standard errors either side of a mean that hold 95 % (normal)

PANELS = (   # (part, title, x-axis label, reference line)
    ("attribution", "same-label rate\nof the top 10", "share of proponents", None),
    ("self_influence", "self-influence AUC\nof the planted zeros", "AUC (0.5: chance)", 0.5),
    ("lds", "LDS\n(mean over queries)", "LDS (a Spearman correlation)", 0.0),
    ("removal", "removal: loss rise\nbeyond random", "percentage points", 0.0),
)


def _value(measurements: dict, part: str, method: str) -> tuple[float, float, float] | None:
    """(value, low, high) of ``method`` in ``part`` of one rung's measurements, or None."""
    if part not in measurements:
        return None
    if part == "attribution":
        v = measurements[part][method]["same_label_top10"]
        return v, v, v
    if part == "self_influence":
        m = measurements[part][method]
        return m["auc"], *m["auc_interval"]
    if part == "removal":
        m = measurements[part]["paired_pct"][f"{method}-random"]
        return m["mean"], m["low"], m["high"]
    m = measurements[part]["per_method"][method]
    half = NORMAL_95 * m["sem"]
    return m["mean"], m["mean"] - half, m["mean"] + half


def ladder_methods(measurements: dict[str, dict], methods) -> object:
    """One panel per measure (``PANELS``): a row of ``methods`` per rung (``measurements``
    maps a rung name to its stored measurements), a dot at the value and a bar for its
    95 % interval (bootstrap for the AUC, the normal one, +-1.96 standard errors over
    queries, for the LDS, the paired bootstrap interval against random removal for the
    removal test's loss rise; none for the same-label rate, stored without its per-query
    rates). A measure a rung has not measured yet is left out of that rung's row and said in
    the panel."""
    fig, axes = page_panels(len(PANELS), 2.2, 0.55 + 0.42 * len(measurements) * len(methods))
    rows = [(rung, m) for rung in measurements for m in methods]
    for ax, (part, title, xlabel, reference) in zip(axes, PANELS):
        missing = [rung for rung in measurements if part not in measurements[rung]]
        for y, (rung, method) in enumerate(rows):
            value = _value(measurements[rung], part, method)
            if value is None:
                continue
            v, lo, hi = value
            if hi > lo:
                ax.plot([lo, hi], [y, y], color=METHOD_COLORS[method], lw=2)
            ax.plot(v, y, "o", color=METHOD_COLORS[method], ms=5)
        if reference is not None:
            ax.axvline(reference, color="grey", lw=0.8, ls=":")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([f"{rung}: {METHOD_LABELS[m]}" for rung, m in rows], fontsize=SMALL)
        ax.invert_yaxis()
        pending = f"\n(not yet measured:\n{', '.join(missing)})" if missing else ""
        ax.set_title(title + pending, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=SMALL)
        ax.tick_params(axis="x", labelsize=SMALL)
    for ax in axes:
        if not ax.get_subplotspec().is_first_col():
            ax.set_yticklabels([])
    fig.tight_layout()
    return fig


def generated_by_rung(samples: dict, n: int = 16):
    """A row of the first ``n`` kept generated images per rung (``samples`` maps a rung name
    to its ``study.StoredSamples``), each captioned with the classifier's label: plain for a
    recognizable image (as close to a training image as real digits are), in parentheses
    for one farther from every training image, in red for a minority-like one (recognizable,
    its nearest training image a planted minority one)."""
    tile = PAGE_WIDTH / n
    fig, axes = plt.subplots(len(samples), n, squeeze=False,
                             figsize=(PAGE_WIDTH, tile * 1.3 * len(samples) + 0.2))
    for row, (rung, kept) in zip(axes, samples.items()):
        m = min(n, len(kept.images))
        captions = [f"{int(c)}" if ok else f"({int(c)})"
                    for c, ok in zip(kept.classifier_label[:m], kept.recognizable[:m])]
        image_grid(kept.images[:m], captions, axes=list(row))
        for ax, like in zip(row, kept.minority_like[:m]):
            if like:
                ax.title.set_color(MINORITY_COLOR)
                ax.title.set_fontweight("bold")
        row[0].set_ylabel(rung, fontsize=SMALL, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.3, w_pad=0.1, h_pad=0.3)
    return fig
