"""Diffusion-TracIn and Diffusion-ReTrac (chapters 3 and 4), one job per module.

* ``options``: ``AttributionConfig``, every choice behind a score matrix, and the names of those
  choices (``METHODS``, ``TRAIN_SIDES``, ...);
* ``methods``: one object per method (``TracIn``, ``ReTrac``, ``Cosine``), owning its
  normalizations, and the query vectors they define;
* ``engines``: how gradients are computed (``"func"``, ``"ghost"``, ``"loop"``), one protocol;
* ``sides``: the training gradients, streamed against the query vectors;
* ``scoring``: ``attribute`` and its cached twin ``load_or_attribute``, through one
  ``ScoringPlan`` validated at the door, and ``self_scores``, the self-influence diagonal alone
  (cached by ``load_or_self_scores``);
* ``results``: ``AttributionResult`` and its cache format;
* ``sketch``: training gradients stored once, CountSketch-projected;
* ``cost``: what an ``attribute`` call will cost, measured on a few of its passes.

The timestep grid and the query noise draws live one layer below, in ``retrac_lib.timesteps``.
"""
from .cost import CostEstimate, estimate
from .engines import Engine, engine_for, engine_name
from .methods import Cosine, ReTrac, TracIn, method_for, query_vectors
from .options import ENGINES, METHODS, QUERY_NORMALIZATIONS, TRAIN_SIDES, AttributionConfig
from .results import AttributionResult
from .scoring import (ScoringPlan, attribute, load_or_attribute, load_or_self_scores, score,
                      self_scores)
from .sides import TrainingGradients, timestep_gradients
from .sketch import TrainingSketch, sketch_training

__all__ = [
    "AttributionConfig", "AttributionResult", "attribute", "load_or_attribute", "ENGINES",
    "METHODS", "QUERY_NORMALIZATIONS", "TRAIN_SIDES", "query_vectors", "timestep_gradients",
    "TrainingSketch", "sketch_training", "CostEstimate", "estimate", "TracIn", "ReTrac",
    "Cosine", "method_for", "Engine", "engine_for", "engine_name", "ScoringPlan", "score",
    "TrainingGradients", "self_scores", "load_or_self_scores",
]
