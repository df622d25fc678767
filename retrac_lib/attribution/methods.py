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

``query_vectors`` forms ``v_c(z)`` from the groups' gradients, which a gradient engine
(``engines``) computes; ``scoring`` adds the checkpoints up. So ReTrac's formula reads, from
``rl.attribute`` to the arithmetic: ``scoring.score``, this module, ``engines``. Chapter 3,
"TracIn by hand, for one checkpoint", and chapter 4, "ReTrac by hand, for one checkpoint",
write both formulas as a few lines of tensor code.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import validation
from .engines import Engine
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
        return _RETRAC_GROUPS[self.normalization](n_timesteps, n_noise)

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
            raise ValueError(f"The cosine method fixes normalization='cosine'; do not pass "
                             f"normalization={self.normalization!r} (or use method='retrac').")


# ReTrac's placements (``QUERY_NORMALIZATIONS``): draws per group, from T' and K
_RETRAC_GROUPS = {"per_timestep": lambda n_t, k: k, "per_draw": lambda n_t, k: 1,
                  "cosine": lambda n_t, k: n_t * k}
BY_NAME = {m.name: m for m in (TracIn, ReTrac, Cosine)}   # the classes of ``METHODS``


def method_for(name: str, normalization: str | None = None) -> TracIn | ReTrac:
    """The method object for ``name`` (one of ``METHODS``). ``normalization`` is ReTrac's
    placement (None: "per_timestep"); TracIn ignores it, and the cosine method refuses any
    placement but its own."""
    validation.choice(name, "method", METHODS)
    if name == "tracin":
        if normalization is not None:
            validation.choice(normalization, "normalization", QUERY_NORMALIZATIONS)
        return TracIn()
    return BY_NAME[name]() if normalization is None else BY_NAME[name](normalization)


def query_vectors(engine: Engine, queries, timesteps, noise, method, chunk_size: int = 256,
                  checkpoint: int = 0, first: int = 0) -> torch.Tensor:
    """The query side [Q, P] of ``method`` (an object of this module): ``v_c(z) = (1/G)
    sum_g a_g m_g(z)`` for every query ``z``, from ``engine`` (``engines.engine_for``: the
    checkpoint's model, its scheduler and the loss).

    ``noise`` is [T', K, *sample], the same for every query, or [Q, T', K, *sample]. Each
    query's T' x K draws are split into the method's groups (``method.draws_per_group``); the
    engine gives each group's averaged gradient ``m_g`` (one batched backward pass per chunk of
    ``chunk_size`` draws, or with the "loop" engine one per draw) weighted by
    ``method.group_weights``; ``checkpoint`` and ``first`` (the number of the first query)
    only name the checkpoint and the query in errors. Derived in
    chapter 3, "TracIn by hand, for one checkpoint", and chapter 4, "ReTrac by hand, for one
    checkpoint".
    """
    per_query = noise.dim() == queries.dim() + 2
    n_t, k = noise.shape[1:3] if per_query else noise.shape[:2]
    group = method.draws_per_group(n_t, k)
    out = []
    for q, z in enumerate(queries):
        x, t, eps = query_groups(z, timesteps, noise[q] if per_query else noise, group)
        v, norms = engine.query_sum(x, t, eps, method.group_weights, chunk_size)
        check_finite(torch.cat([norms, v])[None], "query", first + q, checkpoint)
        out.append(v / len(t))
    return torch.stack(out)


def query_groups(z, timesteps, noise, group: int):
    """The T' x K noised copies of query ``z`` (``noise`` [T', K, *sample]) as groups of ``group``
    draws: ``(x, t, eps)`` of shapes [G, group, *sample], [G, group], [G, group, *sample]."""
    n_t, k = noise.shape[:2]
    x = z.expand(n_t * k, *z.shape).reshape(-1, group, *z.shape)
    t = timesteps.repeat_interleave(k).reshape(-1, group)
    return x, t, noise.reshape(-1, group, *z.shape)


def check_finite(values: torch.Tensor, what: str, offset: int, checkpoint: int) -> None:
    """Refuse rows [n, ...] with a NaN or infinite entry (a gradient, or its norm and dot
    products), naming the first such sample."""
    bad = (~torch.isfinite(values.flatten(1)).all(dim=1)).nonzero().flatten()
    if len(bad):
        raise FloatingPointError(
            f"The gradient of {what} {offset + int(bad[0])} at checkpoint {checkpoint} is NaN or "
            "infinite. Check that sample for NaN/inf values and the checkpoint for diverged "
            "weights."
        )
