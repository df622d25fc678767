"""Ranks of scores, which the core reads and the book measures: top-k, ranks, Spearman, the
overlap of two rankings' top-k.

``AttributionResult.proponents`` and ``diagnostics`` use these; ``evaluation.metrics`` builds
what the book reports on them. Plain tensors in, plain tensors out; no ``retrac_lib`` imports.
"""
from __future__ import annotations

import torch
from scipy.stats import rankdata

__all__ = ["score_matrix", "top_k", "top_k_overlap", "rank", "spearman"]


def score_matrix(scores, name: str = "scores") -> torch.Tensor:
    """``scores`` as a tensor, refused unless a [queries, training samples] matrix."""
    scores = torch.as_tensor(scores)
    if scores.ndim != 2:
        raise ValueError(f"{name} must be a [queries, training samples] matrix; got shape "
                         f"{tuple(scores.shape)}.")
    return scores


def top_k(scores, k: int, largest: bool = True) -> torch.Tensor:
    """Indices [Q, k] of each query's ``k`` highest (``largest``) or lowest scoring samples.

    The same as ``AttributionResult.proponents(k)`` / ``.opponents(k)``, for a bare matrix.
    """
    scores = score_matrix(scores)
    n = scores.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must lie between 1 and the number of training samples ({n}).")
    return scores.topk(k, dim=1, largest=largest).indices


def top_k_overlap(a, b, k: int = 10) -> torch.Tensor:
    """Share [Q] of each query's top-``k`` samples under scores ``a`` [Q, N] that are also in
    its top-``k`` under ``b`` (``k`` at most N)."""
    a, b = score_matrix(a, "a"), score_matrix(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same queries and samples; got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}.")
    k = min(k, a.shape[1])
    ta, tb = top_k(a, k), top_k(b, k)
    return (ta[:, :, None] == tb[:, None, :]).any(-1).double().mean(-1)


def rank(values) -> torch.Tensor:
    """Ranks 1..n along the last dimension (1 = smallest), ties sharing their average rank
    (SciPy's ``rankdata``)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return torch.from_numpy(rankdata(values.detach().cpu().numpy(), axis=-1))


def spearman(a, b) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with ``b`` (the same row, or one shared row).

    For two 1-D sequences, e.g. timesteps and gradient norms, ``float(spearman(t, norms))`` is
    the single number chapter 2 reports (negative: norms are larger at small t).
    """
    ra, rb = rank(a), rank(b)
    if ra.shape[-1] != rb.shape[-1]:
        raise ValueError(f"spearman needs sequences of equal length; got {ra.shape[-1]} and "
                         f"{rb.shape[-1]}.")
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    # one square root of the product, so equal (or reversed) rankings give exactly +1 (-1);
    # a constant side (no ranking) gives 0
    denom = ((ra * ra).sum(-1) * (rb * rb).sum(-1)).sqrt().clamp_min(1e-300)
    return (ra * rb).sum(-1) / denom
