"""The runs the chapters share: one place that fixes their configuration and sizes.

Every notebook calls these instead of repeating sizes, so all chapters load the same cached run.
With ``RETRAC_SMOKE=1`` (``config.is_smoke``) they shrink to run in seconds on the same code path.
"""
from __future__ import annotations

import dataclasses
import re

from .. import cache
from ..config import TrainConfig, cache_dir, is_smoke
from ..data import Dataset, digits, digits_with_outliers, mnist, moons
from ..evaluation.counterfactual import LossLedger
from ..validation import default_device

SMOKE_DIGITS = 96
# members trained at once by chapter 5's retraining ledgers: for its small models
# ``benchmarks/bench_ensemble.py --setup ch5-points|ch5-digits`` measured 2-3x less CPU time
# per member-step with 16 than one by one
RETRAIN_ENSEMBLE = 16


def digits_setup(smoke: bool | None = None) -> tuple[TrainConfig, Dataset]:
    """The book's digits run: 1,437 training digits (a stratified 80 % split), 50 epochs."""
    smoke = is_smoke() if smoke is None else smoke
    data = digits("train")
    if smoke:
        return (TrainConfig(epochs=3, batch_size=32, checkpoint_every=1),
                data.subset(range(SMOKE_DIGITS), name="digits-train-smoke"))
    return TrainConfig(epochs=50, batch_size=64, lr=2e-3, checkpoint_every=10), data


def paper_setup(smoke: bool | None = None) -> tuple[TrainConfig, Dataset, dict]:
    """The book's digits run with the paper's official recipe: ``(config, data, attribution)``.

    What differs from ``digits_setup`` and ``attribution_options``, as the official code does
    it: the L1 loss, the cosine noise schedule (``squaredcos_cap_v2``), the recorded timestep
    with fresh training-side noise, fresh query noise for every query, and 100 timesteps x 16
    draws. ``attribution`` goes to ``rl.attribute`` / ``rl.load_or_attribute``.
    """
    smoke = is_smoke() if smoke is None else smoke
    config, data = digits_setup(smoke)
    grid = dict(timesteps=4, n_noise=2) if smoke else dict(timesteps=100, n_noise=16)
    return (config.replace(loss="l1", beta_schedule="squaredcos_cap_v2"), data,
            dict(grid, train_side="fresh_noise", noise_per_query=True))


def points_setup(smoke: bool | None = None) -> tuple[TrainConfig, Dataset]:
    """The book's 2-D run: the MLP denoiser on two moons."""
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        return (TrainConfig(model="mlp", clip_sample=False, epochs=3, batch_size=32,
                            checkpoint_every=1), moons(n=64))
    return (TrainConfig(model="mlp", clip_sample=False, epochs=200, batch_size=64, lr=2e-3,
                        checkpoint_every=50), moons(n=512))


def attribution_options(smoke: bool | None = None) -> dict:
    """Query-side sizes (and the device) the chapters use with ``rl.attribute`` /
    ``rl.load_or_attribute``.

    The paper's contract is 100 timesteps x 16 draws; the chapters use a 25 x 8 grid so that a
    chapter runs in a few minutes on a laptop CPU (``benchmarks/`` runs the full contract).
    """
    smoke = is_smoke() if smoke is None else smoke
    sizes = dict(timesteps=4, n_noise=2) if smoke else dict(timesteps=25, n_noise=8)
    return dict(sizes, device=default_device())


def recipe_options(smoke: bool | None = None) -> dict:
    """The recipe comparisons of ``notebooks/04b_recipes.ipynb``: the chapters' query grid on the
    last checkpoint only, a fifth of the cost of all five, so that ten attributions fit in a build."""
    return dict(attribution_options(smoke), checkpoints=[-1])


def grid_cost_setup(smoke: bool | None = None) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The query grids of ``notebooks/04b_recipes.ipynb``: the reference (T', K) and the smaller
    grids measured against it.

    T' grows at the reference's K, K grows at the reference's T', and the chapters' 25 x 8.
    """
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        return (4, 2), [(2, 2), (4, 1)]
    return (100, 16), [(10, 16), (25, 16), (50, 16), (100, 2), (100, 8), (25, 8)]


def query_digits(n_per_class: int | None = None, smoke: bool | None = None) -> Dataset:
    """Held-out digits to attribute: the first ``n_per_class`` test digits of every class."""
    smoke = is_smoke() if smoke is None else smoke
    n_per_class = n_per_class or (1 if smoke else 2)
    test = digits("test")
    picks = [i for c in range(10) for i in (test.labels == c).nonzero().flatten()[:n_per_class].tolist()]
    if smoke:
        picks = picks[:4]
    return test.subset(picks, name="digits-queries")


# ---------------------------------------------------------------------------------------------
# chapter 5: counterfactual tests and planted outliers


@dataclasses.dataclass(frozen=True)
class CounterfactualSetup:
    """Everything one of chapter 5's retraining experiments fixes: run, queries and budgets.

    Every training set is retrained with each of ``seeds`` and the query losses averaged; the
    random removal is drawn ``random_draws`` times per query. ``loss_options`` go to
    ``evaluation.counterfactual.query_loss``; ``attribution`` to ``rl.attribute``; ``dtrak`` to
    ``rl.dtrak.attribute_dtrak``.
    """

    config: TrainConfig
    data: Dataset
    queries: Dataset
    k: int                      # removal test: proponents removed per query
    n_subsets: int              # LDS: random subsets retrained
    subset_fraction: float
    subset_seed: int
    loss_options: dict
    attribution: dict
    seeds: tuple[int, ...] = (0,)
    random_draws: int = 1
    dtrak: dict = dataclasses.field(default_factory=dict)

    def options(self, method: str) -> dict:
        """The attribution options of ``method``: ``dtrak`` for D-TRAK, else ``attribution``."""
        return self.dtrak if method == "dtrak" else self.attribution

    def ledger(self, name: str) -> LossLedger:
        """The ledger of this setup's retrains, ``<cache>/ledgers/NAME-<hash>.json``: missing
        retrains are trained on the CPU in ensembles of ``RETRAIN_ENSEMBLE``, and a rebuild
        reads their query losses back instead of training again."""
        if not (isinstance(name, str) and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name)):
            raise ValueError(f"name must be lower-case words joined by '-' (a file name), such "
                             f"as 'ch5-points'; got {name!r}.")
        owner = cache.key_for({"kind": "book-retrains", "name": name,
                               "config": self.config.to_dict(), "data": self.data.fingerprint(),
                               "queries": self.queries.fingerprint(),
                               "loss_options": self.loss_options, "seeds": list(self.seeds)})
        return LossLedger(cache_dir() / "ledgers" / f"{name}-{owner}.json", owner=owner,
                          ensemble_size=RETRAIN_ENSEMBLE)


def dtrak_options(smoke: bool | None = None) -> dict:
    """D-TRAK's settings in the chapters: the final checkpoint, 10 timesteps (the published
    ``S``), a 2048-dimensional projection (smoke: 4 timesteps, 64 dimensions)."""
    smoke = is_smoke() if smoke is None else smoke
    sizes = dict(timesteps=4, proj_dim=64) if smoke else dict(timesteps=10, proj_dim=2048)
    return dict(sizes, checkpoints=[-1], damping=0.1, device=default_device())


def counterfactual_setup(smoke: bool | None = None) -> CounterfactualSetup:
    """Chapter 5's 2-D retraining experiments: the MLP on 256 two-moons points, 100 epochs.

    8 held-out query points, the top 10 % of the training set removed per query, 48 half-size
    subsets for the LDS; every training set trained with 3 seeds, 3 random removals per query.
    """
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        return CounterfactualSetup(
            TrainConfig(model="mlp", clip_sample=False, mlp_hidden=32, epochs=3, batch_size=32,
                        checkpoint_every=1), moons(n=48), moons(n=16, seed=1).subset(range(3)),
            k=5, n_subsets=6, subset_fraction=0.5, subset_seed=0,
            loss_options=dict(timesteps=10, n_noise=4), attribution=attribution_options(smoke=True),
            seeds=(0, 1), random_draws=2, dtrak=dtrak_options(smoke=True))
    return CounterfactualSetup(
        TrainConfig(model="mlp", clip_sample=False, epochs=100, batch_size=64, lr=2e-3,
                    checkpoint_every=25), moons(n=256), moons(n=64, seed=1).subset(range(8)),
        k=25, n_subsets=48, subset_fraction=0.5, subset_seed=0,
        loss_options=dict(timesteps=100, n_noise=32), attribution=attribution_options(smoke=False),
        seeds=(0, 1, 2), random_draws=3, dtrak=dtrak_options(smoke=False))


def digits_counterfactual_setup(smoke: bool | None = None) -> CounterfactualSetup:
    """Chapter 5's retraining experiments on digit images: 120 training digits (12 per class),
    the small (8, 16) UNet, 20 epochs; 6 held-out query digits, the top 12 removed per query,
    32 half-size subsets for the LDS, 3 training seeds, 3 random removals per query."""
    smoke = is_smoke() if smoke is None else smoke
    train, test = digits("train"), digits("test")

    def per_class(data, n):
        return [i for c in range(10) for i in (data.labels == c).nonzero().flatten()[:n].tolist()]

    if smoke:
        return CounterfactualSetup(
            TrainConfig(block_out_channels=(8, 16), epochs=2, batch_size=16, checkpoint_every=1),
            train.subset(per_class(train, 3), name="digits-cf-smoke"),
            test.subset(per_class(test, 1)[:2], name="digits-cf-queries"),
            k=3, n_subsets=4, subset_fraction=0.5, subset_seed=0,
            loss_options=dict(timesteps=5, n_noise=2), attribution=attribution_options(smoke=True),
            seeds=(0, 1), random_draws=2, dtrak=dtrak_options(smoke=True))
    queries = test.subset(per_class(test, 1)[:6], name="digits-cf-queries")
    return CounterfactualSetup(
        TrainConfig(block_out_channels=(8, 16), epochs=20, batch_size=32, lr=2e-3,
                    checkpoint_every=10),
        train.subset(per_class(train, 12), name="digits-cf"), queries,
        k=12, n_subsets=32, subset_fraction=0.5, subset_seed=0,
        loss_options=dict(timesteps=50, n_noise=8), attribution=attribution_options(smoke=False),
        seeds=(0, 1, 2), random_draws=3, dtrak=dtrak_options(smoke=False))


@dataclasses.dataclass(frozen=True)
class OutlierSetup:
    """Chapter 5's planted-outlier run and the sizes of its measurements.

    ``self_attribution`` goes to ``rl.attribute`` with every training image as a query (the
    self-influence); ``attribution`` for the generated images that resemble outliers.
    """

    config: TrainConfig
    data: Dataset
    self_attribution: dict
    attribution: dict
    n_generated: int
    n_queries: int
    dtrak: dict = dataclasses.field(default_factory=dtrak_options)

    def options(self, method: str, self_influence: bool = False) -> dict:
        """The attribution options of ``method`` for the generated queries, or for the
        self-influence of every training image: ``dtrak`` for D-TRAK (both cases)."""
        if method == "dtrak":
            return self.dtrak
        return self.self_attribution if self_influence else self.attribution


def outlier_setup(smoke: bool | None = None) -> OutlierSetup:
    """300 training digits with 15 checkerboards (4.8 %, one pattern with pixel noise) mixed in,
    the book's UNet, 40 epochs; 256 generated images.

    Self-influence needs every training image as a query, so it uses the last checkpoint and a
    10 x 2 query grid; the generated queries use the chapters' usual options.
    """
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        return OutlierSetup(
            TrainConfig(block_out_channels=(8, 16), epochs=2, batch_size=32, checkpoint_every=1),
            digits_with_outliers(n_digits=60, n_outliers=3),
            self_attribution=dict(checkpoints=[-1], timesteps=2, n_noise=1),
            attribution=attribution_options(smoke=True), n_generated=8, n_queries=2,
            dtrak=dtrak_options(smoke=True))
    return OutlierSetup(
        TrainConfig(epochs=40, batch_size=32, lr=2e-3, checkpoint_every=10),
        digits_with_outliers(n_digits=300, n_outliers=15),
        self_attribution=dict(checkpoints=[-1], timesteps=10, n_noise=2),
        attribution=attribution_options(smoke=False), n_generated=256, n_queries=8)


# ---------------------------------------------------------------------------------------------
# notebooks/08_your_own_model.ipynb: attribute your own model


@dataclasses.dataclass(frozen=True)
class OwnModelSetup:
    """The diffusers-style loop of "Attribute your own model": what it trains and attributes."""

    n_train: int               # the first n_train training digits
    epochs: int
    batch_size: int
    learning_rate: float
    lr_warmup_steps: int
    checkpoint_epochs: tuple[int, ...]
    n_queries: int             # held-out digits, one per class first
    attribution: dict


def own_model_setup(smoke: bool | None = None) -> OwnModelSetup:
    """600 training digits, 20 epochs of AdamW with warm-up and cosine decay, checkpoints after
    epochs 10 and 20, 10 held-out queries on the chapters' usual query grid."""
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        return OwnModelSetup(48, 2, 16, 1e-3, 2, (1, 2), 4, attribution_options(smoke=True))
    return OwnModelSetup(600, 20, 32, 2e-3, 20, (10, 20), 10, attribution_options(smoke=False))


# ---------------------------------------------------------------------------------------------
# notebooks/06_mnist.ipynb: real digits at MNIST resolution


@dataclasses.dataclass(frozen=True)
class MnistSetup:
    """Chapter 6's run on real 32 x 32 MNIST digits and the sizes of its measurements.

    ``data`` holds digits of ``inlier_labels`` followed by a few of ``outlier_label`` (the
    paper's design: a few percent of a different kind). ``queries`` are held-out digits of the
    inlier classes. ``attribution`` goes to ``rl.attribute`` for the held-out and generated
    queries, ``self_attribution`` for the self-influence of every training image.
    """

    config: TrainConfig
    data: Dataset
    inlier_labels: tuple[int, ...]
    outlier_label: int
    queries: Dataset
    attribution: dict
    self_attribution: dict
    n_generated: int
    generation_steps: int
    n_outlier_queries: int


def mnist_setup(smoke: bool | None = None) -> MnistSetup:
    """960 training digits (320 each of 1, 4 and 7) plus 40 zeros (4 %), the three-level
    (8, 16, 32) UNet, 40 epochs with checkpoints after epochs 20 and 40; 9 held-out queries.

    Sized for about ten minutes of a 2-core CPU; on a GPU (Colab) larger sizes fit.
    """
    smoke = is_smoke() if smoke is None else smoke
    inliers, outlier = (1, 4, 7), 0
    n_in, n_out, n_query = (20, 3, 1) if smoke else (320, 40, 3)
    train, test = mnist("train"), mnist("test")

    def first(data, label, n):
        return (data.labels == label).nonzero().flatten()[:n].tolist()

    picks = [i for c in inliers for i in first(train, c, n_in)] + first(train, outlier, n_out)
    data = train.subset(picks, name="mnist-outlier-zeros" + ("-smoke" if smoke else ""))
    queries = test.subset([i for c in inliers for i in first(test, c, n_query)], name="mnist-queries")
    config = TrainConfig(block_out_channels=(8, 16, 32), lr=2e-3, batch_size=32,
                         epochs=2 if smoke else 40, checkpoint_every=1 if smoke else 20)
    if smoke:
        return MnistSetup(config, data, inliers, outlier, queries, attribution_options(smoke=True),
                          dict(checkpoints=[-1], timesteps=2, n_noise=1), 8, 10, 2)
    return MnistSetup(config, data, inliers, outlier, queries, attribution_options(smoke=False),
                      dict(checkpoints=[-1], timesteps=5, n_noise=1), 128, 100, 4)
