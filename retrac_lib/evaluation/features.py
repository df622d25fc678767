"""A feature-space neighbour baseline: the penultimate layer of a small seeded CNN digit classifier.

No package of the install ships pretrained image weights inside its wheel (torch, diffusers,
scikit-learn and mlxtend hold none; diffusers fetches pretrained models from the Hugging Face Hub
at run time, which the study must not do), so the feature model is trained here: a four-layer CNN, seeded, on mlxtend's MNIST train split
(``rl.data.mnist("train")``, 4,000 digits; never the test split the study queries come from), in
seconds, and cached like a run. A training image's score for a query is the cosine similarity of
their 64-dimensional features, ``cos(phi(z), phi(x_i))`` (``feature_scores``); the baseline
``"feature"`` of ``baselines`` serves it. It takes MNIST-shaped images [*, 1, 32, 32] only.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from .. import cache, seeding, validation
from ..config import cache_dir, is_smoke
from ..data import Dataset, mnist

FEATURE_DIM = 64
IMAGE_SHAPE = (1, 32, 32)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """How the feature classifier is trained: Adam on the first ``n_train`` (None: all) digits of
    ``mnist("train")`` in seeded shuffled epochs."""

    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    n_train: int | None = None
    seed: int = 0


def classifier_config(smoke: bool | None = None) -> ClassifierConfig:
    """The study's classifier: 3 epochs on all 4,000 training digits (smoke: 2 epochs on 512)."""
    smoke = is_smoke() if smoke is None else smoke
    return ClassifierConfig(epochs=2, n_train=512) if smoke else ClassifierConfig()


class DigitNet(nn.Module):
    """Three 3x3 convolutions with ReLU and 2x2 max pooling (32 -> 4 pixels), a 64-unit layer
    (the features) and a 10-way linear read-out."""

    def __init__(self):
        super().__init__()
        layers, width = [], 1
        for out in (16, 32, 64):
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            width = out
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM),
                                  nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclasses.dataclass
class Classifier:
    """A trained ``DigitNet`` with its configuration and its accuracy on ``mnist("test")``."""

    net: DigitNet
    config: ClassifierConfig
    test_accuracy: float

    @torch.no_grad()
    def features(self, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Penultimate-layer features [n, 64] (float64) of ``images`` [n, 1, 32, 32]."""
        check_images(images)
        self.net.eval()
        return torch.cat([self.net.features(images[a:a + chunk].float().cpu()).double()
                          for a in range(0, len(images), chunk)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted labels [n]."""
        return self.net.head(self.features(images).float()).argmax(1)


def check_images(images) -> None:
    validation.tensor(images, "images")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"The feature classifier takes MNIST-shaped images [n, 1, 32, 32]; got "
                         f"{tuple(images.shape)}. The 'feature' baseline fits MNIST runs only.")


def _training_digits(config: ClassifierConfig) -> Dataset:
    """``mnist("train")``, or a seeded random ``n_train`` of it (the split is sorted by class)."""
    data = mnist("train")
    if config.n_train is None:
        return data
    n = validation.integer(config.n_train, "ClassifierConfig.n_train", 1)
    pick = torch.randperm(len(data), generator=seeding.generator(config.seed))[:n]
    return data.subset(pick.sort().values)


def train_classifier(config: ClassifierConfig) -> Classifier:
    """Train ``DigitNet`` with ``config`` (CPU, deterministic for a seed) and test it."""
    data = _training_digits(config)
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        net = DigitNet()
    gen = seeding.generator(config.seed)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    net.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data), generator=gen)
        for a in range(0, len(data), config.batch_size):
            idx = order[a:a + config.batch_size]
            loss = nn.functional.cross_entropy(net(data.images[idx]), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    classifier = Classifier(net.eval(), config, 0.0)
    test = mnist("test")
    classifier.test_accuracy = float((classifier.predict(test.images) == test.labels)
                                     .double().mean())
    return classifier


def _key(config: ClassifierConfig) -> str:
    return cache.key_for({"kind": "feature-classifier", "config": dataclasses.asdict(config),
                          "data": _training_digits(config).fingerprint(),
                          "torch": torch.__version__.split("+")[0]})


def load_or_train_classifier(config: ClassifierConfig | None = None,
                             root: Path | None = None) -> Classifier:
    """The cached classifier for ``config`` (default ``classifier_config()``), trained if absent
    (in ``root`` or ``$RETRAC_CACHE``, under ``features/``)."""
    config = config or classifier_config()
    folder = Path(root or cache_dir()) / "features" / _key(config)
    if folder.exists():
        cache.verify_folder(folder)
        net = DigitNet()
        net.load_state_dict(cache.load_tensors(folder / "weights.safetensors"))
        meta = cache.read_json(folder / "meta.json")
        return Classifier(net.eval(), config, meta["test_accuracy"])
    classifier = train_classifier(config)
    if cache.prepare(folder):
        def save():
            with cache.atomic_folder(folder) as tmp:
                cache.save_tensors(tmp / "weights.safetensors", classifier.net.state_dict())
                cache.write_json(tmp / "meta.json", {"config": dataclasses.asdict(config),
                                                     "test_accuracy": classifier.test_accuracy})
        cache.try_save(save, folder)
    return classifier


def feature_scores(queries: torch.Tensor, train: torch.Tensor,
                   classifier: Classifier | None = None) -> torch.Tensor:
    """Cosine similarity [Q, N] (float64) of the classifier's features of ``queries`` and
    ``train``; higher = nearer."""
    classifier = classifier or load_or_train_classifier()
    a = nn.functional.normalize(classifier.features(queries), dim=1)
    b = nn.functional.normalize(classifier.features(train), dim=1)
    return a @ b.T
