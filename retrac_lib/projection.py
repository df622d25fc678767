"""Random projections of gradients: ``CountSketch`` for scoring large training sets in bounded
memory, and D-TRAK's dense ``GaussianProjection``.

Exact scores never need all N x P training gradients at once (``rl.attribute`` streams them in
chunks), but scoring *many* query sets against the same run recomputes them every time. Storing
them projected to ``k`` dimensions instead (N x k per checkpoint, ``k`` in the thousands while P
is in the hundreds of thousands or more) lets ``rl.attribution.sketch_training`` compute them
once and score any number of queries later (``rl.attribute(..., projection=sketch)``).

The projection is a **CountSketch**: coordinate ``j`` of a gradient is added, with a random sign
``s_j``, to bucket ``h(j)`` of ``k``. It is linear, costs one pass over the gradient (no P x k
matrix: the hash is generated from the seed block by block), and preserves inner products in
expectation, ``E[<Sx, Sy>] = <x, y>``, with a variance that shrinks like ``1/k``.
"""
from __future__ import annotations

import torch

from . import seeding, validation

BLOCK = 1 << 20          # coordinates hashed per generator call
ROW_BLOCK = 4096         # rows of a GaussianProjection's matrix generated per block
_CACHE_LIMIT = 1 << 25   # keep the hash in memory up to this many coordinates (256 MiB as int64)


class CountSketch:
    """A seeded CountSketch from ``dim`` to ``k`` dimensions: ``sketch(g)`` maps [..., dim] to [..., k].

    The bucket and sign of each coordinate come from ``seed`` alone (generated in blocks of
    ``BLOCK`` coordinates), so the same seed gives the same projection in every process.
    """

    def __init__(self, dim: int, k: int, seed: int = 0):
        for name, value in (("dim", dim), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CountSketch {name} must be a positive integer, got {value!r}.")
        self.dim, self.k = dim, k
        self.seed = validation.integer(seed, "seed", 0)
        self._blocks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"CountSketch(dim={self.dim}, k={self.k}, seed={self.seed})"

    def hash_block(self, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets (int64 in [0, k)) and signs (+-1 float32) of coordinates
        ``block * BLOCK`` up to the next block boundary or ``dim``."""
        if block in self._blocks:
            return self._blocks[block]
        a = block * BLOCK
        n = min(BLOCK, self.dim - a)
        if n <= 0:
            raise IndexError(f"Block {block} lies beyond dim={self.dim}.")
        gen = seeding.generator(self.seed, seeding.COUNTSKETCH_HASH, block)
        buckets = torch.randint(0, self.k, (n,), generator=gen)
        signs = torch.randint(0, 2, (n,), generator=gen).mul_(2).sub_(1).float()
        if self.dim <= _CACHE_LIMIT:
            self._blocks[block] = buckets, signs
        return buckets, signs

    def buckets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole hash: buckets [dim] and signs [dim] (for inspection and tests)."""
        parts = [self.hash_block(b) for b in range(-(-self.dim // BLOCK))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if g.ndim < 1 or g.shape[-1] != self.dim:
            raise ValueError(
                f"CountSketch expects [..., {self.dim}] inputs; got shape {tuple(g.shape)}."
            )
        if not g.dtype.is_floating_point:
            raise ValueError(f"CountSketch expects floating-point inputs, got {g.dtype}.")
        flat = g.reshape(-1, self.dim)
        out = torch.zeros(flat.shape[0], self.k, dtype=g.dtype, device=g.device)
        for block in range(-(-self.dim // BLOCK)):
            buckets, signs = self.hash_block(block)
            a = block * BLOCK
            part = flat[:, a:a + len(buckets)] * signs.to(g.device, g.dtype)
            out.index_add_(1, buckets.to(g.device), part)
        return out.reshape(*g.shape[:-1], self.k)


class GaussianProjection:
    """A seeded dense projection ``P`` [dim, k] with independent N(0, 1/k) entries, so that
    ``E <xP, yP> = <x, y>``. Rows are generated block by block from the seed, never stored whole."""

    def __init__(self, dim: int, k: int, seed: int = 0):
        self.dim = validation.integer(dim, "dim", 1)
        self.k = validation.integer(k, "proj_dim", 1)
        self.seed = validation.integer(seed, "seed", 0)

    def block(self, b: int) -> torch.Tensor:
        """Rows ``b * ROW_BLOCK`` up to the next block boundary (or ``dim``) of ``P``."""
        a = b * ROW_BLOCK
        rows = min(ROW_BLOCK, self.dim - a)
        gen = seeding.generator(self.seed, seeding.GAUSSIAN_PROJECTION, b)
        return torch.randn(rows, self.k, generator=gen) / self.k ** 0.5

    def matrix(self) -> torch.Tensor:
        """The whole ``P`` [dim, k] (for tests and small models)."""
        return torch.cat([self.block(b) for b in range(-(-self.dim // ROW_BLOCK))])

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        if g.ndim != 2 or g.shape[1] != self.dim:
            raise ValueError(f"GaussianProjection expects [B, {self.dim}] gradients; got {tuple(g.shape)}.")
        out = torch.zeros(len(g), self.k, dtype=g.dtype, device=g.device)
        for b in range(-(-self.dim // ROW_BLOCK)):
            a = b * ROW_BLOCK
            p = self.block(b).to(g.device, g.dtype)
            out += g[:, a:a + len(p)] @ p
        return out
