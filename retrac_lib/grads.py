"""Per-sample gradients of the DDPM loss with ``torch.func`` (chapter 2).

``per_sample_grads`` returns one flattened gradient row per sample, computed with
``functional_call`` + ``vmap(grad(...))`` in chunks; ``per_sample_grads_loop`` is the plain
autograd loop that reads like the definition and serves as the tests' reference.
``grouped_grads`` generalizes both to groups of draws (one averaged gradient per group), which is
what the attribution query side needs; a group that fills a whole chunk is one ordinary batched
backward pass.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from .losses import add_noise, check_loss, error_loss
from .models import check_samples
from . import validation


def trainable_params(model) -> dict[str, torch.Tensor]:
    """The parameters a gradient is taken with respect to, in ``named_parameters`` order."""
    return {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}


def flatten(grads: dict[str, torch.Tensor], batch_dims: int = 1) -> torch.Tensor:
    """Concatenate a dict of gradients into [*batch, P] rows (parameter order preserved)."""
    return torch.cat([g.flatten(batch_dims) for g in grads.values()], dim=-1)


def check_batch(model, scheduler, x, t, noise) -> None:
    """Clear errors for inputs that do not form a batch of (sample, timestep, noise) triples."""
    validation.tensors(x=x, t=t, noise=noise)
    check_samples(model, x, "x")
    dtype = next(model.parameters()).dtype
    validation.float_samples(x, "x", dtype)
    validation.float_samples(noise, "noise", dtype)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(
            f"timesteps t must be integers (they index the noise schedule); got dtype {t.dtype}."
        )
    if t.ndim != 1 or noise.shape != x.shape or len(t) != len(x):
        raise ValueError(
            f"x {tuple(x.shape)}, t {tuple(t.shape)} and noise {tuple(noise.shape)} must describe "
            "the same batch: t is [B] and noise has the shape of x."
        )
    n_t = scheduler.config.num_train_timesteps
    if len(t) and (t.min() < 0 or t.max() >= n_t):
        raise ValueError(f"timesteps must lie in [0, {n_t}); got values in [{int(t.min())}, {int(t.max())}].")


def _group_loss_fn(model, loss):
    buffers = dict(model.named_buffers())

    def group_loss(params, x_t, t, noise):
        """Mean loss of one group of draws (x_t already noised: no scheduler indexing under vmap)."""
        pred = functional_call(model, (params, buffers), (x_t, t)).sample
        return error_loss(pred, noise, loss).mean()

    return group_loss


def grouped_grads(model, scheduler, x, t, noise, loss: str = "mse",
                  chunk_size: int = 64) -> torch.Tensor:
    """One gradient per group of draws: row ``g`` is the gradient of the mean loss over
    ``(x[g, m], t[g, m], noise[g, m])`` for ``m < M``; ``x`` is [G, M, *sample], ``t`` is [G, M].

    Because the mean of gradients is the gradient of the mean loss, each row costs one batched
    backward pass, never a loop over draws. ``chunk_size`` bounds the draws (G x M) processed at
    once: several groups per chunk go through ``vmap(grad(...))``; a group that fills a chunk by
    itself is one ordinary backward pass (summed slice by slice when larger than the chunk).
    """
    check_loss(loss)
    chunk_size = validation.chunk_size(chunk_size)
    validation.tensors(x=x, t=t, noise=noise)
    if x.ndim < 2 or t.shape != x.shape[:2] or noise.shape != x.shape:
        raise ValueError(
            f"x {tuple(x.shape)}, t {tuple(t.shape)} and noise {tuple(noise.shape)} must describe "
            "the same groups: x and noise are [G, M, *sample] and t is [G, M]."
        )
    check_batch(model, scheduler, x.flatten(0, 1), t.flatten(), noise.flatten(0, 1))
    device = next(model.parameters()).device
    params = trainable_params(model)
    groups, draws = t.shape
    x, t, noise = x.to(device), t.to(device), noise.to(device)
    with torch.no_grad():
        x_t = add_noise(scheduler, x.flatten(0, 1), t.flatten(), noise.flatten(0, 1)).view_as(x)
    dtype = next(iter(params.values())).dtype
    out = torch.empty(groups, sum(p.numel() for p in params.values()), device=device, dtype=dtype)
    if groups == 1 or draws * 2 > chunk_size:
        for g in range(groups):
            out[g].zero_()
            for a in range(0, draws, chunk_size):
                b = min(a + chunk_size, draws)
                out[g] += _batch_grad(model, x_t[g, a:b], t[g, a:b], noise[g, a:b], loss, draws)
        return out
    per_group = vmap(grad(_group_loss_fn(model, loss)), in_dims=(None, 0, 0, 0))
    step = chunk_size // draws
    for a in range(0, groups, step):
        b = min(a + step, groups)
        out[a:b] = flatten(per_group(params, x_t[a:b], t[a:b], noise[a:b]))
    return out


def _batch_grad(model, x_t, t, noise, loss, group_size) -> torch.Tensor:
    """Flattened gradient of ``sum(loss) / group_size`` over a batch: one ordinary backward."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        total = error_loss(model(x_t, t).sample, noise, loss).sum() / group_size
    return torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])


def per_sample_grads(model, scheduler, x, t, noise, loss: str = "mse",
                     chunk_size: int = 64) -> torch.Tensor:
    """Gradients of ``mean |eps_theta(x_t, t) - eps|^p`` w.r.t. all trainable parameters: [B, P].

    Row ``i`` is the gradient of sample ``x[i]`` noised with ``noise[i]`` at timestep ``t[i]``,
    computed with ``functional_call`` + ``vmap(grad(...))`` in chunks of ``chunk_size`` samples.
    Runs on the model's device. Chapter 2, "One loss gradient per training sample", writes the
    recipe out in a few lines and checks both against ``per_sample_grads_loop``.
    """
    check_batch(model, scheduler, x, t, noise)
    return grouped_grads(model, scheduler, x[:, None], t[:, None], noise[:, None], loss, chunk_size)


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
