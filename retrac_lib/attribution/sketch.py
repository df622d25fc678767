"""Training gradients stored once, CountSketch-projected (``rl.projection``; the solution of
chapter 4b's exercise on query-grid cost points here).

To score many query sets against one run, ``sketch_training`` stores every ``g_c(x_i)``
projected to ``k`` dimensions, and ``attribute(..., projection=sketch)`` scores against them:
approximate, rank agreement measured in ``benchmarks/bench_projection.py``.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from .. import models, validation
from ..losses import check_loss
from ..projection import CountSketch
from ..runs import run_identity
from ..timesteps import parse_timesteps
from .options import TRAIN_SIDES
from .engines import FuncEngine
from .sides import TrainingGradients


@dataclasses.dataclass
class TrainingSketch:
    """Training gradients of a run stored once, CountSketch-projected to ``k`` dimensions.

    ``sketches`` [C, N, k] holds ``S g_c(x_i)`` (unnormalized, so one sketch serves TracIn and
    ReTrac) and ``norms`` [C, N] the exact ``|g_c(x_i)|``. C x N x k floats instead of the
    C x N x P that storing exact gradients would take; ``attribute(..., projection=sketch)``
    scores any queries against it without recomputing training gradients.
    """

    sketches: torch.Tensor
    norms: torch.Tensor
    checkpoints: tuple[int, ...]
    timesteps: tuple[int, ...]
    train_side: str
    loss: str
    noise_seed: int
    k: int
    seed: int
    n_params: int
    run: str   # the run it was built from (``_identity``)

    @property
    def nbytes(self) -> int:
        return self.sketches.numel() * self.sketches.element_size()

    def projector(self) -> CountSketch:
        return CountSketch(self.n_params, self.k, self.seed)

    def check_matches(self, run, config) -> None:
        """Refuse to score with a sketch of another run or other training-side options
        (``config``: a resolved ``AttributionConfig``)."""
        wanted = dict(run=_identity(run), train_side=config.train_side,
                      loss=config.loss, noise_seed=config.noise_seed)
        if config.train_side == "timestep_average":
            wanted["timesteps"] = config.timesteps
        have = {key: getattr(self, key) for key in wanted}
        missing = [c for c in config.checkpoints if c not in self.checkpoints]
        if have != wanted or missing:
            diff = {k: (have[k], wanted[k]) for k in wanted if have[k] != wanted[k]}
            raise ValueError(
                f"This TrainingSketch does not fit the call: (sketch, call) differ in {diff}"
                + (f"; checkpoints {missing} were not sketched" if missing else "")
                + ". Build it with sketch_training for this run and these options."
            )


def _identity(run) -> str:
    """The run a sketch belongs to: its key, and for a recorded run its weights' digest."""
    return ":".join(run_identity(run).values())


def projection_size(projection, seed, name: str = "projection_seed") -> tuple[int, int]:
    """``(k, seed)`` of ``projection``: None (exact: ``(0, 0)``), an int ``k`` or a sketch;
    ``seed`` (called ``name`` in errors) must be a non-negative integer."""
    if projection is None:
        return 0, 0
    if isinstance(projection, TrainingSketch):
        return projection.k, projection.seed
    if isinstance(projection, bool) or not isinstance(projection, int) or projection < 1:
        raise ValueError(f"projection must be None, a positive int k or a TrainingSketch; "
                         f"got {projection!r}.")
    return projection, validation.integer(seed, name, 0)


def sketch_training(run, k: int, *, checkpoints=None, timesteps=100, train_side: str = "recorded",
                    loss: str | None = None, noise_seed: int = 0, seed: int = 0,
                    chunk_size: int = 64, device=None, progress: bool = True) -> TrainingSketch:
    """Every training gradient ``g_c(x_i)`` of ``run``, CountSketch-projected to ``k`` dimensions.

    Streams the gradients in chunks of ``chunk_size`` (memory: one chunk x P plus the C x N x k
    result); the options mean what they mean in ``attribute``.
    """
    validation.choice(train_side, "train_side", TRAIN_SIDES)
    k, seed = projection_size(k, seed, "seed")
    chunk_size, device = validation.chunk_size(chunk_size), validation.device(device)
    validation.integer(noise_seed, "noise_seed", 0)
    run.require_log()
    loss = loss or run.config.loss
    check_loss(loss)
    checkpoints = validation.checkpoints(checkpoints, len(run.checkpoints))
    grid = parse_timesteps(timesteps, run.scheduler.config.num_train_timesteps)
    n = len(run.data)
    n_params = models.n_params(run.model_at(checkpoints[0]))
    project = CountSketch(n_params, k, seed)
    sketches = torch.zeros(len(checkpoints), n, k)
    norms = torch.zeros(len(checkpoints), n)
    training = TrainingGradients(run, train_side, grid, noise_seed)
    bar = tqdm(total=len(checkpoints) * -(-n // chunk_size), desc="sketch", disable=not progress)
    for j, c in enumerate(checkpoints):
        engine = FuncEngine(run.model_at(c).to(device), run.scheduler, loss)
        for idx, g in training.rows(engine, c, chunk_size):
            norms[j, idx] = g.norm(dim=1).cpu()
            sketches[j, idx] = project(g).cpu()
            bar.update()
    bar.close()
    return TrainingSketch(sketches, norms, checkpoints, tuple(grid.tolist()), train_side, loss,
                          noise_seed, k, seed, n_params, _identity(run))
