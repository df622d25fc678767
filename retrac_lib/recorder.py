"""Record your own diffusers training loop so that ``rl.attribute`` can explain it
(``notebooks/08_your_own_model.ipynb``).

Attribution needs, for every optimizer step, which training samples were in the batch, the
timestep and noise each got and the learning rate; and checkpoints with their learning rate and
visit counts. A few lines added to a loop shaped like diffusers'
``examples/unconditional_image_generation/train_unconditional.py`` record them::

    recorder = rl.Recorder(model, noise_scheduler, train_images, loss="mse", folder="my-run")
    loader = DataLoader(rl.recorder.IndexedDataset(dataset), batch_size=64, shuffle=True)
    for epoch in range(epochs):
        for indices, clean_images in loader:                 # (index, image) pairs
            ...                                              # noise, timesteps, loss, backward
            lr = optimizer.param_groups[0]["lr"]             # the lr this step uses
            optimizer.step(); lr_scheduler.step(); optimizer.zero_grad()
            recorder.step(indices, timesteps, noise, lr, loss=loss.item(), images=clean_images)
        recorder.checkpoint(model)                           # at the steps you choose
    run = recorder.close()                                   # a Run; also written to the folder
    run = rl.recorder.load("my-run")                         # later, in any process

``rl.train`` records the book's runs with the same ``Recorder``. Records (copies of what each
step got) stay in memory until ``close``: the log holds one noise tensor per sample visit
(epochs x N x sample size floats) and each checkpoint a copy of the weights. A ``close`` that
cannot write the folder keeps the recorder open, to ``close(folder=...)`` elsewhere. The
training images must be what the model saw: a loop with random augmentation (flips, crops)
trains on images the recorded set does not contain, and ``step(..., images=...)`` refuses it.
Under accelerate or DDP, record on one process the batch gathered over all processes
(``accelerator.gather``) and pass ``accelerator.unwrap_model(model)``.

The first ``step`` given a ``loss`` is replayed (``Recorder.check_first_loss``): the recorder
recomputes that batch loss from the initial weights it holds, with the declared ``loss`` and
``noise_scheduler`` and the recorded indices, timesteps and noise (one forward pass of one
batch, on the CPU), and refuses a logged loss it does not reproduce: a loop trained with L1 but
recorded as ``loss="mse"``, another scheduler, or a logged loss that is not the mean per-sample
diffusion loss (scaled, e.g. by ``1 / gradient_accumulation_steps``) would give wrong scores.
Only that step can be replayed: it alone ran on weights the recorder holds for sure (after a
checkpoint the loop may go on from other weights than the ones saved, such as EMA weights).
"""
from __future__ import annotations

import numbers
import time
import warnings
from pathlib import Path

import torch

from . import cache, validation
from .config import TrainConfig
from .data import Dataset
from .losses import diffusion_loss
from .models import ModelSpec, build_model, check_samples
from .training import Checkpoint, Run, TrainingDiverged, TrainingLog, load_run, save_run

UNLABELLED = -1
READ_LR_BEFORE = ('Read lr = optimizer.param_groups[0]["lr"] before optimizer.step() and '
                  'lr_scheduler.step().')
REPLAY_TOLERANCE = 1e-3   # relative: float32 replays agree to ~1e-6, another loss misses by >10 %
REPLAY_LOSSES = ("mse", "l1")
REPLAY_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class ZeroLearningRateWarning(UserWarning):
    """A step was recorded with learning rate 0, so checkpoints weighted by it count for nothing."""


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items come with their index: ``(index, dataset[index])``.

    Wrap the dataset your ``DataLoader`` reads, and the default collate hands every batch its
    training-set indices as a tensor, which is what ``Recorder.step`` needs.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]


class Recorder:
    """Records a training run step by step; ``close`` returns it as a ``Run``.

    Args:
        model: the denoiser being trained (a diffusers ``UNet2DModel``, any configuration), its
            weights at this moment are the run's initial weights.
        noise_scheduler: the ``DDPMScheduler`` or ``DDIMScheduler`` whose ``add_noise`` the loop
            uses (any beta schedule; epsilon prediction).
        data: the training set in index order: an ``rl.data.Dataset`` or a tensor
            [N, C, H, W] of the images exactly as the model sees them (``labels`` optional).
        loss: "mse" or "l1": the per-sample loss ``mean |eps_theta(x_t, t) - eps|^p`` the loop
            trains with (``F.mse_loss`` / ``F.l1_loss`` with their default mean reduction).
        folder: where ``close`` writes the run (safetensors and JSON; self-contained, with the
            training images), or None to keep it in memory only (``close(folder=...)`` can
            still write it).
        config: ``rl.train`` passes its ``TrainConfig``; a user's run is described by a
            ``ModelSpec`` built from ``model``, ``noise_scheduler`` and ``loss``.
        replay_tolerance: the relative difference allowed between the first step's logged loss
            and its replay from the initial weights (default ``REPLAY_TOLERANCE``, 1e-3: float32
            and TF32 rounding stay well below it); a loop that computes in reduced precision
            (fp16/bf16 autocast) may need 1e-2; None skips the check, as does dropout in the
            model (its logged loss is random).
    """

    def __init__(self, model, noise_scheduler, data, *, loss: str = "mse", folder=None,
                 labels=None, config=None, replay_tolerance: float | None = REPLAY_TOLERANCE):
        self._start = time.perf_counter()
        self.config = config if config is not None else ModelSpec.of(model, noise_scheduler, loss)
        self.data = _dataset(data, labels)
        check_samples(model, self.data.images, "data")
        self.scheduler = noise_scheduler
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None and self.folder.exists():
            raise FileExistsError(f"{self.folder} exists already: choose a new folder for this run "
                                  "(or delete the old one); a recorded run is never overwritten.")
        self._n_timesteps = noise_scheduler.config.num_train_timesteps
        self._initial = _snapshot(model)
        if replay_tolerance is not None:
            replay_tolerance = validation.real(replay_tolerance, "replay_tolerance", positive=True)
        # dropout makes the logged loss random (the loop trains in train mode), so no replay
        stochastic = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0
                         for m in model.modules())
        self._replay_tolerance = None if stochastic else replay_tolerance
        self.replayed: tuple[float, float] | None = None   # (logged, replayed) first-step loss
        self._layout = {k: (v.shape, v.dtype) for k, v in self._initial.items()}
        self._indices, self._timesteps, self._noise, self._losses, self._lrs = [], [], [], [], []
        self._starts = [0]
        self._seen = torch.zeros(len(self.data), dtype=torch.bool)
        self._visits_since = 0
        self.checkpoints: list[Checkpoint] = []
        self._warned_zero_lr = False
        self.closed = False

    @property
    def n_steps(self) -> int:
        return len(self._losses)

    def step(self, indices, timesteps, noise, lr, *, loss=None, images=None) -> None:
        """Record one optimizer step: the batch's training-set ``indices`` [B], ``timesteps``
        [B] and ``noise`` [B, *sample] as passed to ``add_noise``, and the learning rate ``lr``
        the step used (read it before ``lr_scheduler.step()``). All three are copied, so the loop
        may reuse or shuffle its buffers in place afterwards.

        ``loss`` (the batch loss, a float) is kept for plots; on the first step it is replayed
        from the initial weights and refused when the declared loss or scheduler does not
        reproduce it (``check_first_loss``). ``images`` (the clean batch), when
        given, is checked against the training set at ``indices``. A NaN or infinite ``lr`` is
        refused. ``lr=0`` after a positive lr (not a warm-up that starts at 0) is recorded with a
        ``ZeroLearningRateWarning``, once per recorder: a checkpoint weighted by it adds nothing
        to any score, and such an lr was usually read after ``lr_scheduler.step()``.
        """
        self._check_open("step")
        if indices is None:
            raise ValueError(
                "step() needs the batch's training-set indices. If your DataLoader does not return "
                "them, wrap its dataset in rl.recorder.IndexedDataset to get (index, image) pairs.")
        idx = _integer_vector(indices, "indices")
        n = len(self.data)
        if len(idx) == 0:
            raise ValueError("indices is empty: a step trains on at least one sample.")
        if idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"indices must lie in [0, {n}) (the training set has {n} samples); "
                             f"got values in [{int(idx.min())}, {int(idx.max())}].")
        t = _integer_vector(timesteps, "timesteps")
        if len(t) != len(idx):
            raise ValueError(f"timesteps has {len(t)} entries for a batch of {len(idx)} indices.")
        if t.min() < 0 or t.max() >= self._n_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self._n_timesteps}); got values in "
                             f"[{int(t.min())}, {int(t.max())}].")
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (len(idx), *self.data.sample_shape):
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise has shape {shape}; expected [{len(idx)}, "
                             f"{', '.join(map(str, self.data.sample_shape))}] (one draw per sample).")
        if noise.dtype != self.data.images.dtype:
            raise ValueError(f"noise has dtype {noise.dtype}; the training images are "
                             f"{self.data.images.dtype}. Record the noise add_noise received.")
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 <= lr < float("inf"):
            raise ValueError(f"lr must be the learning rate of this step (a finite number >= 0, "
                             f"0 during warm-up); got {lr!r}. {READ_LR_BEFORE}")
        if images is not None:
            self._check_images(images, idx)
        if loss is not None and not torch.isfinite(torch.as_tensor(float(loss))):
            raise self._diverged(f"the batch loss is {float(loss)}", lr)
        if loss is not None and self.n_steps == 0:
            self.check_first_loss(idx, t, noise, float(loss))
        if lr == 0 and not self._warned_zero_lr and any(self._lrs):
            self._warned_zero_lr = True
            warnings.warn(
                f"lr=0 at optimizer step {self.n_steps}, after positive lrs: checkpoints weighted "
                f"by it add nothing to any score (a run whose checkpoints all have lr 0 scores "
                f"every sample 0). The lr was probably read after lr_scheduler.step() (the next "
                f"step's lr, 0 at the end of a schedule). {READ_LR_BEFORE}",
                ZeroLearningRateWarning, stacklevel=2)
        self._indices.append(idx)
        self._timesteps.append(t)
        self._noise.append(noise.detach().cpu().clone())
        self._losses.append(float("nan") if loss is None else float(loss))
        self._lrs.append(float(lr))
        self._starts.append(self._starts[-1] + len(idx))
        self._seen[idx] = True
        self._visits_since += len(idx)

    def checkpoint(self, model, *, lr: float | None = None, epoch: int | None = None) -> Checkpoint:
        """Save ``model``'s weights now, weighted by ``lr * visits / N``: ``lr`` (default: the last
        step's, near 0 at the end of a schedule that decays to 0) times the samples trained on
        since the previous checkpoint. ``epoch`` defaults to visits // N."""
        self._check_open("checkpoint")
        if self._visits_since == 0:
            raise ValueError("No step was recorded since the last checkpoint: call step() after "
                             "every optimizer step, and checkpoint() after some steps.")
        if not self._seen.all():
            missing = (~self._seen).nonzero().flatten()
            raise ValueError(
                f"{len(missing)} training samples (e.g. {missing[:5].tolist()}) have not been trained "
                "on yet, so they have no recorded timestep and noise for this checkpoint. Checkpoint "
                "at the end of an epoch (and do not drop the last batch before then).")
        params = _snapshot(model)
        bad = [k for k, v in params.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise self._diverged(f"weights {bad[:3]} are NaN or infinite", self._lrs[-1])
        layout = {k: (v.shape, v.dtype) for k, v in params.items()}
        if layout != self._layout:
            diff = sorted(set(layout) ^ set(self._layout)) or [
                k for k in layout if layout[k] != self._layout[k]]
            raise ValueError(
                f"This model's weights do not fit the architecture being recorded (they differ in "
                f"{diff[:3]}). Pass the model you are training (unwrapped from DDP/accelerate).")
        ckpt = Checkpoint(
            index=len(self.checkpoints), step=self.n_steps,
            epoch=int(self._starts[-1] // len(self.data)) if epoch is None else int(epoch),
            lr=self._lrs[-1] if lr is None else float(lr), visits=self._visits_since, params=params)
        self.checkpoints.append(ckpt)
        self._visits_since = 0
        return ckpt

    def close(self, folder=None) -> Run:
        """Finish recording; return the ``Run``, written to ``folder`` (default: the
        constructor's; None for both keeps it in memory only).

        When the run cannot be written (a read-only folder, or one that another run took since
        the recorder was made), the ``OSError`` says so and the recorder stays open with all
        its records: call ``close(folder=...)`` again with a new, writable folder.
        """
        self._check_open("close")
        if not self.checkpoints:
            raise ValueError("No checkpoint was saved: call checkpoint(model) at least once "
                             "(attribution sums over checkpoints).")
        folder = self.folder if folder is None else Path(folder)
        log = TrainingLog(
            torch.cat(self._indices), torch.cat(self._timesteps), torch.cat(self._noise),
            torch.tensor(self._starts), torch.tensor(self._losses, dtype=torch.float64),
            torch.tensor(self._lrs, dtype=torch.float64))
        run = Run(self.config, self.data, self.scheduler, self.checkpoints, log, self._initial,
                  time.perf_counter() - self._start)
        if folder is not None:
            try:
                run.path = save_run(run, folder, with_data=True)
            except OSError as err:
                raise type(err)(
                    f"The recorded run could not be written to {folder} ({type(err).__name__}: "
                    f"{err}). Nothing is lost: the recorder is still open, so call "
                    f"recorder.close(folder=...) with a new, writable folder.") from err
            self.folder = folder
        self.closed = True
        return run

    def check_first_loss(self, indices, timesteps, noise, logged: float) -> None:
        """Recompute the first step's batch loss from the initial weights with the declared loss
        and scheduler; raise a ``ValueError`` when it differs from ``logged`` by more than the
        ``replay_tolerance``, naming a loss or beta schedule that reproduces ``logged`` if one
        does. ``step`` calls it; it stores ``(logged, replayed)`` in ``self.replayed``."""
        if self._replay_tolerance is None:
            return
        model = build_model(self.config, self.data.sample_shape)
        model.load_state_dict(self._initial)
        model.eval()
        x, noise = self.data.images[indices], noise.detach().cpu().to(self.data.images.dtype)

        def replay(loss, scheduler=self.scheduler) -> float:
            with torch.no_grad():
                return diffusion_loss(model, scheduler, x, timesteps, noise, loss).mean().item()

        def matches(value: float) -> bool:
            return abs(value - logged) <= self._replay_tolerance * max(abs(value), abs(logged))

        loss = self.config.loss
        replayed = replay(loss)
        self.replayed = (logged, replayed)
        if matches(replayed):
            return
        schedule = self.scheduler.config.get("beta_schedule")
        declared = (f"loss={loss!r} with this {type(self.scheduler).__name__} "
                    f"(beta_schedule={schedule!r})")
        found = (f"The first step's logged loss {logged:.6g} is not what {declared} gives when "
                 f"the recorder replays that batch from the initial weights: {replayed:.6g} "
                 f"(relative difference {abs(replayed - logged) / max(abs(replayed), 1e-30):.1%},"
                 f" tolerance {self._replay_tolerance:g}). ")
        for other, scheduler in self._alternatives(loss, schedule):
            value = replay(other, scheduler)
            if matches(value):
                also = f", loss={other!r}" if other != loss else ""
                fix = (f"pass loss={other!r}" if scheduler is self.scheduler else
                       f"pass the noise scheduler the loop calls add_noise on (beta_schedule="
                       f"{scheduler.config.beta_schedule!r}{also})")
                raise ValueError(f"{found}{fix.capitalize()}: it reproduces the logged loss "
                                 f"({value:.6g}). Scores with the wrong one are wrong.")
        ratio = logged / replayed if replayed else float("inf")
        raise ValueError(
            f"{found}No supported loss {REPLAY_LOSSES} or beta schedule reproduces it (the logged "
            f"loss is {ratio:.3g} x the replay). Pass step(..., loss=) the mean per-sample "
            "diffusion loss of the batch (loss.item() of F.mse_loss / F.l1_loss with their mean "
            "reduction, not scaled, e.g. by 1 / gradient_accumulation_steps), with loss= and "
            "noise_scheduler those the loop trains with, the model at its initial weights when "
            "the Recorder is made and the batch exactly as trained (no augmentation). A loop in "
            "reduced precision may need a larger replay_tolerance; None skips this check.")

    def _alternatives(self, loss: str, schedule):
        """(loss, scheduler) pairs other than the declared one, the declared scheduler first."""
        for other in REPLAY_LOSSES:
            if other != loss:
                yield other, self.scheduler
        for beta in REPLAY_SCHEDULES:
            if beta != schedule and "beta_schedule" in self.scheduler.config:
                scheduler = type(self.scheduler).from_config(self.scheduler.config,
                                                            beta_schedule=beta)
                for other in REPLAY_LOSSES:
                    yield other, scheduler

    def _diverged(self, what: str, lr) -> TrainingDiverged:
        hint = ("Nothing was cached; lower TrainConfig.lr (the book uses 2e-3)"
                if isinstance(self.config, TrainConfig) else "Nothing was saved; lower the learning rate")
        return TrainingDiverged(f"Training diverged: {what} at optimizer step {self.n_steps} with "
                                f"lr={lr}. {hint} and train again.")

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"This Recorder was closed; {what}() cannot add to a finished run. "
                               "Create a new Recorder to record another run.")

    def _check_images(self, images, idx) -> None:
        images = images.detach().cpu()
        expected = self.data.images[idx]
        if images.shape != expected.shape or not torch.equal(images.to(expected.dtype), expected):
            raise ValueError(
                "The batch images differ from the training set at the given indices: the indices "
                "are wrong, or the loop augments (random flips or crops) or rescales the images. "
                "Pass the training images exactly as the model sees them.")


def load(folder) -> Run:
    """A run written by ``Recorder(..., folder=...)`` (or ``rl.save_run(run, folder,
    with_data=True)``), verified against its manifest."""
    folder = Path(folder)
    _require_run_folder(folder)
    cache.verify_folder(folder)
    if not (folder / "data.safetensors").exists():
        raise ValueError(f"{folder} holds no training images (data.safetensors): it is a cached run "
                         "of rl.train. Load it with rl.load_run(folder, config, data), or write a "
                         "self-contained copy with rl.save_run(run, new_folder, with_data=True).")
    described = cache.read_json(folder / "config.json")
    config = described["config"]
    if config.get("kind") == "recorded":
        spec = ModelSpec(**{k: v for k, v in config.items() if k != "kind"})
    else:
        spec = TrainConfig(**config)
    tensors = cache.load_tensors(folder / "data.safetensors")
    data = Dataset(described["data"]["name"], tensors["images"], tensors["labels"])
    return load_run(folder, spec, data)


RUN_FILES = ("config.json", "weights.safetensors", "log.safetensors")
WRITERS = "rl.Recorder(..., folder=...) or rl.save_run(run, folder, with_data=True)"


def _require_run_folder(folder: Path) -> None:
    """Say plainly what ``folder`` is when it is not a saved run at all."""
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such run folder. Pass the folder that "
                                f"{WRITERS} wrote.")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a run folder. Pass the folder that "
                         f"{WRITERS} wrote.")
    if (folder / "scores.safetensors").exists():
        raise ValueError(f"{folder} holds attribution scores (AttributionResult.save, or the "
                         "command line's --out), not a run: pass the run folder the scores were "
                         "computed from.")
    if not any((folder / name).exists() for name in RUN_FILES):
        raise ValueError(f"{folder} is not a run folder: it holds none of {', '.join(RUN_FILES)}."
                         f" Pass the folder that {WRITERS} wrote.")


def _dataset(data, labels) -> Dataset:
    if isinstance(data, Dataset):
        if labels is not None:
            raise ValueError("Pass labels only with a tensor of images; an rl Dataset has its own.")
        return data
    if not isinstance(data, torch.Tensor) or not data.dtype.is_floating_point:
        raise ValueError("data must be an rl.data.Dataset or a float tensor [N, C, H, W] of the "
                         "training images in index order (as the model sees them).")
    images = data.detach().cpu()
    if labels is None:
        labels = torch.full((len(images),), UNLABELLED, dtype=torch.long)
    return Dataset("recorded", images.contiguous(), torch.as_tensor(labels, dtype=torch.long))


def _integer_vector(values, name: str) -> torch.Tensor:
    t = torch.as_tensor(values).detach().cpu()
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool or t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D tensor of integers, one per sample of the batch; "
                         f"got dtype {t.dtype} and shape {tuple(t.shape)}.")
    return t.to(torch.long, copy=True)   # a copy: the caller may reuse or shuffle its buffer


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
