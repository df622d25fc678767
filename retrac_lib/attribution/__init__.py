"""Diffusion-TracIn and Diffusion-ReTrac (chapters 3 and 4), one job per module.

* ``options``: ``AttributionConfig``, every choice behind a score matrix, validated by ``resolve``,
  and the names of those choices (``METHODS``, ``TRAIN_SIDES``, ...);
* ``sides``: the query vectors and the training gradients streamed against them;
* ``scoring``: ``attribute`` and its cached twin ``load_or_attribute``;
* ``results``: ``AttributionResult`` and its cache format;
* ``sketch``: training gradients stored once, CountSketch-projected;
* ``cost``: what an ``attribute`` call will cost, measured on a few of its passes.

The timestep grid and the query noise draws live one layer below, in ``retrac_lib.timesteps``.
"""
from .cost import CostEstimate, estimate
from .options import ENGINES, METHODS, QUERY_NORMALIZATIONS, TRAIN_SIDES, AttributionConfig
from .results import AttributionResult
from .scoring import attribute, load_or_attribute
from .sides import query_vectors, timestep_gradients
from .sketch import TrainingSketch, sketch_training

__all__ = [
    "AttributionConfig", "AttributionResult", "attribute", "load_or_attribute", "ENGINES",
    "METHODS", "QUERY_NORMALIZATIONS", "TRAIN_SIDES", "query_vectors", "timestep_gradients",
    "TrainingSketch", "sketch_training", "CostEstimate", "estimate",
]
