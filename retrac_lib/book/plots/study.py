"""Figures of the scale ladder's stored results (chapter 9): each method's same-label rate,
self-influence AUC of the planted minority, LDS and removal test, rung by rung, with their
intervals."""
from __future__ import annotations

from . import METHOD_COLORS, METHOD_LABELS, SMALL, page_panels

PANELS = (   # (part, title, x-axis label, reference line)
    ("attribution", "same-label rate\nof the top 10", "share of proponents", None),
    ("self_influence", "self-influence AUC\nof the planted zeros", "AUC (0.5: chance)", 0.5),
    ("lds", "LDS\n(mean over queries)", "Spearman correlation", 0.0),
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
    return m["mean"], m["mean"] - m["sem"], m["mean"] + m["sem"]


def ladder_methods(measurements: dict[str, dict], methods) -> object:
    """One panel per measure (``PANELS``): a row of ``methods`` per rung (``measurements``
    maps a rung name to its stored measurements), a dot at the value and a bar for its
    interval (bootstrap for the AUC, +-1 standard error for the LDS, the paired bootstrap
    interval against random removal for the removal test's loss rise). A measure a rung has
    not measured yet is left out of that rung's row and said in the panel."""
    fig, axes = page_panels(len(PANELS), 2.2, 0.55 + 0.42 * len(measurements) * len(methods))
    rows = [(rung, m) for rung in measurements for m in methods]
    for ax, (part, title, xlabel, reference) in zip(axes, PANELS):
        missing = [rung for rung in measurements if part not in measurements[rung]]
        for y, (rung, method) in enumerate(rows):
            value = _value(measurements[rung], part, method)
            if value is None:
                continue
            v, lo, hi = value
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
