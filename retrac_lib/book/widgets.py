"""Interactive explorers for the notebooks (need a running Jupyter kernel).

A slider never stands alone: each explorer here has a static figure in ``retrac_lib.book.plots``
that shows the same thing for a few fixed choices, because the rendered book has no kernel.
Importing this module needs neither a display nor a kernel; ipywidgets is imported on use.

Each explorer shows its figure as PNG bytes in an ``ipywidgets.Image``, not through an
``Output`` widget: a notebook executor (nbclient, under nbmake and the book's build) mirrors
an Output widget by sending messages to the kernel on the channel where it awaits the cell's
reply, and a lost wake-up there has held a build for the whole cell timeout.

* ``TimestepExplorer`` (chapter 2): pick a training sample and a checkpoint, see that sample's
  gradient norm across the timestep grid. Static counterpart: ``plots.bias.small_multiples``.
"""
from __future__ import annotations

import io

import matplotlib.pyplot as plt

from .. import diagnostics
from .plots import log_axis

__all__ = ["TimestepExplorer", "attribution_explorer"]


def _png(fig, dpi: int = 100) -> bytes:
    """``fig`` as PNG bytes for an ``ipywidgets.Image``; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


class TimestepExplorer:
    """Sample slider + checkpoint dropdown, redrawing the sample's gradient norm against t.

    Curves are computed on demand with ``diagnostics.sweep_run`` (one per sample and checkpoint,
    cached), with the same seeded noise as the static figure, so the two agree. Curves of the
    same sample at other checkpoints already visited are drawn faintly for comparison.

        explorer = TimestepExplorer(run, timesteps=50)
        explorer            # displays the controls and the plot in Jupyter
    """

    def __init__(self, run, timesteps=50, n_noise: int = 1, seed: int = 0, loss: str | None = None,
                 sample: int = 0, checkpoint=-1, chunk_size: int = 64):
        import ipywidgets as W

        self.run = run
        self.options = dict(timesteps=timesteps, n_noise=n_noise, seed=seed, loss=loss,
                            chunk_size=chunk_size)
        keys = diagnostics.checkpoint_keys(run)
        self._labels = {k: diagnostics.checkpoint_label(run, k) for k in keys}
        start = run.checkpoint_index(checkpoint, allow_init=True)
        if not 0 <= sample < len(run.data):
            raise ValueError(f"sample {sample} is not a training index (0..{len(run.data) - 1}).")
        self.sample = W.IntSlider(value=sample, min=0, max=len(run.data) - 1, description="sample",
                                  continuous_update=False)
        self.checkpoint = W.Dropdown(options=[(self._labels[k], k) for k in keys], value=start,
                                     description="checkpoint")
        self.image = W.Image(format="png")
        self.widget = W.VBox([W.HBox([self.sample, self.checkpoint]), self.image])
        self._curves: dict = {}
        self.figure = None
        self.sample.observe(self._changed, names="value")
        self.checkpoint.observe(self._changed, names="value")
        self.redraw()

    def curve(self, index: int, checkpoint):
        """The ``Sweep`` of training sample ``index`` at ``checkpoint`` (computed once)."""
        key = (int(index), checkpoint)
        if key not in self._curves:
            self._curves[key] = diagnostics.sweep_run(self.run, [index], checkpoint, **self.options)
        return self._curves[key]

    def _changed(self, _change):
        self.redraw()

    def redraw(self):
        """Recompute (if needed) and redraw the plot for the current slider and dropdown."""
        i, c = int(self.sample.value), self.checkpoint.value
        current = self.curve(i, c)
        seen = [self._curves[(i, k)] for k in self._labels if (i, k) in self._curves and k != c]
        self.figure = self._draw(i, current, seen)
        self.image.value = _png(self.figure)

    def _draw(self, i, current, seen):
        data = self.run.data
        fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(8.5, 3.4), gridspec_kw={"width_ratios": [1, 3]})
        if data.is_image:
            ax_img.imshow(data.images[i, 0].numpy(), cmap="gray_r", vmin=-1, vmax=1)
            ax_img.set_xticks([]), ax_img.set_yticks([])
        else:
            pts = data.images.numpy()
            ax_img.scatter(pts[:, 0], pts[:, 1], s=3, color="#bbbbbb")
            ax_img.scatter(pts[i, 0], pts[i, 1], s=60, color="black", marker="x")
            ax_img.set_aspect("equal")
        ax_img.set_title(f"sample #{i}, label {int(data.labels[i])}", fontsize=9)
        for sw in seen:
            ax.plot(sw.timesteps.numpy(), sw.mean_norms[0].numpy(), color="#bbbbbb", lw=1,
                    label=f"{sw.label} (visited)")
        ax.plot(current.timesteps.numpy(), current.mean_norms[0].numpy(), color="black", lw=2,
                label=current.label)
        log_axis(ax)
        ax.set_xlabel("timestep t")
        ax.set_ylabel("gradient norm |g|")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
        swing = current.swing()[0].item()
        ax.set_title(f"{current.label}: largest / smallest norm along t = {swing:.1f}x", fontsize=9)
        fig.tight_layout()
        return fig

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def attribution_explorer(results, run, queries, query_names=None, k: int = 8, max_k: int = 20,
                         opponents: bool = False):
    """Pick a query, a method and k; see that query's top-k proponents (chapter 4).

    ``results`` maps method names ("tracin", "retrac") to precomputed ``AttributionResult``s for
    the same ``queries`` [Q, *sample]: switching redraws from their scores, nothing is recomputed.
    Captions show the training index, label, dominant recorded timestep and score, as in
    ``plots.attribution.proponent_grid``. Static counterpart: ``plots.attribution.method_comparison``.

    Returns the ``ipywidgets.VBox`` to display, with its controls as attributes: ``.query``
    (Dropdown), ``.method`` (ToggleButtons), ``.k`` (IntSlider), ``.image`` (the figure as an
    ``ipywidgets.Image``), ``.redraw()`` and ``.figure`` (the last figure drawn).

        widgets.attribution_explorer({"tracin": res_t, "retrac": res_r}, run, queries)
    """
    import ipywidgets as W

    from .plots import METHOD_LABELS
    from .plots import attribution as aplots

    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a non-empty dict {method name: AttributionResult}.")
    n_queries, n_train = len(queries), len(run.data)
    for name, res in results.items():
        if tuple(res.scores.shape) != (n_queries, n_train):
            raise ValueError(f"the {name!r} result has scores of shape {tuple(res.scores.shape)}; "
                             f"expected [{n_queries} queries, {n_train} training samples] for "
                             "these queries on this run.")
    if not 1 <= k <= max_k <= n_train:
        raise ValueError(f"need 1 <= k ({k}) <= max_k ({max_k}) <= training samples ({n_train}).")
    names = list(query_names) if query_names is not None else [f"query {q}" for q in range(n_queries)]
    if len(names) != n_queries:
        raise ValueError(f"{len(names)} query names for {n_queries} queries.")

    query = W.Dropdown(options=[(n, q) for q, n in enumerate(names)], value=0, description="query")
    method = W.ToggleButtons(options=[(METHOD_LABELS.get(m, m), m) for m in results],
                             value=next(iter(results)), description="method")
    k_slider = W.IntSlider(value=k, min=1, max=max_k, description="k", continuous_update=False)
    image = W.Image(format="png")
    box = W.VBox([W.HBox([query, k_slider]), method, image])

    def redraw(_change=None):
        q, m, kk = int(query.value), method.value, int(k_slider.value)
        fig = aplots.proponent_grid(results[m], run, queries, [q], k=kk, opponents=opponents,
                                    query_names=names,
                                    title=f"{METHOD_LABELS.get(m, m)}: top-{kk} proponents of {names[q]}")
        box.figure, image.value = fig, _png(fig)

    for control in (query, method, k_slider):
        control.observe(redraw, names="value")
    box.query, box.method, box.k, box.image, box.redraw = query, method, k_slider, image, redraw
    redraw()
    return box


__all__ += ["attribution_explorer"]
