"""Generating samples from a trained denoiser with a strided DDPM schedule (chapter 1)."""
from __future__ import annotations

import copy

import torch
from diffusers import DDPMPipeline, UNet2DModel

from . import seeding


@torch.no_grad()
def generate(model, scheduler, n: int, steps: int = 100, seed: int = 0) -> torch.Tensor:
    """``n`` samples in data space ([-1, 1] for images) using ``steps`` strided denoising steps.

    Images go through diffusers' ``DDPMPipeline``; 2-D points through the scheduler's ``step`` loop.
    """
    scheduler = copy.deepcopy(scheduler)
    gen = seeding.generator(seed)
    model = model.eval()
    if isinstance(model, UNet2DModel):
        pipe = DDPMPipeline(unet=model, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=n, generator=gen, num_inference_steps=steps, output_type="np").images
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() * 2 - 1
    scheduler.set_timesteps(steps)
    x = torch.randn((n, model.config.dim), generator=gen)
    for t in scheduler.timesteps:
        eps = model(x, t.expand(n)).sample
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x
