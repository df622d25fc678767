"""The DDPM training loss, per sample: ``mean |eps_theta(x_t, t) - eps|^p``.

Training, replay, per-sample gradients and attribution all call these functions, so they agree
bit for bit. Chapter 1 derives the loss; chapter 2 differentiates it per sample.
"""
from __future__ import annotations

import torch

from . import validation
from .validation import float_samples

LOSSES = ("mse", "l1", "square_norm")
# "square_norm" is not a training loss: it is D-TRAK's output function ``mean eps_theta(x_t, t)^2``,
# which ignores the true noise; chapter 5 attributes with its gradient (``evaluation.baselines``).


def check_loss(loss: str) -> None:
    validation.choice(loss, "loss", LOSSES)


def add_noise(scheduler, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The forward process ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` (diffusers' add_noise).

    Integer samples are refused (diffusers casts the schedule to the sample dtype, which would
    turn ``x_t`` into pure noise), and the scheduler is left on the device it was on: diffusers
    moves its ``alphas_cumprod`` to the samples' device, which would change a run's shared
    scheduler for every later call.
    """
    float_samples(x, "x")
    float_samples(noise, "noise")
    schedule = scheduler.alphas_cumprod
    try:
        return scheduler.add_noise(x, noise, t.to(x.device))
    finally:
        scheduler.alphas_cumprod = schedule


def error_loss(pred: torch.Tensor, noise: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss from predicted and true noise: mean over all but the first dimension."""
    if loss == "square_norm":
        return pred.square().flatten(1).mean(1)
    diff = pred - noise
    err = diff.square() if loss == "mse" else diff.abs()
    return err.flatten(1).mean(1)


def diffusion_loss(model, scheduler, x, t, noise, loss: str = "mse") -> torch.Tensor:
    """Per-sample DDPM loss [B] of ``model`` on clean samples ``x`` at timesteps ``t`` with ``noise``."""
    check_loss(loss)
    x_t = add_noise(scheduler, x, t, noise)
    return error_loss(model(x_t, t.to(x.device)).sample, noise, loss)
