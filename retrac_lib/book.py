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
