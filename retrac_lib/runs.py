"""Runs and their storage: checkpoints, the training log, save, load and cache identity.

A ``Run`` is what training produced (``training.train``) or what a user's loop recorded
(``recorder.Recorder``); both write and read it through this module, which imports neither.
For every optimizer step the log keeps which samples were in the batch, the timestep each was
trained at and the exact noise it got; checkpoints keep their step and learning rate.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import diffusers
import torch

from . import cache, validation
from .config import TrainConfig
from .data import Dataset
from .models import build_model, build_scheduler

INIT = "init"  # names the weights before the first optimizer step
WEIGHTS = ("trained", "ema")  # which weights of a checkpoint attribution uses (Run.with_weights)


@dataclasses.dataclass
class Checkpoint:
    """Weights after ``step`` optimizer steps (the end of epoch ``epoch``).

    ``visits`` counts sample visits since the previous checkpoint (steps x batch size when
    every batch is full), so ``weight(N) = lr * visits / N`` is TracIn's ``lr * steps * batch / N``.
    """

    index: int
    step: int
    epoch: int
    lr: float
    visits: int
    params: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None   # the EMA weights at this step, if recorded

    META = ("index", "step", "epoch", "lr", "visits")

    def meta(self) -> dict:
        """The checkpoint without its weights, as ``meta.json`` stores it."""
        return {k: getattr(self, k) for k in self.META}

    def weight(self, n_train: int) -> float:
        """TracIn's checkpoint weight: learning rate times expected visits per sample."""
        return self.lr * self.visits / n_train


@dataclasses.dataclass
class TrainingLog:
    """What every optimizer step saw, stored flat over sample visits.

    Step ``s`` covers visits ``step_starts[s]:step_starts[s + 1]``; ``losses[s]`` is its batch loss.
    """

    indices: torch.Tensor      # [V] long: training-set index of each visit
    timesteps: torch.Tensor    # [V] long
    noise: torch.Tensor        # [V, *sample_shape]
    step_starts: torch.Tensor  # [S + 1] long
    losses: torch.Tensor       # [S] float64
    lrs: torch.Tensor          # [S] float64

    @property
    def n_steps(self) -> int:
        return len(self.losses)

    def step(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, timesteps, noise) of optimizer step ``s``."""
        if not 0 <= s < self.n_steps:
            raise IndexError(f"step {s} out of range: the log has {self.n_steps} steps.")
        a, b = int(self.step_starts[s]), int(self.step_starts[s + 1])
        return self.indices[a:b], self.timesteps[a:b], self.noise[a:b]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass
class Run:
    """A trained run: configuration, data, scheduler, checkpoints, log and initial weights."""

    config: TrainConfig
    data: Dataset
    scheduler: object
    checkpoints: list[Checkpoint]
    log: TrainingLog | None
    initial_params: dict[str, torch.Tensor]
    train_seconds: float
    path: Path | None = None

    def checkpoint_index(self, c, allow_init: bool = False) -> int | str:
        """Checkpoint ``c`` as a non-negative index into ``checkpoints`` (``c`` may count from
        the end); with ``allow_init``, ``"init"`` (the weights before the first step) stays
        ``"init"``."""
        if allow_init and isinstance(c, str):
            if c != INIT:
                raise ValueError(f"checkpoint must be an index into run.checkpoints or {INIT!r}, "
                                 f"got {c!r}.")
            return INIT
        c = validation.integer(c, "checkpoint")
        n = len(self.checkpoints)
        if not -n <= c < n:
            raise IndexError(
                f"Checkpoint {c} does not exist: this run has {n} checkpoints "
                f"(indices 0..{n - 1}, or negative from the end)."
            )
        return c % n

    def model_at(self, c: int) -> torch.nn.Module:
        """The denoiser with checkpoint ``c``'s weights, in eval mode."""
        return self._model(self.checkpoints[self.checkpoint_index(c)].params)

    def initial_model(self) -> torch.nn.Module:
        """The denoiser at initialization (before any step), in eval mode."""
        return self._model(self.initial_params)

    def _model(self, params) -> torch.nn.Module:
        model = build_model(self.config, self.data.sample_shape)
        try:
            model.load_state_dict(params)
        except RuntimeError as err:
            raise ValueError(
                "These weights do not fit the run's model configuration (a checkpoint of another "
                f"architecture?): {str(err).splitlines()[0]}") from err
        return model.eval()

    def recorded(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's last training timestep [N] and noise [N, ...] before checkpoint ``c``."""
        ckpt = self.checkpoints[self.checkpoint_index(c)]
        log = self.require_log()
        n_visits = int(log.step_starts[ckpt.step])
        idx = log.indices[:n_visits]
        last = torch.full((len(self.data),), -1, dtype=torch.long)
        last.scatter_reduce_(0, idx, torch.arange(n_visits), reduce="amax")
        if (last < 0).any():
            missing = (last < 0).nonzero().flatten()[:5].tolist()
            raise ValueError(f"Samples {missing} were never trained before checkpoint {c}.")
        return log.timesteps[last], log.noise[last]

    def with_weights(self, which: str) -> "Run":
        """This run with every checkpoint's ``which`` weights: "trained" (the model's, what
        every function uses by default) or "ema" (the exponential moving average recorded by
        ``Recorder.checkpoint(model, ema=...)``: the weights a diffusers loop with ``--use_ema``
        saves and samples with). The log, lrs and checkpoint weights stay the same; scores of
        the two differ (chapter 8 measures by how much), and their cache keys too."""
        validation.choice(which, "which", WEIGHTS)
        if which == "trained":
            return self
        missing = [c.index for c in self.checkpoints if c.ema is None]
        if missing:
            raise ValueError(f"Checkpoints {missing} hold no EMA weights: record them with "
                             "recorder.checkpoint(model, ema=ema_model), or use 'trained'.")
        checkpoints = [dataclasses.replace(c, params=c.ema, ema=None) for c in self.checkpoints]
        return dataclasses.replace(self, checkpoints=checkpoints)

    def require_log(self) -> TrainingLog:
        if self.log is None:
            raise ValueError(
                "This run has no training log, so the timesteps and noise each sample was "
                "trained with are unknown. Train it with rl.load_or_train, which records them."
            )
        return self.log

    def checkpoint_weights(self) -> torch.Tensor:
        """``lr * visits / N`` for every checkpoint: its lr (by default the last step's) times
        the samples trained on since the previous checkpoint (a partial batch counts its size)."""
        return torch.tensor([c.weight(len(self.data)) for c in self.checkpoints],
                            dtype=torch.float64)

    @property
    def losses(self) -> torch.Tensor:
        """Batch loss of every optimizer step."""
        return self.require_log().losses

    def fingerprint(self) -> str:
        """SHA-256 of what training produced: the initial and checkpoint weights, the checkpoints'
        steps, learning rates and visits, and the training log."""
        states = [self.initial_params] + [c.params for c in self.checkpoints]
        weights = [params[k] for params in states for k in sorted(params)]
        log = list(self.require_log().to_tensors().values())
        meta = [[c.index, c.step, c.epoch, c.lr, c.visits] for c in self.checkpoints]
        return cache.key_for({"tensors": cache.tensor_fingerprint(*weights, *log),
                              "checkpoints": meta})


class TrainingDiverged(FloatingPointError):
    """The loss or the weights became NaN or infinite: the run is useless and is not cached."""


def run_key(config: TrainConfig, data: Dataset) -> str:
    return cache.key_for({"kind": "run", "config": config.to_dict(), "data": data.fingerprint(),
                          "diffusers": diffusers.__version__})


def run_identity(run: Run) -> dict:
    """What identifies ``run``'s weights and log in a key: its configuration and data, and for a
    run no ``TrainConfig`` determines (``rl.Recorder``: a user's loop, whose seed and learning
    rate no config records) also ``run.fingerprint()``, the digest of its weights and log."""
    identity = {"run": run_key(run.config, run.data)}
    if not isinstance(run.config, TrainConfig):
        identity["trained"] = run.fingerprint()
    return identity


def _describe(config: TrainConfig, data: Dataset) -> dict:
    return {"config": config.to_dict(), "data": {"name": data.name, "n": len(data),
                                                 "fingerprint": data.fingerprint()}}


def save_run(run: Run, folder: Path, with_data: bool = False, *, exist_ok: bool = False) -> Path:
    """Write ``run`` atomically to ``folder`` (safetensors weights and log, JSON metadata);
    ``with_data`` adds the training set, so the folder loads on its own (recorded runs).

    An existing ``folder`` is an error, since it may hold another run; ``exist_ok=True`` (the
    cache, where a concurrent writer of the same configuration may finish first) keeps it.
    """
    with cache.atomic_folder(folder, exist_ok=exist_ok) as tmp:
        write_run_header(run.config, run.data, tmp, with_data)
        write_run_records(run, tmp)
    return Path(folder)


RECORD_FILES = ("weights.safetensors", "log.safetensors", "meta.json")


def write_run_header(config, data: Dataset, folder: Path, with_data: bool) -> list[str]:
    """What a run is of, known before training: ``config.json`` (and the training set); the
    names written."""
    cache.write_json(folder / "config.json", _describe(config, data))
    if with_data:
        cache.save_tensors(folder / "data.safetensors", {"images": data.images,
                                                         "labels": data.labels})
    return ["config.json"] + (["data.safetensors"] if with_data else [])


def write_run_records(run: Run, folder: Path) -> list[str]:
    """What training produced: weights, log and checkpoint metadata (``RECORD_FILES``)."""
    weights = {f"init/{k}": v for k, v in run.initial_params.items()}
    for c in run.checkpoints:
        weights.update({f"c{c.index}/{k}": v for k, v in c.params.items()})
        if c.ema is not None:
            weights.update({f"c{c.index}.ema/{k}": v for k, v in c.ema.items()})
    cache.save_tensors(folder / "weights.safetensors", weights)
    cache.save_tensors(folder / "log.safetensors", run.require_log().to_tensors())
    cache.write_json(folder / "meta.json", {
        "train_seconds": run.train_seconds,
        "checkpoints": [c.meta() for c in run.checkpoints],
    })
    return list(RECORD_FILES)


def load_run(folder: Path, config: TrainConfig, data: Dataset) -> Run:
    """Load a saved run, refusing it unless it was trained with exactly ``config`` on ``data``."""
    folder = Path(folder)
    cache.verify_folder(folder)
    saved = cache.read_json(folder / "config.json")
    wanted = _describe(config, data)
    same_data = saved["data"]["fingerprint"] == wanted["data"]["fingerprint"]
    if saved["config"] != wanted["config"] or not same_data:
        changed = sorted(k for k in wanted["config"]
                         if saved["config"].get(k) != wanted["config"][k])
        if not same_data:
            changed.append("data")
        todo = ("Pass the matching config, or delete the folder to retrain."
                if cache.recomputable(folder) else "Pass the config and data it was trained with.")
        raise cache.CacheError(
            f"The run in {folder} was trained with a different configuration (differs in: "
            f"{', '.join(changed)}). {todo}")
    weights = cache.load_tensors(folder / "weights.safetensors")
    meta = cache.read_json(folder / "meta.json")
    checkpoints = [Checkpoint(**m, params=_prefixed(weights, f"c{m['index']}/"),
                              ema=_prefixed(weights, f"c{m['index']}.ema/") or None)
                   for m in meta["checkpoints"]]
    initial = _prefixed(weights, "init/")
    log = TrainingLog(**cache.load_tensors(folder / "log.safetensors"))
    return Run(config, data, build_scheduler(config), checkpoints, log, initial,
               meta["train_seconds"], folder)


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
