"""Every choice behind a score matrix, as one frozen dataclass, and the names of the choices
(chapters 3 and 4).

``attribute`` and ``load_or_attribute`` build an ``AttributionConfig`` from their keyword
options; ``scoring.plan`` validates it against a run and fills in what the defaults leave open
(all checkpoints, the run's loss, the grid's timesteps). The resolved config is saved with the
scores and is part of their cache key.
"""
from __future__ import annotations

import dataclasses

# The methods of ``methods``: "cosine" is ReTrac's "cosine" placement under its own name.
METHODS = ("tracin", "retrac", "cosine")
# Where ReTrac normalizes the query side: after averaging the K draws of each timestep (the
# paper's official code), each single (t, eps) draw, or once for the fully averaged vector.
QUERY_NORMALIZATIONS = ("per_timestep", "per_draw", "cosine")
TRAIN_SIDES = ("recorded", "fresh_noise", "timestep_average")
# "loop" is the slow reference: one plain backward pass per draw (``engines``).
ENGINES = ("auto", "ghost", "func", "loop")


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
    normalization: str | None = None   # None: ReTrac's "per_timestep"; resolved per method
    loss: str | None = None                      # None: the run's training loss
    projection: int = 0          # k of the CountSketch the scores were computed in; 0 = exact
    projection_seed: int = 0
    noise_per_query: bool = False  # fresh query noise for every query and checkpoint

    def to_dict(self) -> dict:
        d = _as_json(self)
        if not self.projection:  # exact results keep the keys they had before projections existed
            del d["projection"], d["projection_seed"]
        if not self.noise_per_query:  # likewise for shared query noise, the default
            del d["noise_per_query"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AttributionConfig":
        return cls(**_from_json(d))


@dataclasses.dataclass(frozen=True)
class DTrakConfig:
    """Every choice behind a D-TRAK score matrix (``rl.dtrak.attribute_dtrak``'s options,
    resolved), saved with it and part of its cache key."""

    checkpoints: tuple[int, ...]
    timesteps: tuple[int, ...]     # the set S
    proj_dim: int
    damping: float
    seed: int
    output_function: str = "square_norm"   # D-TRAK's f: the squared norm of the predicted noise
    method = "dtrak"

    def to_dict(self) -> dict:
        return {"method": self.method, **_as_json(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "DTrakConfig":
        return cls(**_from_json({k: v for k, v in d.items() if k != "method"}))


def config_from_dict(d: dict):
    """The config a saved score matrix names: a ``DTrakConfig`` for D-TRAK's, else an
    ``AttributionConfig``."""
    return (DTrakConfig if d.get("method") == "dtrak" else AttributionConfig).from_dict(d)


def _as_json(config) -> dict:
    """A config's fields, tuples as lists (as JSON stores them, so keys compare equal)."""
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(config).items()}


def _from_json(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
