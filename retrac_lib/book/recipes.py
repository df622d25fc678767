"""The paper's recipe beside the book's (``notebooks/04b_recipes.ipynb``, a section of chapter 4).

Small measurements that compare two rankings or two training runs: how well two score matrices
agree, and how strongly the per-sample gradient norm depends on the timestep in a run.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import diagnostics
from ..evaluation import metrics
from ..ranking import spearman, top_k_overlap


@dataclasses.dataclass(frozen=True)
class Agreement:
    """How two score matrices [Q, N] of the same queries rank the training samples."""

    spearman: torch.Tensor       # [Q] rank correlation of each query's scores
    top_overlap: torch.Tensor    # [Q] share of the top-k proponents both rankings hold
    k: int

    @property
    def mean_spearman(self) -> float:
        return float(self.spearman.mean())

    @property
    def mean_overlap(self) -> float:
        return float(self.top_overlap.mean())


def agreement(a, b, k: int = 10) -> Agreement:
    """Per-query Spearman correlation and top-``k`` overlap of two score matrices [Q, N]."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"agreement needs two score matrices of the same shape [Q, N]; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}.")
    return Agreement(spearman(a, b), top_k_overlap(a, b, k), k)


@dataclasses.dataclass(frozen=True)
class RunBias:
    """The timestep bias of one run at one checkpoint, and how the norm relates to the loss."""

    summary: diagnostics.BiasSummary
    loss_norm_spearman: float     # rank correlation of per-sample loss and gradient norm

    @property
    def decile_ratio(self) -> float:
        return self.summary.decile_ratio

    @property
    def spearman(self) -> float:
        return self.summary.spearman


def run_bias(run, checkpoint: int = -1) -> RunBias:
    """Gradient norms of every training sample at its recorded timestep and noise (the run's own
    loss), reduced to the decile ratio, Spearman(t, norm) and Spearman(loss, norm)."""
    record = diagnostics.recorded_norms(run, checkpoint)
    summary = diagnostics.summarize(record, num_train_timesteps=run.config.num_train_timesteps)
    return RunBias(summary, float(metrics.spearman(record.losses, record.norms)))
