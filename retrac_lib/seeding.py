"""One way to seed random draws: ``generator(seed)``, or ``generator(seed, PURPOSE, *indices)``.

Without a stream, the generator is ``torch.Generator().manual_seed(seed)``: training, data
subsets, retrains and features draw from the seed itself. A stream (a purpose below and its
indices, e.g. checkpoint and query) gets a 63-bit seed derived by NumPy's ``SeedSequence``, so
no two purposes or index tuples share draws by arithmetic (as ``seed + 1_000_003 * i`` did:
seed 0, index 1_000_003 drew what seed 1, index 0 drew). ``DRAWS_VERSION`` names this
derivation; the cache keys of results drawn from streams include it (``cache.FORMAT_VERSION``).

A leaf module: it imports nothing from ``retrac_lib`` but ``validation``.
"""
from __future__ import annotations

import numpy as np
import torch

from . import validation

DRAWS_VERSION = 2   # 1: the ad-hoc formulas before this module; 2: SeedSequence streams

TRAINING_NOISE = 1        # attribution's training side: seeded noise at checkpoint c
PER_QUERY_NOISE = 2       # attribute(..., noise_per_query=True): checkpoint c, query q
SAMPLE_NOISE = 3          # diagnostics.sample_noise: training sample i
COUNTSKETCH_HASH = 4      # projection.CountSketch: hash block b
GAUSSIAN_PROJECTION = 5   # projection.GaussianProjection: row block b
DTRAK_QUERY_NOISE = 6     # dtrak.attribute_dtrak: the queries' noise (the training side: plain)
PURPOSES = {TRAINING_NOISE: "training-side noise", PER_QUERY_NOISE: "per-query noise",
            SAMPLE_NOISE: "sweep sample noise", COUNTSKETCH_HASH: "CountSketch hash",
            GAUSSIAN_PROJECTION: "Gaussian projection", DTRAK_QUERY_NOISE: "D-TRAK query noise"}

_WORD = (1 << 32) - 1


def _value(value, name: str) -> int:
    """A non-negative integer below 2**64 (what ``manual_seed`` and the stream encode)."""
    value = validation.integer(value, name, 0, why="Seeds and stream indices are counted "
                                                   "from 0.")
    if value >> 64:
        raise ValueError(f"{name} must be below 2**64, got {value}.")
    return value


def generator(seed: int, purpose: int | None = None, *indices: int,
              name: str = "seed") -> torch.Generator:
    """A CPU ``torch.Generator`` for ``seed`` (``name`` names it in errors), or for the stream
    ``purpose`` (one of ``PURPOSES``) with ``indices`` of ``seed``."""
    seed = _value(seed, name)
    if purpose is None:
        return torch.Generator().manual_seed(seed)
    if isinstance(purpose, bool) or purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of seeding's constants {sorted(PURPOSES)}, "
                         f"got {purpose!r}.")
    values = [seed, purpose] + [_value(i, f"{PURPOSES[purpose]} index {j}")
                                for j, i in enumerate(indices)]
    # SeedSequence pads its input with zeros and splits large ints into 32-bit words, so
    # [s, p] and [s, p, 0] (or 2**32 and [0, 1]) would coincide: encode the count, then two
    # words per value.
    words = [len(values)] + [w for v in values for w in (v & _WORD, v >> 32)]
    lo, hi = np.random.SeedSequence(words).generate_state(2, np.uint32).tolist()
    return torch.Generator().manual_seed((hi >> 1) << 32 | lo)
