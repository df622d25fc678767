"""Gradient engines: three ways to get the two quantities a score needs from groups of draws.

An engine is bound to one model, its noise scheduler and the loss, and answers two questions
about groups of noised draws (``x`` [G, M, *sample], ``t`` [G, M], ``noise`` [G, M, *sample];
``m_g`` is the gradient of group ``g``'s mean loss):

* ``query_sum``: ``sum_g a_g m_g`` [P] with weights ``a = weights_of(|m|)``, and the norms [G];
* ``training_terms``: the norms ``|m_g|`` [G] and the dot products ``<vectors, m_g>`` [Q, G];

and a row engine also gives the rows themselves (``rows`` [G, P], for sketches). Engines:

* ``"func"``: rows from ``torch.func`` (``grads.grouped_grads``; chapter 2's recipe);
* ``"ghost"``: norms and dot products from layer factors, no row formed (``ghost``, chapter 7);
* ``"loop"``: one plain autograd backward pass per draw (``grads.per_sample_grads_loop``), the
  slow reference the tests hold the others to.

All three give the same numbers to float32 rounding.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from .. import ghost, validation
from ..grads import grouped_grads, per_sample_grads_loop
from .options import ENGINES


class Engine(Protocol):
    """A gradient engine bound to ``model``, ``scheduler`` and ``loss``."""

    name: str

    def query_sum(self, x, t, noise, weights_of, chunk_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum_g a_g m_g [P], |m_g| [G])`` with ``a = weights_of(|m|)``."""

    def training_terms(self, x, t, noise, vectors: torch.Tensor, chunk_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(|m_g| [G], <vectors, m_g> [Q, G])``."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Bound:
    model: torch.nn.Module
    scheduler: object
    loss: str = "mse"


class _RowEngine(_Bound):
    """An engine that forms each group's gradient row and takes norms and dots from it."""

    name = ""

    def rows(self, x, t, noise, chunk_size: int) -> torch.Tensor:
        raise NotImplementedError

    def query_sum(self, x, t, noise, weights_of, chunk_size):
        rows = self.rows(x, t, noise, chunk_size)
        norms = rows.norm(dim=1)
        return weights_of(norms) @ rows, norms

    def training_terms(self, x, t, noise, vectors, chunk_size):
        rows = self.rows(x, t, noise, chunk_size)
        return rows.norm(dim=1), vectors.to(rows) @ rows.T


class FuncEngine(_RowEngine):
    """Rows from ``torch.func``: ``vmap(grad(...))`` over groups, or one batched backward pass
    for a group that fills a chunk (``grads.grouped_grads``)."""

    name = "func"

    def rows(self, x, t, noise, chunk_size):
        return grouped_grads(self.model, self.scheduler, x, t, noise, self.loss, chunk_size)


class LoopEngine(_RowEngine):
    """Rows from one plain backward pass per draw, averaged over each group (slow, obviously
    right: the reference the tests compare the other engines with)."""

    name = "loop"

    def rows(self, x, t, noise, chunk_size):
        device = next(self.model.parameters()).device
        x, t, noise = x.to(device), t.to(device), noise.to(device)
        return torch.stack([per_sample_grads_loop(self.model, self.scheduler, x[g], t[g],
                                                  noise[g], self.loss).mean(0)
                            for g in range(len(x))])


class GhostEngine(_Bound):
    """Norms, dot products and weighted sums from layer factors, without forming rows
    (``ghost.group_terms`` and ``ghost.weighted_sum``)."""

    name = "ghost"

    def query_sum(self, x, t, noise, weights_of, chunk_size):
        return ghost.weighted_sum(self.model, self.scheduler, x, t, noise, weights_of,
                                  self.loss, chunk_size)

    def training_terms(self, x, t, noise, vectors, chunk_size):
        sq, dots = ghost.group_terms(self.model, self.scheduler, x, t, noise, self.loss, vectors,
                                     chunk_size)
        return sq.clamp_min(0).sqrt(), dots.T


def engine_name(name: str, model) -> str:
    """The engine ``name`` resolved for ``model``: "auto" is "ghost" when it covers every layer
    of ``model``, else "func"; "ghost" refuses a model with a layer it does not cover."""
    validation.choice(name, "engine", ENGINES)
    if name == "ghost":
        ghost.check_supported(model)
    if name == "auto":
        return "func" if ghost.unsupported_layers(model) else "ghost"
    return name


def engine_for(name: str, model, scheduler, loss: str = "mse") -> Engine:
    """The engine called ``name`` (resolved by ``engine_name``) bound to ``model``,
    ``scheduler`` and ``loss``."""
    return BY_NAME[engine_name(name, model)](model, scheduler, loss)


BY_NAME = {e.name: e for e in (FuncEngine, GhostEngine, LoopEngine)}   # ``ENGINES`` but "auto"
