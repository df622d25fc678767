"""Ranks of scores, which the core reads and the book measures: top-k, ranks, Spearman.

``AttributionResult.proponents`` and ``diagnostics`` use these; ``evaluation.metrics`` builds
what the book reports on them. Plain tensors in, plain tensors out; no ``retrac_lib`` imports.
"""
from __future__ import annotations

import torch

__all__ = ["score_matrix", "top_k", "rank", "spearman"]


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


def rank(values) -> torch.Tensor:
    """Ranks 1..n along the last dimension (1 = smallest), ties sharing their average rank."""
    values = torch.as_tensor(values, dtype=torch.float64)
    order = values.argsort(dim=-1)
    sorted_v = values.gather(-1, order)
    first = torch.ones_like(sorted_v, dtype=torch.bool)
    first[..., 1:] = sorted_v[..., 1:] != sorted_v[..., :-1]
    group = first.cumsum(-1) - 1                                   # tie-group id of each position
    pos = torch.arange(1, values.shape[-1] + 1, dtype=torch.float64).expand_as(values)
    n_groups = values.shape[-1]
    total = torch.zeros(*values.shape[:-1], n_groups, dtype=torch.float64)
    total = total.scatter_add_(-1, group, pos)
    count = torch.zeros_like(total).scatter_add_(-1, group, torch.ones_like(pos))
    avg = total.gather(-1, group) / count.gather(-1, group)
    return torch.empty_like(avg).scatter_(-1, order, avg)


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
    denom = (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-300)
    return (ra * rb).sum(-1) / denom
