"""Training configuration, run sizes and the cache location.

The book explains each field in chapter 1 (``notebooks/01_train_toy_ddpm.ipynb``).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from . import validation

SMOKE_ENV = "RETRAC_SMOKE"
CACHE_ENV = "RETRAC_CACHE"


def is_smoke() -> bool:
    """True when ``RETRAC_SMOKE=1``: notebooks then use tiny sizes on the same code path."""
    return os.environ.get(SMOKE_ENV, "0").strip() not in ("", "0", "false", "False")


def cache_dir() -> Path:
    """Folder for cached runs: ``$RETRAC_CACHE`` or ``~/.cache/retrac-book``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "retrac-book")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run; its hash keys the cache.

    Training runs in shuffled epochs (every sample once per epoch, the last batch may be
    smaller) with a checkpoint after every ``checkpoint_every`` epochs, so every sample has a
    recorded timestep and noise before every checkpoint.
    """

    model: str = "unet"                       # "unet" (images) or "mlp" (2-D points)
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    mlp_hidden: int = 128
    mlp_layers: int = 3
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    lr_schedule: str = "constant"             # "constant" or "cosine" (decay to 10 % of lr)
    checkpoint_every: int = 10                # epochs between checkpoints
    loss: str = "mse"                         # "mse" (p = 2) or "l1" (p = 1)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    clip_sample: bool = True                  # False for 2-D data
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.block_out_channels, (str, bytes, int)):
            raise TypeError(f"TrainConfig.block_out_channels must be a tuple of channel counts, "
                            f"e.g. (16, 32); got {self.block_out_channels!r}.")
        channels = tuple(validation.integer(c, "TrainConfig.block_out_channels entry", 1)
                         for c in self.block_out_channels)
        object.__setattr__(self, "block_out_channels", channels)
        _check_choice("model", self.model, ("unet", "mlp"))
        _check_choice("loss", self.loss, ("mse", "l1"))
        _check_choice("lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        object.__setattr__(self, "lr", validation.real(self.lr, "TrainConfig.lr", positive=True))
        validation.flag(self.clip_sample, "TrainConfig.clip_sample")
        for name in ("epochs", "batch_size", "checkpoint_every", "num_train_timesteps",
                     "norm_num_groups", "mlp_hidden", "mlp_layers", "layers_per_block", "seed"):
            value = validation.integer(getattr(self, name), f"TrainConfig.{name}",
                                       0 if name == "seed" else 1)
            object.__setattr__(self, name, value)
        if self.model == "unet":
            if not self.block_out_channels:
                raise ValueError("TrainConfig.block_out_channels must name at least one UNet level.")
            bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
            if bad:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must all divide by "
                    f"norm_num_groups={self.norm_num_groups} (GroupNorm splits channels into "
                    f"groups); {bad} do not. Choose channel counts that are multiples of "
                    f"{self.norm_num_groups} or change norm_num_groups."
                )

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")  # diffusers'


def _check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"TrainConfig.{name}={value!r} is not one of {choices}.")
