"""Baseline attributions under the interface of ``rl.attribute`` (chapter 5).

``attribute_baseline(run, queries, method)`` returns an ``AttributionResult`` whose ``scores``
[Q, N] rank training samples the way ``rl.attribute`` does (higher = more of a proponent):

* ``"dtrak"``: D-TRAK as published (Zheng et al., ICLR 2024): gradients of the output function
  ``mean eps_theta(x_t, t)^2`` averaged over a set of timesteps, randomly projected and scored
  through the damped inverse feature kernel (``rl.dtrak.attribute_dtrak``, which takes its own
  options: checkpoints, timesteps, proj_dim, damping, seed, device).
* ``"cosine"``: plain gradient cosine of the DDPM loss, without ReTrac's per-timestep
  normalization: ``cos(g_c(x_i), mean_t m_c(z, t))`` summed over checkpoints. This is
  ``rl.attribute(method="cosine")`` (``attribution.methods.Cosine``), which it calls.
* ``"pixel"``: nearest neighbours in pixel (or point) space, ``-|z - x_i|_2``.
* ``"feature"``: nearest neighbours in the feature space of a small seeded CNN digit classifier
  (``features``; MNIST-shaped runs only), cosine similarity of its penultimate layer.
* ``"random"``: seeded standard-normal scores, the floor every method must beat.

"cosine" takes every option of ``rl.attribute`` (checkpoints, timesteps, n_noise, ...);
``pixel``, ``feature`` and ``random`` accept and ignore them (``random`` uses ``seed``;
``feature`` takes ``classifier``, a ``features.ClassifierConfig``, default the smoke-aware
``features.classifier_config()``). Their results carry a ``BaselineConfig``, D-TRAK's a
``dtrak.DTrakConfig``.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .. import seeding, validation
from ..attribution import AttributionResult, attribute, load_or_attribute
from ..dtrak import attribute_dtrak, load_or_attribute_dtrak
from ..models import check_samples

BASELINES = ("dtrak", "cosine", "pixel", "feature", "random")
# Neighbour baselines score every training sample by its similarity to the query, so a training
# image is trivially its own best match (``counterfactual.self_influence`` treats them apart).
NEIGHBOURS = ("pixel", "feature")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """What names a neighbour or random baseline's scores: the method and the seed (which only
    "random" draws from)."""

    method: str
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check(method: str) -> None:
    validation.choice(method, "method", BASELINES)


def _non_gradient(run, queries: torch.Tensor, method: str, seed: int,
                  classifier=None) -> AttributionResult:
    start = time.perf_counter()
    check_samples(run.model_at(-1), queries, "queries")
    train = run.data.images.flatten(1).double()
    if method == "pixel":
        scores = -torch.cdist(queries.flatten(1).double(), train)
    elif method == "feature":
        from . import features   # a CNN of its own, loaded only for this baseline

        model = features.load_or_train_classifier(classifier)
        scores = features.feature_scores(queries, run.data.images, model)
    else:
        gen = seeding.generator(seed)
        scores = torch.randn((len(queries), len(train)), generator=gen, dtype=torch.float64)
    return AttributionResult(scores, BaselineConfig(method, seed), torch.zeros(0, dtype=torch.float64),
                             torch.zeros(0, len(train)), time.perf_counter() - start)


def attribute_baseline(run, queries: torch.Tensor, method: str = "dtrak", *, seed: int = 0,
                       **options) -> AttributionResult:
    """Baseline scores [Q, N] for every query and training sample of ``run``.

    Args:
        method: "dtrak", "cosine", "pixel", "feature" or "random" (module docstring).
        seed: the seed of "random" and "dtrak".
        options: passed to ``rl.dtrak.attribute_dtrak`` by "dtrak", to ``rl.attribute`` by
            "cosine"; ignored by "pixel", "feature" (but ``classifier``) and "random".

    ``result.config.method`` names the baseline.
    """
    _check(method)
    if method == "dtrak":
        return attribute_dtrak(run, queries, seed=seed, **options)
    if method == "cosine":
        return attribute(run, queries, method, **options)
    return _non_gradient(run, queries, method, seed, options.get("classifier"))


def load_or_attribute_baseline(run, queries: torch.Tensor, method: str = "dtrak", *,
                               seed: int = 0, **options) -> AttributionResult:
    """``attribute_baseline`` with a cache for the gradient baselines: "cosine" through
    ``rl.load_or_attribute``, "dtrak" through ``rl.dtrak.load_or_attribute_dtrak`` (pixel,
    feature and random scores are cheap and recomputed)."""
    _check(method)
    if method == "cosine":
        return load_or_attribute(run, queries, method, **options)
    if method == "dtrak":
        return load_or_attribute_dtrak(run, queries, seed=seed, **options)
    return attribute_baseline(run, queries, method, seed=seed, **options)


def attribute_any(run, queries: torch.Tensor, method: str, *, cached: bool = True, seed: int = 0,
                  **options) -> AttributionResult:
    """One entry point for every method of the book: "tracin" and "retrac" through
    ``rl.attribute`` (or its cache), the baselines through ``attribute_baseline``."""
    if method in ("tracin", "retrac"):   # "cosine" is both a method and a baseline
        fn = load_or_attribute if cached else attribute
        return fn(run, queries, method, **options)
    fn = load_or_attribute_baseline if cached else attribute_baseline
    return fn(run, queries, method, seed=seed, **options)
