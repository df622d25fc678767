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

``rl.train`` records the book's runs with the same ``Recorder`` (in memory). Given a folder, the
recorder streams its records there as training goes (``retrac_lib.journal``: a shard every
``flush_every`` optimizer steps, each checkpoint as it is taken, all written atomically and
listed with their SHA-256), so a crashed run keeps everything up to its last flush;
``Recorder.resume`` goes on from the loop's own saved training state (accelerate's
``save_state``), discarding the stopped attempt's later records, and a recording that was never
closed is refused by ``load`` (``IncompleteRunError``). A ``close`` that cannot write the folder
keeps the recorder open, to ``close(folder=...)`` elsewhere. The training images must be what
the model saw: a loop with random augmentation (flips, crops) trains on images the recorded set
does not contain, and ``step(..., images=...)`` refuses it. Under accelerate or DDP, pass
``shared=True`` and let every process record its share of each step (rank 0 merges them), or
record on one process the batch gathered over all processes; pass
``accelerator.unwrap_model(model)``. With gradient accumulation a recorded step is an optimizer
step: ``step(..., sync=accelerator.sync_gradients)``. ``checkpoint(model, ema=ema_model)``
keeps diffusers' EMA weights too (``run.with_weights("ema")``).

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

import dataclasses
import numbers
import time
import warnings
from pathlib import Path

import torch

from . import cache, journal, validation
from .config import TrainConfig
from .data import Dataset
from .losses import diffusion_loss
from .models import ModelSpec, build_model, check_samples
from .runs import Checkpoint, Run, TrainingDiverged, TrainingLog, load_run, save_run

IncompleteRunError = journal.IncompleteRunError
UNLABELLED = -1
READ_LR_BEFORE = ('Read lr = optimizer.param_groups[0]["lr"] before optimizer.step() and '
                  'lr_scheduler.step().')
REPLAY_TOLERANCE = 1e-3   # relative: float32 replays agree to ~1e-6, another loss misses by >10 %
REPLAY_LOSSES = ("mse", "l1")
REPLAY_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
FLUSH_EVERY = 100   # optimizer steps between flushes of a recording to its folder


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
            uses (any beta schedule; epsilon prediction: ``prediction_type="v_prediction"`` is
            refused).
        data: the training set in index order: an ``rl.data.Dataset`` or a tensor
            [N, C, H, W] of the images exactly as the model sees them (``labels`` optional).
        loss: "mse" or "l1": the per-sample loss ``mean |eps_theta(x_t, t) - eps|^p`` the loop
            trains with (``F.mse_loss`` / ``F.l1_loss`` with their default mean reduction).
        folder: where the run is recorded, streamed as training goes (``retrac_lib.journal``):
            every ``flush_every`` optimizer steps, at every checkpoint and at ``flush()``, so a
            crash loses at most the steps since the last flush and ``Recorder.resume`` goes on
            from there; ``close`` makes it a complete run. None keeps everything in memory
            (``close(folder=...)`` can still write it).
        flush_every: optimizer steps between flushes to ``folder``.
        shared: every process of the initialized ``torch.distributed`` group (accelerate,
            DDP, torchrun) makes the recorder and calls ``step`` with its own share of the
            batch, and ``checkpoint``, ``flush`` and ``close`` at the same points; rank 0 merges
            the shares of each step (in rank order) and writes the run. An error on any process
            is raised on all of them.
        config: ``rl.train`` passes its ``TrainConfig``; a user's run is described by a
            ``ModelSpec`` built from ``model``, ``noise_scheduler`` and ``loss``.
        replay_tolerance: the relative difference allowed between the first step's logged loss
            and its replay from the initial weights (default ``REPLAY_TOLERANCE``, 1e-3: float32
            and TF32 rounding stay well below it); a loop that computes in reduced precision
            (fp16/bf16 autocast) may need 1e-2; None skips the check, as does dropout in the
            model (its logged loss is random).
    """

    def __init__(self, model, noise_scheduler, data, *, loss: str = "mse", folder=None,
                 flush_every: int = FLUSH_EVERY, shared: bool = False, labels=None,
                 config=None, replay_tolerance: float | None = REPLAY_TOLERANCE):
        self._start = time.perf_counter()
        self.config = config if config is not None else ModelSpec.of(model, noise_scheduler, loss)
        self.data = _dataset(data, labels)
        check_samples(model, self.data.images, "data")
        self.scheduler = noise_scheduler
        self.flush_every = validation.integer(flush_every, "flush_every", 1)
        self.shared = _shared(shared)
        self._writes = not self.shared or torch.distributed.get_rank() == 0
        self.folder = None if folder is None else Path(folder)
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
        self._pending = {k: [] for k in ("indices", "timesteps", "noise")}  # not yet flushed
        self._micro: list[tuple] = []        # this optimizer step's micro-batches so far
        self._sizes, self._losses, self._lrs = [], [], []   # every step's (scalars)
        self._flushed = 0
        self._seen = torch.zeros(len(self.data), dtype=torch.bool)
        self._visits_since = 0
        self.checkpoints: list[Checkpoint] = []
        self._warned_zero_lr = False
        self.closed = False
        self._journal = None
        if self.folder is not None:
            self._journal = self._on_rank0(self._create)

    def _create(self) -> dict:
        if self.folder.exists():
            raise FileExistsError(f"{self.folder} exists already: choose a new folder for this "
                                  "run (or delete the old one); a recorded run is never "
                                  "overwritten. To go on with a recording whose training "
                                  "stopped, use rl.Recorder.resume.")
        return journal.create(self.folder, self.config, self.data, self._initial)

    @classmethod
    def resume(cls, folder, model, noise_scheduler, *, step: int, loss: str = "mse",
               flush_every: int = FLUSH_EVERY, shared: bool = False) -> "Recorder":
        """Go on recording ``folder`` after its training stopped (a crash, a kill, a preempted
        session), from the training state the loop resumes at: ``step`` is its optimizer step
        (accelerate's ``checkpoint-<step>``, the diffusers example's ``global_step``) and
        ``model`` the model restored from it. The records of later steps (the stopped attempt's)
        are discarded; a recorded checkpoint at ``step`` must hold ``model``'s weights. Steps
        after the last flush are lost, so resume from a state saved at or before it (call
        ``flush()`` right after saving the training state)."""
        folder = Path(folder)
        _require_recording(folder)
        step = validation.integer(step, "step", 0, why=" It is the optimizer step of the "
                                                       "training state you resume from.")
        data = cache.load_tensors(folder / "data.safetensors")
        name = cache.read_json(folder / "config.json")["data"]["name"]
        rec = cls(model, noise_scheduler, Dataset(name, data["images"], data["labels"]),
                  loss=loss, flush_every=flush_every, shared=shared, replay_tolerance=None)
        state = rec._on_rank0(lambda: rec._continue(folder, step, model), share=True)
        rec._sizes, rec._losses, rec._lrs = state
        rec._flushed = rec.n_steps
        rec.folder = folder
        return rec

    def _continue(self, folder: Path, step: int, model) -> tuple[list, list, list]:
        """Rank 0's part of ``resume``: check the recording against the model and ``step``,
        cut it at ``step`` and take its state; the scalars of every step are returned."""
        written = journal.read(folder)
        saved = cache.read_json(folder / "config.json")["config"]
        if saved != self.config.to_dict():
            differ = sorted(k for k in set(saved) | set(self.config.to_dict())
                            if saved.get(k) != self.config.to_dict().get(k))
            raise ValueError(f"The recording {folder} is of another model, noise scheduler or "
                             f"loss (differs in: {', '.join(differ)}). Pass the model, "
                             "noise_scheduler and loss the recording was made with.")
        flushed = journal.flushed_steps(written)
        if step > flushed:
            raise ValueError(
                f"The recording {folder} holds the first {flushed} optimizer steps, but training "
                f"resumes at step {step}: the records of steps {flushed}..{step - 1} were lost "
                f"when training stopped. Resume from a training state saved at or before step "
                f"{flushed} (call recorder.flush() right after saving the training state, or "
                f"set flush_every to your checkpointing interval), or start a new recording.")
        for entry in written["checkpoints"]:
            if entry["step"] == step and not all(
                    torch.equal(v, journal.load_checkpoint(folder, entry).params[k])
                    for k, v in _snapshot(model).items()):
                raise ValueError(f"model does not hold the weights the recorder saved at step "
                                 f"{step} (checkpoint {entry['index']}): restore the training "
                                 f"state of step {step} into the model before resuming.")
        self._journal = journal.truncate(folder, written, step)
        steps = journal.load_steps(folder, self._journal)
        self.checkpoints = [Checkpoint(**{k: e[k] for k in Checkpoint.META}, params={})
                            for e in self._journal["checkpoints"]]   # weights read at close
        self._initial = journal.load_initial(folder)
        sizes = steps.get("sizes", torch.zeros(0, dtype=torch.long))
        if len(sizes):
            self._seen[steps["indices"]] = True
        last = self.checkpoints[-1].step if self.checkpoints else 0
        self._visits_since = int(sizes[last:].sum())
        return (sizes.tolist(), steps.get("losses", sizes.double()).tolist(),
                steps.get("lrs", sizes.double()).tolist())

    @property
    def n_steps(self) -> int:
        return len(self._sizes)

    def step(self, indices, timesteps, noise, lr, *, loss=None, images=None,
             sync: bool = True) -> None:
        """Record one optimizer step: the batch's training-set ``indices`` [B], ``timesteps``
        [B] and ``noise`` [B, *sample] as passed to ``add_noise``, and the learning rate ``lr``
        the step used (read it before ``lr_scheduler.step()``). All three are copied, so the loop
        may reuse or shuffle its buffers in place afterwards.

        With gradient accumulation call it for every micro-batch with ``sync`` False until the
        one whose gradients the optimizer applies (``sync=accelerator.sync_gradients``): the
        recorded step is the optimizer step, holding all its micro-batches (with ``shared``,
        every process's), and its loss their mean over samples.

        ``loss`` (the batch loss, a float) is kept for plots; on the first step it is replayed
        from the initial weights and refused when the declared loss or scheduler does not
        reproduce it (``check_first_loss``). ``images`` (the clean batch), when
        given, is checked against the training set at ``indices``. A NaN or infinite ``lr`` is
        refused. ``lr=0`` after a positive lr (not a warm-up that starts at 0) is recorded with a
        ``ZeroLearningRateWarning``, once per recorder: a checkpoint weighted by it adds nothing
        to any score, and such an lr was usually read after ``lr_scheduler.step()``.
        """
        self._check_open("step")
        if not isinstance(sync, bool):
            raise ValueError(f"sync must be True or False (accelerator.sync_gradients), got "
                             f"{sync!r}.")
        self._micro += self._gather(lambda: self._checked(indices, timesteps, noise, lr, loss,
                                                          images))
        if sync:
            micro, self._micro = self._micro, []
            self._on_rank0(lambda: self._record(micro))
            if not self._writes:   # other ranks count the steps only
                self._sizes.append(sum(len(m[0]) for m in micro))

    def _checked(self, indices, timesteps, noise, lr, loss, images) -> tuple:
        """One micro-batch, validated and copied: (indices, timesteps, noise, lr, loss, the
        noise's dtype in the loop)."""
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
        dtype = self.data.images.dtype
        if not noise.dtype.is_floating_point or not torch.equal(
                noise.detach().to(dtype).to(noise.dtype), noise.detach()):
            raise ValueError(f"noise has dtype {noise.dtype}, which {dtype} (the training "
                             "images') does not hold exactly. Record the noise add_noise "
                             "received, drawn in the images' dtype or in a lower precision "
                             "(bf16/fp16 under mixed precision).")
        if isinstance(lr, torch.Tensor) and lr.numel() == 1:
            lr = lr.item()
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 <= lr < float("inf"):
            raise ValueError(f"lr must be the learning rate of this step (a finite number >= 0, "
                             f"0 during warm-up); got {lr!r}. {READ_LR_BEFORE}")
        if images is not None:
            self._check_images(images, idx)
        if loss is not None:
            loss = float(loss)
            if not torch.isfinite(torch.as_tensor(loss)):
                raise self._diverged(f"the batch loss is {loss}", lr)
        return idx, t, noise.detach().cpu().to(dtype, copy=True), float(lr), loss, noise.dtype

    def _record(self, micro: list[tuple]) -> None:
        """Record the optimizer step made of the micro-batches ``micro`` (rank 0's part)."""
        idx, t, noise = (torch.cat([m[k] for m in micro]) for k in range(3))
        lrs = {m[3] for m in micro}
        if len(lrs) > 1:
            raise ValueError(f"The micro-batches of optimizer step {self.n_steps} report "
                             f"different lrs {sorted(lrs)}: pass sync=False for every micro-batch "
                             "but the last of an optimizer step (accelerator.sync_gradients). "
                             f"{READ_LR_BEFORE}")
        lr = lrs.pop()
        losses = [m[4] for m in micro]
        loss = None if None in losses else sum(
            v * len(m[0]) for v, m in zip(losses, micro)) / len(idx)
        if loss is not None and self.n_steps == 0:
            self.check_first_loss(idx, t, noise, loss, min((m[5] for m in micro),
                                                           key=lambda d: torch.finfo(d).bits))
        if lr == 0 and not self._warned_zero_lr and any(self._lrs):
            self._warned_zero_lr = True
            warnings.warn(
                f"lr=0 at optimizer step {self.n_steps}, after positive lrs: checkpoints weighted "
                f"by it add nothing to any score (a run whose checkpoints all have lr 0 scores "
                f"every sample 0). The lr was probably read after lr_scheduler.step() (the next "
                f"step's lr, 0 at the end of a schedule). {READ_LR_BEFORE}",
                ZeroLearningRateWarning, stacklevel=5)   # the caller of step()
        for k, v in zip(self._pending, (idx, t, noise)):
            self._pending[k].append(v)
        self._losses.append(float("nan") if loss is None else loss)
        self._lrs.append(lr)
        self._sizes.append(len(idx))
        self._seen[idx] = True
        self._visits_since += len(idx)
        if self._journal is not None and self.n_steps - self._flushed >= self.flush_every:
            self._flush()

    def flush(self) -> None:
        """Write the steps recorded since the last flush to the folder now (call it right after
        the loop saves its training state, so a resume from that state finds every step)."""
        self._check_open("flush")
        if self.folder is None:
            raise ValueError("This recorder has no folder to flush to: pass folder= when "
                             "making it.")
        self._on_rank0(self._flush)

    def _flush(self) -> None:
        if self.n_steps == self._flushed:
            return
        steps = {k: torch.cat(v) for k, v in self._pending.items()}
        new = slice(self._flushed, self.n_steps)
        steps.update(sizes=torch.tensor(self._sizes[new]),
                     losses=torch.tensor(self._losses[new], dtype=torch.float64),
                     lrs=torch.tensor(self._lrs[new], dtype=torch.float64))
        journal.add_steps(self.folder, self._journal, self._flushed, steps)
        self._pending = {k: [] for k in self._pending}
        self._flushed = self.n_steps

    def checkpoint(self, model, *, ema=None, lr: float | None = None,
                   epoch: int | None = None) -> Checkpoint | None:
        """Save ``model``'s weights now, weighted by ``lr * visits / N``: ``lr`` (default: the last
        step's, near 0 at the end of a schedule that decays to 0) times the samples trained on
        since the previous checkpoint. ``epoch`` defaults to visits // N. ``ema`` (diffusers'
        ``EMAModel`` of ``model``'s parameters, or the EMA model itself) saves its weights
        too, for ``run.with_weights("ema")``. With ``shared``, other ranks than 0 get None."""
        self._check_open("checkpoint")
        if self._micro:
            raise ValueError(f"{len(self._micro)} micro-batch(es) of an unfinished optimizer "
                             "step are pending: checkpoint after a step(..., sync=True).")
        return self._on_rank0(lambda: self._checkpoint(model, ema, lr, epoch))

    def _checkpoint(self, model, ema, lr, epoch) -> Checkpoint:
        if self._visits_since == 0:
            raise ValueError("No step was recorded since the last checkpoint: call step() after "
                             "every optimizer step, and checkpoint() after some steps.")
        if not self._seen.all():
            missing = (~self._seen).nonzero().flatten()
            raise ValueError(
                f"{len(missing)} training samples (e.g. {missing[:5].tolist()}) have not been trained "
                "on yet, so they have no recorded timestep and noise for this checkpoint. Checkpoint "
                "at the end of an epoch (and do not drop the last batch before then).")
        params = self._weights(_snapshot(model), "model")
        ema = None if ema is None else self._weights(_ema_state(ema, model), "ema")
        ckpt = Checkpoint(
            index=len(self.checkpoints), step=self.n_steps,
            epoch=int(sum(self._sizes) // len(self.data)) if epoch is None else int(epoch),
            lr=self._lrs[-1] if lr is None else float(lr), visits=self._visits_since,
            params=params, ema=ema)
        if self._journal is not None:
            self._flush()
            journal.add_checkpoint(self.folder, self._journal, ckpt)
            self.checkpoints.append(dataclasses.replace(ckpt, params={}, ema=None))
        else:
            self.checkpoints.append(ckpt)
        self._visits_since = 0
        return ckpt

    def _weights(self, params: dict, name: str) -> dict:
        """``params`` when they are finite and fit the recorded architecture."""
        bad = [k for k, v in params.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise self._diverged(f"{name} weights {bad[:3]} are NaN or infinite", self._lrs[-1])
        layout = {k: (v.shape, v.dtype) for k, v in params.items()}
        if layout != self._layout:
            diff = sorted(set(layout) ^ set(self._layout)) or [
                k for k in layout if layout[k] != self._layout[k]]
            raise ValueError(
                f"The {name} weights do not fit the architecture being recorded (they differ in "
                f"{diff[:3]}). Pass the model you are training (unwrapped from DDP/accelerate).")
        return params

    def close(self, folder=None) -> Run | None:
        """Finish recording; return the ``Run``, written to ``folder`` (default: the
        constructor's; None for both keeps it in memory only). With ``shared``, ranks other
        than 0 get None (the run is in the folder for every process).

        When the run cannot be written (a read-only folder, or one that another run took since
        the recorder was made), the ``OSError`` says so and the recorder stays open with all
        its records: call ``close(folder=...)`` again with a new, writable folder.
        """
        self._check_open("close")
        if self._micro:
            raise ValueError(f"{len(self._micro)} micro-batch(es) of an unfinished optimizer "
                             "step are pending: close after a step(..., sync=True).")
        run = self._on_rank0(lambda: self._close(folder))
        self.closed = True
        return run

    def _close(self, folder) -> Run:
        if not self.checkpoints:
            raise ValueError("No checkpoint was saved: call checkpoint(model) at least once "
                             "(attribution sums over checkpoints).")
        folder = self.folder if folder is None else Path(folder)
        parts = {k: list(v) for k, v in self._pending.items()}
        checkpoints = self.checkpoints
        if self._journal is not None:
            flushed = journal.load_steps(self.folder, self._journal)
            parts = {k: [flushed[k]] + v if flushed else v for k, v in parts.items()}
            checkpoints = [journal.load_checkpoint(self.folder, e)
                           for e in self._journal["checkpoints"]]
        steps = {k: torch.cat(v) for k, v in parts.items()}
        starts = torch.tensor([0] + self._sizes).cumsum(0)
        log = TrainingLog(steps["indices"], steps["timesteps"], steps["noise"], starts,
                          torch.tensor(self._losses, dtype=torch.float64),
                          torch.tensor(self._lrs, dtype=torch.float64))
        run = Run(self.config, self.data, self.scheduler, checkpoints, log, self._initial,
                  time.perf_counter() - self._start)
        if folder is not None:
            try:
                if self._journal is not None and folder == self.folder:
                    journal.finish(folder, run)
                    run.path = folder
                else:
                    run.path = save_run(run, folder, with_data=True)
            except OSError as err:
                raise type(err)(
                    f"The recorded run could not be written to {folder} ({type(err).__name__}: "
                    f"{err}). Nothing is lost: the recorder is still open, so call "
                    f"recorder.close(folder=...) with a new, writable folder.") from err
            self.folder = folder
        return run

    def _gather(self, local) -> list:
        """``[local()]`` alone; with ``shared``, every rank's ``local()`` in rank order, on
        every rank; the first rank's error (in rank order) is raised on all of them."""
        if not self.shared:
            return [local()]
        try:
            mine = local()
        except Exception as err:   # re-raised below, on every rank
            mine = err
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        for rank, theirs in enumerate(everyone):
            if isinstance(theirs, Exception):
                raise type(theirs)(f"On process {rank}: {theirs}")
        return everyone

    def _on_rank0(self, work, share: bool = False):
        """``work()``, alone or on rank 0 (others get None, or with ``share`` its result); with
        ``shared``, its error is raised on every rank."""
        if not self.shared:
            return work()
        result, error = None, None
        if self._writes:
            try:
                result = work()
            except Exception as err:   # re-raised below, on every rank
                error = err
        box = [error, result if share else None]
        torch.distributed.broadcast_object_list(box, src=0)
        if box[0] is not None:
            if self._writes:
                raise box[0]
            raise type(box[0])(f"On process 0: {box[0]}")
        return result if self._writes else box[1]

    def check_first_loss(self, indices, timesteps, noise, logged: float,
                         precision: torch.dtype | None = None) -> None:
        """Recompute the first step's batch loss from the initial weights with the declared loss
        and scheduler; raise a ``ValueError`` when it differs from ``logged`` by more than the
        ``replay_tolerance``, naming a loss or beta schedule that reproduces ``logged`` if one
        does, and the tolerance a loop needs whose noise had the lower ``precision``. ``step``
        calls it; it stores ``(logged, replayed)`` in ``self.replayed``."""
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
        if precision is not None and precision != self.data.images.dtype:
            found += (f"The loop's noise was {precision}, so its forward pass ran in reduced "
                      "precision (mixed precision), whose loss the float32 replay matches only "
                      "to about 1e-3 to 1e-2: pass replay_tolerance=1e-2 to the Recorder if the "
                      "rest below holds. ")
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
                if isinstance(self.config, TrainConfig) else
                "The run was not completed (an unfinished recording never loads as a run); "
                "lower the learning rate")
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
            if images.shape == expected.shape and torch.equal(
                    images, expected.to(images.dtype)):
                raise ValueError(
                    f"The batch images are the training set at the given indices rounded to "
                    f"{images.dtype} (a mixed-precision loop's weight_dtype): the model trains "
                    f"on the rounded images, so record those: pass the training set as "
                    f"images.to({images.dtype}).to({expected.dtype}) to the Recorder.")
            raise ValueError(
                "The batch images differ from the training set at the given indices: the indices "
                "are wrong, or the loop augments (random flips or crops) or rescales the images. "
                "Pass the training images exactly as the model sees them.")


def load(folder) -> Run:
    """A run written by ``Recorder(..., folder=...)`` (or ``rl.save_run(run, folder,
    with_data=True)``), verified against its manifest."""
    folder = Path(folder)
    _require_run_folder(folder)
    if journal.is_recording(folder):
        raise journal.IncompleteRunError(
            f"{folder} is a recording that was never closed: its training stopped (or still "
            "runs) before recorder.close(), so it is not a complete run and is not loaded. "
            "Resume the training from your last saved training state with "
            "rl.Recorder.resume(folder, model, noise_scheduler, step=...) and close() it at the "
            "end; its flushed records are kept.")
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


def _require_recording(folder: Path) -> None:
    """Say plainly what ``folder`` is when it is not a recording that can be resumed."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such recording. Pass the folder that "
                                "rl.Recorder(..., folder=...) was recording to.")
    if (folder / cache.MANIFEST).exists():
        raise ValueError(f"{folder} is a complete run (its recorder was closed): there is "
                         "nothing to resume. Load it with rl.recorder.load, or record the "
                         "continued training in a new folder.")
    if not (folder / journal.JOURNAL).exists():
        raise ValueError(f"{folder} is not a recording: it has no {journal.JOURNAL}. Pass the "
                         "folder that rl.Recorder(..., folder=...) was recording to.")


def _shared(shared) -> bool:
    if not isinstance(shared, bool):
        raise ValueError(f"shared must be True or False, got {shared!r}.")
    dist = torch.distributed
    if shared and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shared=True needs the torch.distributed process group of your "
                         "launcher (accelerate's Accelerator(), or dist.init_process_group under "
                         "torchrun) to be initialized before the Recorder is made.")
    return shared


def _ema_state(ema, model) -> dict[str, torch.Tensor]:
    """The EMA weights as a state dict of ``model``: from diffusers' ``EMAModel`` (its shadow
    parameters follow ``model.parameters()``) or from an EMA copy of the model."""
    if isinstance(ema, torch.nn.Module):
        return _snapshot(ema)
    shadow = getattr(ema, "shadow_params", None)
    if shadow is None:
        raise ValueError(f"ema must be a diffusers EMAModel or the EMA model (a torch Module); "
                         f"got {type(ema).__name__}.")
    names = [name for name, _ in model.named_parameters()]
    if len(names) != len(shadow):
        raise ValueError(f"ema tracks {len(shadow)} parameters, the model has {len(names)}: "
                         "make the EMAModel from this model's parameters().")
    state = _snapshot(model)
    state.update({name: p.detach().cpu().clone() for name, p in zip(names, shadow)})
    return state


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
