"""Per-sample gradients of the DDPM loss with ``torch.func`` (chapter 2).

``per_sample_grads`` returns one flattened gradient row per sample, computed with
``functional_call`` + ``vmap(grad(...))`` in chunks; ``per_sample_grads_loop`` is the plain
autograd loop that reads like the definition and serves as the tests' reference.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from .losses import add_noise, check_loss, error_loss
from .models import check_samples


def trainable_params(model) -> dict[str, torch.Tensor]:
    """The parameters a gradient is taken with respect to, in ``named_parameters`` order."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def flatten(grads: dict[str, torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
    """Concatenate a dict of gradients into [*batch, P] rows (parameter order preserved)."""
    return torch.cat([g.flatten(batch_dims) for g in grads.values()], dim=-1)


def check_batch(model, scheduler, x, t, noise) -> None:
    """Clear errors for inputs that do not form a batch of (sample, timestep, noise) triples."""
    check_samples(model, x, "x")
    if t.ndim != 1 or noise.shape != x.shape or len(t) != len(x):
        raise ValueError(
            f"x {tuple(x.shape)}, t {tuple(t.shape)} and noise {tuple(noise.shape)} must describe "
            "the same batch: t is [B] and noise has the shape of x."
        )
    n_t = scheduler.config.num_train_timesteps
    if len(t) and (t.min() < 0 or t.max() >= n_t):
        raise ValueError(f"timesteps must lie in [0, {n_t}); got values in [{int(t.min())}, {int(t.max())}].")


def _sample_loss_fn(model, loss):
    buffers = dict(model.named_buffers())

    def sample_loss(params, x_t, t, noise):
        """Loss of one sample (x_t already noised, so no scheduler indexing under vmap)."""
        pred = functional_call(model, (params, buffers), (x_t[None], t[None])).sample
        return error_loss(pred, noise[None], loss)[0]

    return sample_loss


def per_sample_grads(model, scheduler, x, t, noise, loss: str = "mse",
                     chunk_size: int = 64) -> torch.Tensor:
    """Gradients of ``mean |eps_theta(x_t, t) - eps|^p`` w.r.t. all trainable parameters: [B, P].

    Row ``i`` is the gradient of sample ``x[i]`` noised with ``noise[i]`` at timestep ``t[i]``.
    Runs on the model's device; memory is bounded by ``chunk_size`` rows of activations.
    """
    check_loss(loss)
    check_batch(model, scheduler, x, t, noise)
    device = next(model.parameters()).device
    params = trainable_params(model)
    x, t, noise = x.to(device), t.to(device), noise.to(device)
    with torch.no_grad():
        x_t = add_noise(scheduler, x, t, noise)
    per_sample = vmap(grad(_sample_loss_fn(model, loss)), in_dims=(None, 0, 0, 0))
    out = torch.empty(len(x), sum(p.numel() for p in params.values()), device=device)
    for a in range(0, len(x), chunk_size):
        b = min(a + chunk_size, len(x))
        out[a:b] = flatten(per_sample(params, x_t[a:b], t[a:b], noise[a:b]))
    return out


def per_sample_grads_loop(model, scheduler, x, t, noise, loss: str = "mse") -> torch.Tensor:
    """Reference: one plain autograd backward pass per sample (slow, obviously right)."""
    check_loss(loss)
    check_batch(model, scheduler, x, t, noise)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        x_t = add_noise(scheduler, x[i:i + 1], t[i:i + 1], noise[i:i + 1])
        value = error_loss(model(x_t, t[i:i + 1]).sample, noise[i:i + 1], loss)[0]
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)
