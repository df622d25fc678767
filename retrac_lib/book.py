"""The runs the chapters share: one place that fixes their configuration and sizes.

Every notebook calls these instead of repeating sizes, so all chapters load the same cached run.
With ``RETRAC_SMOKE=1`` (``config.is_smoke``) they shrink to run in seconds on the same code path.
"""
from __future__ import annotations

from .config import TrainConfig, is_smoke
from .data import Dataset, digits, moons

SMOKE_DIGITS = 96


def digits_setup(smoke: bool | None = None) -> tuple[TrainConfig, Dataset]:
    """The book's digits run: 1,437 training digits (a stratified 80 % split), 50 epochs."""
    smoke = is_smoke() if smoke is None else smoke
    data = digits("train")
    if smoke:
        return (TrainConfig(epochs=3, batch_size=32, checkpoint_every=1),
                data.subset(range(SMOKE_DIGITS), name="digits-train-smoke"))
    return TrainConfig(epochs=50, batch_size=64, lr=2e-3, checkpoint_every=10), data


def points_setup(smoke: bool | None = None) -> tuple[TrainConfig, Dataset]:
    """The book's 2-D run: the MLP denoiser on two moons."""
    smoke = is_smoke() if smoke is None else smoke
    if smoke:
        return (TrainConfig(model="mlp", clip_sample=False, epochs=3, batch_size=32,
                            checkpoint_every=1), moons(n=64))
    return (TrainConfig(model="mlp", clip_sample=False, epochs=200, batch_size=64, lr=2e-3,
                        checkpoint_every=50), moons(n=512))


def attribution_options(smoke: bool | None = None) -> dict:
    """Query-side sizes the chapters use with ``rl.attribute`` / ``rl.load_or_attribute``.

    The paper's contract is 100 timesteps x 16 draws; the chapters use a 25 x 8 grid so that a
    chapter runs in a few minutes on a laptop CPU (``benchmarks/`` runs the full contract).
    """
    smoke = is_smoke() if smoke is None else smoke
    return dict(timesteps=4, n_noise=2) if smoke else dict(timesteps=25, n_noise=8)


def query_digits(n_per_class: int | None = None, smoke: bool | None = None) -> Dataset:
    """Held-out digits to attribute: the first ``n_per_class`` test digits of every class."""
    smoke = is_smoke() if smoke is None else smoke
    n_per_class = n_per_class or (1 if smoke else 2)
    test = digits("test")
    picks = [i for c in range(10) for i in (test.labels == c).nonzero().flatten()[:n_per_class].tolist()]
    if smoke:
        picks = picks[:4]
    return test.subset(picks, name="digits-queries")
