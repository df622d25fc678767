"""The attribution methods, one object each, owning their normalizations (chapters 3 and 4).

Every method scores a training sample ``x_i`` against a query ``z`` as a sum over checkpoints
``c`` with weights ``w_c`` (``Run.checkpoint_weights``)::

    I(x_i, z) = sum_c w_c * train(<g_c(x_i), v_c(z)>, |g_c(x_i)|)
    v_c(z)    = (1/G) sum_g a_g m_g(z)

where ``m_g(z)`` is the query's loss gradient averaged over one *group* of its T' x K noised
draws, ``G`` the number of groups and ``a_g`` each group's weight. A method chooses the groups,
their weights and what happens to the training side:

* ``TracIn``: one group of all T' x K draws, ``a = 1``, the plain dot product;
* ``ReTrac``: groups of one timestep's K draws (``"per_timestep"``, the paper), of one draw
  (``"per_draw"``) or all draws (``"cosine"``), ``a_g = 1/|m_g|``, and the dot product
  divided by ``|g_c(x_i)|``: ``<g/|g|, mean_t m_t/|m_t|>``;
* ``Cosine``: ReTrac's ``"cosine"`` placement under a name of its own, the gradient cosine
  ``cos(g_c(x_i), v_c(z))`` (chapter 5's baseline).

``sides`` computes the groups' gradients with a gradient engine (``engines``); ``scoring``
adds the checkpoints up. Chapter 3, "TracIn by hand, for one checkpoint", and chapter 4,
"ReTrac by hand, for one checkpoint", write both formulas as a few lines of tensor code.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import validation
from .options import METHODS, QUERY_NORMALIZATIONS


def clamp_norm(norm: torch.Tensor) -> torch.Tensor:
    """Norms clamped to the smallest positive float, safe to divide by: a zero gradient then gets
    a zero normalized score, not NaN."""
    return norm.clamp_min(torch.finfo(norm.dtype).tiny)


@dataclasses.dataclass(frozen=True)
class TracIn:
    """Diffusion-TracIn: ``sum_c w_c <g_c(x_i), (1/|T'|) sum_t m_c(z, t)>``."""

    name = "tracin"
    normalization = "none"

    def draws_per_group(self, n_timesteps: int, n_noise: int) -> int:
        """How many of the query's T' x K draws share one averaged gradient ``m_g``."""
        return n_timesteps * n_noise

    def group_weights(self, norms: torch.Tensor) -> torch.Tensor:
        """The weights ``a_g`` [G] of the groups' gradients, from their norms [G]."""
        return torch.ones_like(norms)

    def training_scores(self, dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """One checkpoint's scores [Q, n] from the dot products ``<v_c(z), g_c(x_i)>`` [Q, n]
        and the norms ``|g_c(x_i)|`` [n]."""
        return dots


@dataclasses.dataclass(frozen=True)
class ReTrac:
    """Diffusion-ReTrac: ``sum_c w_c <g_c(x_i)/|g_c(x_i)|, (1/|T'|) sum_t m_c(z, t)/|m_c(z, t)|>``.

    ``normalization`` places the query side's normalization: after averaging each timestep's K
    draws (``"per_timestep"``, the paper's official code), on each single draw (``"per_draw"``),
    or once on the fully averaged vector (``"cosine"``).
    """

    normalization: str = "per_timestep"
    name = "retrac"

    def __post_init__(self):
        validation.choice(self.normalization, "normalization", QUERY_NORMALIZATIONS)

    def draws_per_group(self, n_timesteps: int, n_noise: int) -> int:
        return {"per_timestep": n_noise, "per_draw": 1,
                "cosine": n_timesteps * n_noise}[self.normalization]

    def group_weights(self, norms: torch.Tensor) -> torch.Tensor:
        return 1 / clamp_norm(norms)

    def training_scores(self, dots: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        # <v, g/|g|> = <v, g>/|g|, without a normalized copy of g
        return dots / clamp_norm(norms)


@dataclasses.dataclass(frozen=True)
class Cosine(ReTrac):
    """The gradient cosine ``sum_c w_c cos(g_c(x_i), v_c(z))``: ReTrac normalizing the fully
    averaged query vector once (the ranking does not see that one positive factor)."""

    normalization: str = "cosine"
    name = "cosine"

    def __post_init__(self):
        if self.normalization != "cosine":
            raise ValueError(f"The cosine method normalizes the averaged vector only; got "
                             f"normalization={self.normalization!r}. Use method='retrac' for "
                             "the other placements.")


def method_for(name: str, normalization: str | None = None) -> TracIn | ReTrac:
    """The method object for ``name`` ("tracin", "retrac" or "cosine"). ``normalization`` is
    ReTrac's placement (None: "per_timestep"); TracIn ignores it, and the cosine method refuses
    any placement but its own."""
    validation.choice(name, "method", METHODS)
    if normalization is not None:
        validation.choice(normalization, "normalization", QUERY_NORMALIZATIONS)
    if name == "tracin":
        return TracIn()
    if name == "cosine":
        if normalization not in (None, "cosine"):
            raise ValueError(f"The cosine method fixes normalization='cosine'; do not pass "
                             f"normalization={normalization!r} (or use method='retrac').")
        return Cosine()
    return ReTrac(normalization or "per_timestep")
