"""What the book measures about an attribution: generality, timestep bias, specificity (chapters 3-4).

Every function takes plain tensors: a score matrix ``scores`` [Q, N] (queries x training samples,
``AttributionResult.scores``) or the indices ``top`` [Q, k] of each query's top-k proponents
(``AttributionResult.proponents(k)`` or ``top_k`` below). ``summary`` and ``summary_table``
collect them for one or several results of ``rl.attribute`` into the table chapter 4 prints.

* Generality: ``appearance_counts``, ``distinct_proponents``, ``generally_influential``,
  ``pairwise_overlap``: do different queries get the same proponents?
* Timestep bias: ``proponent_timesteps``, ``dominant_timesteps``, ``norm_percentile``,
  ``norm_influence_correlation``: are proponents the samples with large training-gradient norms?
* Specificity: ``same_label_rate``, ``self_rank``: do proponents resemble the query?

It imports only ``validation`` and ``ranking`` (``top_k``, ``rank``, ``spearman``, which the core
uses too) from ``retrac_lib``: results and runs are read by attribute.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import validation
from ..ranking import rank, score_matrix, spearman, top_k

__all__ = [
    "top_k", "appearance_counts", "distinct_proponents", "generally_influential",
    "pairwise_overlap", "proponent_timesteps", "dominant_timesteps", "sample_norms",
    "norm_percentile", "rank", "spearman", "norm_influence_correlation", "same_label_rate",
    "self_rank", "summary", "MetricTable", "summary_table", "text_table",
]


# ---------------------------------------------------------------------------------------------
# argument checks


def _top(top, n_train: int | None = None) -> torch.Tensor:
    top = torch.as_tensor(top)
    if top.ndim != 2 or top.dtype.is_floating_point:
        raise ValueError(f"top must be a [queries, k] tensor of training indices (e.g. "
                         f"result.proponents(k)); got {tuple(top.shape)} of {top.dtype}. Pass "
                         "indices, not scores.")
    if top.numel() and top.min() < 0:
        raise ValueError(f"top holds a negative index ({int(top.min())}); indices count from 0.")
    if n_train is not None and top.numel() and top.max() >= n_train:
        raise ValueError(f"top holds index {int(top.max())} but there are only {n_train} "
                         "training samples.")
    for row in top:
        if len(set(row.tolist())) != len(row):
            raise ValueError("a row of top lists the same training sample twice; each row must "
                             "be one query's k distinct proponents.")
    return top.long()


def _per_sample(values, n_train: int, name: str) -> torch.Tensor:
    values = torch.as_tensor(values)
    if values.shape[-1] != n_train:
        raise ValueError(f"{name} has {values.shape[-1]} entries per row but there are {n_train} "
                         "training samples: pass one value per training sample, in index order.")
    return values


# ---------------------------------------------------------------------------------------------
# top-k and how general it is


def appearance_counts(top, n_train: int) -> torch.Tensor:
    """For every training sample [N]: in how many queries' top-k it appears (0 to Q)."""
    top = _top(top, n_train)
    return torch.bincount(top.flatten(), minlength=n_train)


def distinct_proponents(top) -> int:
    """The number of distinct training samples in the union of all queries' top-k.

    It lies between ``k`` (every query gets the same k proponents) and ``Q * k`` (no two queries
    share one); the larger, the more each query gets proponents of its own.
    Chapter 3, "The same faces come back?".
    """
    return len(torch.unique(_top(top)))


def generally_influential(top, share: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples in the top-k of at least ``share`` of all queries: ``(indices, counts)``.

    A training sample that is a top proponent of most queries, whatever they show, is
    "generally influential" (Xie et al. 2024). Returns the indices of those samples and the number
    of queries whose top-k each appears in, most frequent first (ties by index).
    Chapter 3, "The same faces come back?".
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be a fraction of the queries in (0, 1], got {share}.")
    top = _top(top)
    q = top.shape[0]
    values, counts = torch.unique(top.flatten(), return_counts=True)
    keep = counts >= share * q - 1e-9
    values, counts = values[keep], counts[keep]
    order = sorted(range(len(values)), key=lambda i: (-int(counts[i]), int(values[i])))
    return values[order], counts[order]


def pairwise_overlap(top) -> float:
    """Mean share of top-k proponents that two different queries have in common (0 to 1).

    Averaged over all pairs of distinct queries: ``|top(a) & top(b)| / k``. 1 when every query
    has the same proponents; near ``k / N`` for random ones.
    Chapter 3, "The same faces come back?".
    """
    top = _top(top)
    q, k = top.shape
    if q < 2:
        raise ValueError("pairwise_overlap needs at least two queries.")
    n = int(top.max()) + 1
    member = torch.zeros(q, n)
    member[torch.arange(q)[:, None], top] = 1.0
    shared = member @ member.T
    off = ~torch.eye(q, dtype=torch.bool)
    return float(shared[off].mean() / k)


# ---------------------------------------------------------------------------------------------
# timestep bias


def proponent_timesteps(top, recorded_t) -> tuple[torch.Tensor, torch.Tensor]:
    """Recorded training timesteps of the top-k proponents, against those of the whole training set.

    ``recorded_t`` is [N] (one checkpoint) or [C, N] (the timestep every sample was last trained
    at before each checkpoint, ``run.recorded(c)[0]``). Returns ``(proponents, everyone)``: the
    flattened timesteps of every (query, proponent, checkpoint) and of every (sample, checkpoint).
    The training timesteps are uniform by construction, so any tilt in the first is selection.
    Chapter 3, "Why these digits: they were trained at large-norm timesteps".
    """
    recorded_t = torch.as_tensor(recorded_t)
    recorded_t = recorded_t[None] if recorded_t.ndim == 1 else recorded_t
    top = _top(top, recorded_t.shape[-1])
    return recorded_t[:, top].flatten(), recorded_t.flatten()


def sample_norms(train_grad_norms, weights=None) -> torch.Tensor:
    """One training-gradient norm per sample [N]: ``|g_c(x_i)|`` averaged over checkpoints.

    ``train_grad_norms`` is ``AttributionResult.train_grad_norms`` [C, N]; with checkpoint
    ``weights`` [C] (``result.checkpoint_weights``) the average is weighted by them, the scale
    each checkpoint's term has in TracIn's sum.
    """
    norms = torch.as_tensor(train_grad_norms, dtype=torch.float64)
    norms = norms[None] if norms.ndim == 1 else norms
    if weights is None:
        return norms.mean(0)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if len(w) != norms.shape[0]:
        raise ValueError(f"{len(w)} checkpoint weights for {norms.shape[0]} checkpoints of norms.")
    return (w[:, None] * norms).sum(0) / w.sum()


def dominant_timesteps(recorded_t, train_grad_norms, weights=None) -> torch.Tensor:
    """For each sample [N]: its recorded timestep at the checkpoint where ``w_c |g_c(x_i)|`` is largest.

    TracIn sums ``w_c <g_c(x_i), v_c>`` over checkpoints; the term with the largest norm tends to
    dominate, so this is the timestep a sample's TracIn score mostly comes from. The figures use
    it to caption proponents.
    """
    t = torch.as_tensor(recorded_t)
    norms = torch.as_tensor(train_grad_norms, dtype=torch.float64)
    t, norms = (t[None] if t.ndim == 1 else t), (norms[None] if norms.ndim == 1 else norms)
    if t.shape != norms.shape:
        raise ValueError(f"recorded_t {tuple(t.shape)} and train_grad_norms {tuple(norms.shape)} "
                         "must both be [checkpoints, training samples].")
    if weights is not None:
        norms = norms * torch.as_tensor(weights, dtype=torch.float64).flatten()[:, None]
    return t.gather(0, norms.argmax(0, keepdim=True))[0]


def norm_percentile(top, norms) -> float:
    """Mean percentile (0 to 1) of the top-k proponents' gradient norm within the training set.

    ``norms`` [N] is one norm per sample (``sample_norms``). 0.5 means proponents have typical
    norms; near 1, proponents are the largest-norm samples, whatever the query.
    Chapter 3, "Why these digits: they were trained at large-norm timesteps".
    """
    norms = torch.as_tensor(norms, dtype=torch.float64)
    top = _top(top, len(norms))
    pct = (rank(norms) - 1) / max(len(norms) - 1, 1)
    return float(pct[top].mean())


def norm_influence_correlation(scores, norms, absolute: bool = True) -> float:
    """Spearman correlation of influence with training-gradient norm, per query, averaged.

    ``scores`` [Q, N], ``norms`` [N] (``sample_norms``). With ``absolute`` (default) the size
    ``|I(x_i, z)|`` is correlated: a large norm makes a sample a strong proponent *or* a strong
    opponent, so the signed score can hide the effect. 1 means the ranking of samples by
    influence strength is the ranking by norm, whatever the query; near 0 means no relation.
    Chapter 3, "Why these digits: they were trained at large-norm timesteps".
    """
    scores = score_matrix(scores)
    norms = _per_sample(norms, scores.shape[1], "norms")
    values = scores.abs() if absolute else scores
    return float(spearman(values, norms.expand_as(values)).mean())


# ---------------------------------------------------------------------------------------------
# specificity


def same_label_rate(top, train_labels, query_labels) -> float:
    """Share of top-k proponents whose label equals their query's label (0 to 1).

    Over all queries and all k proponents. Chance level is the share of training samples with
    the query's label (about 0.1 for the ten digit classes).
    Chapter 3, "The same faces come back?".
    """
    train_labels = torch.as_tensor(train_labels)
    top = _top(top, len(train_labels))
    query_labels = torch.as_tensor(query_labels).flatten()
    if len(query_labels) != top.shape[0]:
        raise ValueError(f"{len(query_labels)} query labels for {top.shape[0]} queries: pass one "
                         "label per query, in the order of the score rows.")
    return float((train_labels[top] == query_labels[:, None]).double().mean())


def self_rank(scores, query_train_indices) -> torch.Tensor:
    """Rank [Q] of each query's own training sample in its attribution (1 = top proponent).

    For queries that *are* training samples: row q of ``scores`` attributes training sample
    ``query_train_indices[q]``. The rank is 1 + the number of samples scoring strictly higher.
    Chapter 3, "Generated and training images as queries".
    """
    scores = score_matrix(scores)
    idx = validation.indices(query_train_indices, scores.shape[1], "query_train_indices")
    if len(idx) != scores.shape[0]:
        raise ValueError(f"{len(idx)} training indices for {scores.shape[0]} queries: pass the "
                         "training index of each query, in the order of the score rows.")
    own = scores.gather(1, idx[:, None])
    return 1 + (scores > own).sum(1)


# ---------------------------------------------------------------------------------------------
# the chapter 4 table


def summary(result, run, query_labels=None, k: int = 10, share: float = 0.5,
            self_scores=None, self_indices=None) -> dict[str, float]:
    """Every metric of this module for one ``AttributionResult`` on ``run``, as name -> value.

    ``result`` attributes held-out queries with labels ``query_labels`` (optional). The
    self-rank needs scores [S, N] (a tensor, or a result with ``.scores``) of queries that are
    the training samples ``self_indices``. Timesteps and norms are those of the checkpoints the
    result used; the recorded timesteps pool every (proponent, checkpoint) pair.
    Chapter 4, "Every metric, both methods".
    """
    if not len(result.checkpoint_weights):
        raise ValueError(f"summary needs a gradient-based result with checkpoints; the "
                         f"{result.config.method!r} baseline has none (no timesteps or norms).")
    n = len(run.data.labels)
    top = result.proponents(k)
    recorded = result.recorded_timesteps(run)
    norms = sample_norms(result.train_grad_norms, result.checkpoint_weights)
    t_prop, t_all = proponent_timesteps(top, recorded)
    q = top.shape[0]
    out = {
        "queries": q,
        f"distinct top-{k} proponents (of {q * k})": distinct_proponents(top),
        f"samples in top-{k} of >= {share:.0%} of queries": len(generally_influential(top, share)[0]),
        f"most top-{k} lists one sample is in": int(appearance_counts(top, n).max()),
        f"mean top-{k} overlap of two queries": pairwise_overlap(top) if q > 1 else float("nan"),
        "median recorded t of proponents": float(t_prop.double().median()),
        "median recorded t of all samples": float(t_all.double().median()),
        "share of proponents with t < 100": float((t_prop < 100).double().mean()),
        "share of all samples with t < 100": float((t_all < 100).double().mean()),
        "norm percentile of proponents": norm_percentile(top, norms),
        "rank corr. |influence| vs norm": norm_influence_correlation(result.scores, norms),
    }
    if query_labels is not None:
        out[f"same-label rate of top-{k}"] = same_label_rate(top, run.data.labels, query_labels)
    if self_scores is not None:
        ranks = self_rank(getattr(self_scores, "scores", self_scores), self_indices)
        out["median self-rank (1 = top)"] = float(ranks.double().median())
    return out


@dataclasses.dataclass
class MetricTable:
    """Rows of (metric, value per method); ``print(table)`` shows an aligned text table."""

    columns: list[str]
    rows: list[tuple[str, list[float]]]

    def row_name(self, metric: str) -> str:
        """The full name of the row ``metric`` names exactly or by a unique start."""
        names = [name for name, _ in self.rows if name == metric] or \
                [name for name, _ in self.rows if name.startswith(metric)]
        if len(names) != 1:
            raise KeyError(f"{metric!r} matches {len(names)} rows; rows: {[r for r, _ in self.rows]}")
        return names[0]

    def value(self, metric: str, column: str) -> float:
        """The value of ``metric`` (a row name, or a unique start of one) for ``column``."""
        if column not in self.columns:
            raise KeyError(f"no column {column!r}; columns: {self.columns}")
        return dict(self.rows)[self.row_name(metric)][self.columns.index(column)]

    def transpose(self, metrics: dict[str, str] | None = None) -> "MetricTable":
        """Columns become rows: one row per column of this table (e.g. per method or variant).

        ``metrics`` maps short column titles to row names (or unique starts of them) to keep;
        by default every row is kept under its full name.
        """
        metrics = metrics or {name: name for name, _ in self.rows}
        picked = {short: dict(self.rows)[self.row_name(m)] for short, m in metrics.items()}
        return MetricTable(list(picked), [(c, [picked[s][j] for s in picked])
                                          for j, c in enumerate(self.columns)])

    def __str__(self) -> str:
        def fmt(v):
            if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
                return f"{int(v)}"
            return "n/a" if v != v else f"{v:.2f}"

        return text_table(["metric", *self.columns],
                          [[name] + [fmt(v) for v in values] for name, values in self.rows])


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """An aligned text table of strings: the first column left-aligned, the others right-aligned,
    a line of dashes under the ``header``."""
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(row):
        return "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_table(results, run, query_labels=None, k: int = 10, share: float = 0.5,
                  self_scores=None, self_indices=None) -> MetricTable:
    """``summary`` for each of several results, side by side: the table chapter 4 prints.

    ``results`` maps a column name ("tracin", "retrac", ...) to an ``AttributionResult`` (a single
    result becomes one column, "score"); ``self_scores`` maps the same names to scores [S, N] (or
    results) of the training samples ``self_indices`` used as queries.
    """
    if not isinstance(results, dict):
        results = {"score": results}
        self_scores = None if self_scores is None else {"score": self_scores}
    if self_scores is not None and set(self_scores) != set(results):
        raise ValueError(f"self_scores has columns {sorted(self_scores)} but results has "
                         f"{sorted(results)}; give self-attribution scores for every method.")
    sums = {name: summary(res, run, query_labels, k, share,
                          None if self_scores is None else self_scores[name], self_indices)
            for name, res in results.items()}
    names = list(next(iter(sums.values())))
    return MetricTable(list(results), [(m, [sums[c][m] for c in results]) for m in names])
