"""The query-grid figure of section 4.10 labels every point, and no two labels overlap."""
import itertools

import matplotlib

matplotlib.use("Agg")

from retrac_lib.book.plots import recipes as rplots

# Values shaped like the full-quality build's: several grids per x, overlaps within 0.03 of each other.
GRIDS = {(10, 16): (0.45, 0.60, 1.50, 1.70), (25, 8): (0.75, 0.79, 1.55, 1.83), (100, 2): (0.87, 0.82, 1.56, 2.03),
         (25, 16): (0.73, 0.76, 2.07, 2.48), (100, 8): (0.93, 0.85, 3.02, 4.20), (50, 16): (0.91, 0.87, 3.01, 4.00),
         (100, 16): (1.0, 1.0, 4.9, 6.1)}


def _rows():
    return [dict(method=method, timesteps=t, n_noise=k, spearman=0.95, overlap=values[i], seconds=values[2 + i])
            for i, method in enumerate(("tracin", "retrac")) for (t, k), values in GRIDS.items()]


def test_every_point_is_labelled_once_and_no_labels_overlap():
    fig = rplots.grid_cost(_rows())
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        texts = [t for t in ax.texts]
        assert sorted(t.get_text() for t in texts) == sorted(f"{t}x{k}" for t, k in GRIDS for _ in range(2))
        boxes = [t.get_window_extent(renderer) for t in texts]
        for (a, ta), (b, tb) in itertools.combinations(zip(boxes, texts), 2):
            assert not a.overlaps(b), f"labels {ta.get_text()!r} and {tb.get_text()!r} overlap"
