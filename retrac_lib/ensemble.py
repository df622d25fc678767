"""Many small retrains at once, on any device: ``train_many``.

Counterfactual tests retrain one configuration hundreds of times, on training sets of one size
(half-size LDS subsets, removal sets). A tiny UNet at batch 32 keeps a GPU waiting on kernel
launches, so ``train_many`` trains M such models together: their weights are stacked
(``torch.func.stack_module_state``) and one vmapped ``functional_call`` runs every member's
batch. Each member gets exactly the random draws ``training.train`` makes for it alone
(``training.epoch_draws`` from its own generator seeded by its ``config.seed``, drawn on the CPU
and moved, so a GPU trains on the same draws; its initial weights from ``build_model``). The
members' mean batch losses are summed, so each member's gradient is its own, and one Adam over
the stacked weights is M separate Adams (Adam is elementwise). The weights agree with
``train``'s to float32 rounding, not bit for bit: vmapped convolutions round differently. On a
GPU it computes in full float32 (``full_float32``: no TF32), like the CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.func import functional_call, stack_module_state, vmap
from tqdm.auto import tqdm

from . import seeding, validation
from .config import TrainConfig
from .data import Dataset
from .losses import diffusion_loss
from .models import build_model, build_scheduler
from .runs import TrainingDiverged
from .training import _lr_at, epoch_draws

__all__ = ["Ensemble", "train_many", "full_float32"]


@dataclasses.dataclass
class Ensemble:
    """M models trained together: member ``m`` is ``configs[m]`` trained on its own data.

    ``params`` and ``buffers`` hold the final weights stacked over members ([M, ...], on
    ``device``); ``losses`` [S, M] (float64, CPU) every step's batch loss of each member.
    """

    configs: tuple[TrainConfig, ...]
    sample_shape: tuple[int, ...]
    scheduler: object
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    losses: torch.Tensor
    train_seconds: float
    device: torch.device

    def __len__(self) -> int:
        return len(self.configs)

    def state_dict(self, m: int) -> dict[str, torch.Tensor]:
        """Member ``m``'s final weights as a CPU state dict (``Run.checkpoints[-1].params``)."""
        m = validation.integer(m, "m")
        if not 0 <= m < len(self):
            raise IndexError(f"member {m} out of range: this ensemble has {len(self)} members.")
        return {k: v[m].detach().cpu().clone() for k, v in {**self.params, **self.buffers}.items()}

    def model(self, m: int) -> torch.nn.Module:
        """Member ``m``'s denoiser with its final weights, on ``device``, in eval mode."""
        model = build_model(self.configs[m], self.sample_shape)
        model.load_state_dict(self.state_dict(m))
        return model.to(self.device).eval()


def train_many(configs, datasets, device="cpu", progress: bool = False) -> Ensemble:
    """Train ``configs[m]`` on ``datasets[m]`` for every member m at once, on ``device``.

    The configs may differ in their seed only, and the datasets must have one size and sample
    shape (group retrains by size). Member m's draws and initial weights are those of
    ``training.train(configs[m], datasets[m])``; no log or checkpoint is kept, only the final
    weights. Raises ``TrainingDiverged`` naming the member when a loss or weight is NaN or
    infinite (checked after every epoch).
    """
    configs, datasets = _check_members(configs, datasets)
    device = validation.device(device)
    start = time.perf_counter()
    config, n, shape = configs[0], len(datasets[0]), datasets[0].sample_shape
    models = [build_model(c, shape) for c in configs]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    base = models[0].to(device).train()   # the structure: functional_call swaps weights in
    scheduler = build_scheduler(config)
    images = torch.stack([d.images for d in datasets]).to(device)          # [M, N, *shape]
    member = torch.arange(len(configs), device=device)[:, None]
    gens = [seeding.generator(c.seed) for c in configs]
    draws = (step for _ in range(config.epochs)      # each member's own draws, as train's
             for step in zip(*(epoch_draws(c, n, shape, g) for c, g in zip(configs, gens))))
    optimizer = torch.optim.Adam(params.values(), lr=config.lr)

    def member_loss(p, b, x, t, eps):
        model = lambda x_t, t_: functional_call(base, (p, b), (x_t, t_))
        return diffusion_loss(model, scheduler, x, t, eps, config.loss).mean()

    batched_loss = vmap(member_loss)
    per_epoch = math.ceil(n / config.batch_size)
    total = config.epochs * per_epoch
    losses = torch.empty(total, len(configs), dtype=torch.float64, device=device)
    with tqdm(total=total, desc=f"training {len(configs)} models", disable=not progress) as bar, \
            full_float32():
        for step, batch in enumerate(_prefetched(draws, pin=device.type == "cuda")):
            idx, t, eps = (v.to(device, non_blocking=True) for v in batch)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(config, step, total)
            loss = batched_loss(params, buffers, images[member, idx], t, eps)   # [M]
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()   # summed, not averaged: each member gets its own gradient
            optimizer.step()
            losses[step] = loss.detach()
            bar.update()
            if (step + 1) % per_epoch == 0:
                _check_finite(losses[:step + 1], params, configs)
    losses = losses.cpu()
    return Ensemble(tuple(configs), tuple(shape), scheduler,
                    {k: v.detach() for k, v in params.items()}, buffers, losses,
                    time.perf_counter() - start, device)


@contextlib.contextmanager
def full_float32():
    """Float32 convolutions and matmuls on CUDA (no TF32) inside the block, as on the CPU;
    ``train_many`` trains in it, and the ledger measures its retrains' query losses in it."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _prefetched(steps, pin: bool):
    """The members' draws of each step of ``steps``, stacked ([M, B, ...], pinned for a fast
    copy to a GPU when ``pin``); the next step's are drawn in a thread while this one trains."""
    def draw():
        step = next(steps, None)
        if step is None:
            return None
        stacked = [torch.stack(v) for v in zip(*step)]
        return [v.pin_memory() for v in stacked] if pin else stacked

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(draw)
        while (batch := future.result()) is not None:
            future = pool.submit(draw)
            yield batch


def _check_members(configs, datasets) -> tuple[list[TrainConfig], list[Dataset]]:
    """The members as lists, refusing what cannot train together with a message naming the
    argument and what to do."""
    if isinstance(configs, TrainConfig) or not isinstance(configs, (list, tuple)) or not configs:
        raise ValueError("configs must be a non-empty list of TrainConfig, one per member.")
    if not isinstance(datasets, (list, tuple)) or len(datasets) != len(configs):
        got = len(datasets) if isinstance(datasets, (list, tuple)) else type(datasets).__name__
        raise ValueError(f"datasets must be a list of {len(configs)} Dataset, one per config; "
                         f"got {got}.")
    for name, values, kind in (("configs", configs, TrainConfig), ("datasets", datasets, Dataset)):
        for m, v in enumerate(values):
            if not isinstance(v, kind):
                raise ValueError(f"{name}[{m}] is a {type(v).__name__}, not a {kind.__name__}.")
    first = configs[0].to_dict()
    for m, c in enumerate(configs[1:], 1):
        differ = [k for k, v in c.to_dict().items() if k != "seed" and v != first[k]]
        if differ:
            raise ValueError(f"configs[{m}] differs from configs[0] in {', '.join(differ)}: the "
                             "members of one ensemble share everything but the seed "
                             "(architecture, epochs, batch size, lr); train such members in "
                             "separate ensembles.")
    d0 = datasets[0]
    if len(d0) == 0:
        raise ValueError("datasets[0] is empty: training needs at least one sample.")
    for m, d in enumerate(datasets[1:], 1):
        if len(d) != len(d0):
            raise ValueError(f"datasets[{m}] has {len(d)} samples but datasets[0] has {len(d0)}: "
                             "the members of one ensemble train on sets of one size (their "
                             "batches line up step by step); group the sets by size.")
        if d.sample_shape != d0.sample_shape or d.images.dtype != d0.images.dtype:
            raise ValueError(f"datasets[{m}] holds {d.images.dtype} samples of shape "
                             f"{tuple(d.sample_shape)} but datasets[0] {d0.images.dtype} of "
                             f"{tuple(d0.sample_shape)}: one architecture takes one kind of "
                             "sample.")
    return list(configs), list(datasets)


def _check_finite(losses: torch.Tensor, params: dict, configs) -> None:
    """Raise ``TrainingDiverged`` for the first member whose losses or weights are not finite."""
    bad = ~torch.isfinite(losses).all(0)
    for v in params.values():
        bad |= ~torch.isfinite(v.detach().flatten(1)).all(1)
    if bad.any():
        m = int(bad.nonzero()[0])
        raise TrainingDiverged(f"Training diverged: member {m} (seed {configs[m].seed}) has a NaN "
                               f"or infinite loss or weight by step {len(losses)}. Lower "
                               "TrainConfig.lr (the book uses 2e-3) and train again.")
