"""Every choice behind a score matrix, as one frozen dataclass (chapters 3 and 4).

``attribute`` and ``load_or_attribute`` build an ``AttributionConfig`` from their keyword
options; ``resolve`` validates it against a run and fills in what the defaults leave open (all
checkpoints, the run's loss, the grid's timesteps). The resolved config is saved with the scores
and is part of their cache key.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import validation
from ..losses import check_loss
from ..models import check_samples
from ..timesteps import parse_timesteps, query_noise_draws

METHODS = ("tracin", "retrac")
# Where ReTrac normalizes the query side: after averaging the K draws of each timestep (the
# paper's official code), each single (t, eps) draw, or once for the fully averaged vector.
QUERY_NORMALIZATIONS = ("per_timestep", "per_draw", "cosine")
TRAIN_SIDES = ("recorded", "fresh_noise", "timestep_average")
ENGINES = ("auto", "ghost", "func")


@dataclasses.dataclass(frozen=True)
class AttributionConfig:
    """The options of ``attribute`` (see its docstring); once resolved, every choice behind a
    score matrix, saved with it and part of its cache key."""

    method: str = "retrac"
    checkpoints: tuple[int, ...] | None = None   # None: every checkpoint of the run
    timesteps: int | tuple[int, ...] = 100       # a count of evenly spaced timesteps, or a list
    n_noise: int = 16
    noise_seed: int = 0
    train_side: str = "recorded"
    normalization: str = "per_timestep"          # "none" once resolved for TracIn
    loss: str | None = None                      # None: the run's training loss
    projection: int = 0          # k of the CountSketch the scores were computed in; 0 = exact
    projection_seed: int = 0
    noise_per_query: bool = False  # fresh query noise for every query and checkpoint

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        if not self.projection:  # exact results keep the keys they had before projections existed
            del d["projection"], d["projection_seed"]
        if not self.noise_per_query:  # likewise for shared query noise, the default
            del d["noise_per_query"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AttributionConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def resolve(self, run, queries, query_noise=None, allow_out_of_range=False
                ) -> tuple["AttributionConfig", torch.Tensor, torch.Tensor]:
        """Validate these options for ``run`` and ``queries``; return the resolved config, the
        timestep grid [T'] and the shared query noise [T', K, *sample].

        ``projection`` and ``projection_seed`` stay as given: ``scoring`` sets them from the
        call's ``projection`` (``sketch.projection_size``). Queries on another scale than the
        training data are refused (``validation.data_range``), or with ``allow_out_of_range``
        scored with a warning.
        """
        run.require_log()
        validation.choice(self.method, "method", METHODS)
        validation.choice(self.normalization, "normalization", QUERY_NORMALIZATIONS)
        validation.choice(self.train_side, "train_side", TRAIN_SIDES)
        loss = self.loss or run.config.loss
        check_loss(loss)
        checkpoints = validation.checkpoints(self.checkpoints, len(run.checkpoints))
        model = run.model_at(checkpoints[0])
        check_samples(model, validation.tensor(queries, "queries"), "queries")
        dtype = next(model.parameters()).dtype
        validation.float_samples(queries, "queries", dtype)
        if len(queries) == 0:
            raise ValueError("queries is empty: pass at least one query, shape [Q, *sample] with Q >= 1.")
        validation.data_range(queries, run.data.images, "queries",
                              validation.flag(allow_out_of_range, "allow_out_of_range"))
        n_noise = validation.n_noise(self.n_noise)
        validation.integer(self.noise_seed, "noise_seed", 0)
        if self.noise_per_query and query_noise is not None:
            raise ValueError("noise_per_query=True draws fresh noise for every query; pass either it "
                             "or query_noise, not both.")
        grid = parse_timesteps(self.timesteps, run.scheduler.config.num_train_timesteps)
        if query_noise is None:
            validation.grid_memory(len(grid), n_noise, run.data.sample_shape,
                                   len(queries) if self.noise_per_query else 1)
        noise = (query_noise_draws(run.data.sample_shape, len(grid), n_noise, self.noise_seed)
                 if query_noise is None else
                 validation.query_noise(query_noise, len(grid), run.data.sample_shape, dtype))
        resolved = dataclasses.replace(
            self, checkpoints=checkpoints, timesteps=tuple(grid.tolist()), n_noise=noise.shape[1],
            normalization=self.normalization if self.method == "retrac" else "none", loss=loss,
            noise_per_query=bool(self.noise_per_query))
        return resolved, grid, noise
