"""Training runs that record what attribution needs, and the load-or-train cache.

``train`` records through the same ``Recorder`` a user adds to their own loop; what it returns
is a ``runs.Run``. Chapter 1 trains a run and reads its log; every later chapter loads it
through ``load_or_train``.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import cache, seeding
from .config import TrainConfig, cache_dir
from .data import Dataset
from .losses import diffusion_loss
from .models import build_model, build_scheduler
from .recorder import Recorder
from .runs import Run, load_run, run_key, save_run


def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))


def epoch_draws(config: TrainConfig, n: int, sample_shape, gen: torch.Generator):
    """One epoch's random draws of ``train`` from ``gen``, batch by batch, in the order it makes
    them: (indices [B], timesteps [B], noise [B, *sample_shape]) after one shuffle of ``n``."""
    order = torch.randperm(n, generator=gen)
    for b in range(0, n, config.batch_size):
        idx = order[b:b + config.batch_size]
        t = torch.randint(0, config.num_train_timesteps, (len(idx),), generator=gen)
        yield idx, t, torch.randn((len(idx), *sample_shape), generator=gen)


def train(config: TrainConfig, data: Dataset, progress: bool = True) -> Run:
    """Train a DDPM on ``data`` in shuffled epochs, recording the log and checkpoints (CPU)
    with the same ``Recorder`` a user adds to their own loop.

    The recorder raises ``runs.TrainingDiverged`` as soon as a loss or a checkpoint's weights
    are NaN or infinite.
    """
    if len(data) == 0:
        raise ValueError(f"data {data.name!r} is empty: training needs at least one sample.")
    model = build_model(config, data.sample_shape).train()
    scheduler = build_scheduler(config)
    recorder = Recorder(model, scheduler, data, config=config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    gen = seeding.generator(config.seed)
    n, bs = len(data), config.batch_size
    total = config.epochs * math.ceil(n / bs)
    with tqdm(total=total, desc="training", disable=not progress) as bar:
        for epoch in range(config.epochs):
            for idx, t, eps in epoch_draws(config, n, data.sample_shape, gen):
                lr = _lr_at(config, recorder.n_steps, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = diffusion_loss(model, scheduler, data.images[idx], t, eps, config.loss).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                recorder.step(idx, t, eps, lr, loss=loss.item())   # refuses a NaN/inf loss
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
            if (epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == config.epochs:
                recorder.checkpoint(model, epoch=epoch + 1)        # refuses NaN/inf weights
    return recorder.close()


# ---------------------------------------------------------------------------------------------
# cache


def load_or_train(config: TrainConfig, data: Dataset, progress: bool = True,
                  root: Path | None = None) -> Run:
    """The cached run for exactly this configuration and data, training (and caching) it if absent.

    The cache folder is ``root`` or ``$RETRAC_CACHE`` (default ``~/.cache/retrac-book``). When it
    cannot be written to, the run is trained and returned with a ``cache.CacheWarning``; a run
    that diverges raises ``runs.TrainingDiverged`` and is never cached.
    """
    folder = Path(root or cache_dir()) / "runs" / run_key(config, data)
    cache.clean_orphans(folder.parent)
    if folder.exists():
        return load_run(folder, config, data)
    can_save = cache.prepare(folder)
    run = train(config, data, progress=progress)
    if can_save and cache.try_save(lambda: save_run(run, folder, exist_ok=True), folder):
        run.path = folder
    return run
