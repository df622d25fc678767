"""A diffusers-style training loop plus ``rl.Recorder`` gives a run that attribution explains.

The loop below is written the way diffusers' ``train_unconditional.py`` writes it (DataLoader,
``noise_scheduler.add_noise``, ``UNet2DModel``, AdamW with a warm-up + cosine lr schedule,
gradient clipping); the recorder is the only addition. Independently of the recorder the loop
keeps its own note of each sample's last timestep and noise and of every step's lr, which the
recorded run must reproduce; its scores must equal the slow reference of ``test_attribution``.
"""
import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from test_attribution import REL_TOL, ref_scores, ref_weight, rel_err
from torch.utils.data import DataLoader

import retrac_lib as rl
from retrac_lib import cli
from retrac_lib.losses import diffusion_loss

N, SIZE, BATCH, EPOCHS = 10, 8, 4, 2


class Images(torch.utils.data.Dataset):
    """A plain image data set: items are image tensors, no indices."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def make_model(channels, attention):
    return UNet2DModel(
        sample_size=SIZE, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        add_attention=attention)


def diffusers_style_loop(images, folder, *, channels, attention, scheduler_cls, beta_schedule,
                         loss_name, seed=0, lr=1e-3, recorded_loss=None, loss_scale=1.0):
    """``recorded_loss`` (default ``loss_name``) is what the recorder is told; ``loss_scale``
    multiplies the loss the loop logs (and trains on), as a gradient-accumulation loop does."""
    torch.manual_seed(seed)
    model = make_model(channels, attention)
    noise_scheduler = scheduler_cls(num_train_timesteps=1000, beta_schedule=beta_schedule)
    loader = DataLoader(rl.recorder.IndexedDataset(Images(images)), batch_size=BATCH,
                        shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2,
                                 num_training_steps=len(loader) * EPOCHS)
    criterion = F.mse_loss if loss_name == "mse" else F.l1_loss
    recorder = rl.Recorder(model, noise_scheduler, images, loss=recorded_loss or loss_name,
                           folder=folder)
    notes = {"last": {}, "at_checkpoint": [], "lrs": []}
    for epoch in range(EPOCHS):
        model.train()
        for indices, clean_images in loader:
            noise = torch.randn(clean_images.shape)
            bsz = clean_images.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,)).long()
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            model_output = model(noisy_images, timesteps).sample
            loss = criterion(model_output, noise) * loss_scale
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            recorder.step(indices, timesteps, noise, lr, loss=loss.item(), images=clean_images)
            notes["lrs"].append(lr)
            for j, i in enumerate(indices.tolist()):
                notes["last"][i] = (int(timesteps[j]), noise[j].clone())
        recorder.checkpoint(model)
        notes["at_checkpoint"].append(dict(notes["last"]))
    return recorder.close(), notes


CASES = {
    "attention-ddpm-cosine-mse-rgb": dict(channels=3, attention=True, scheduler_cls=DDPMScheduler,
                                          beta_schedule="squaredcos_cap_v2", loss_name="mse"),
    "plain-ddim-scaled-l1-gray": dict(channels=1, attention=False, scheduler_cls=DDIMScheduler,
                                      beta_schedule="scaled_linear", loss_name="l1"),
}


@pytest.fixture(scope="module", params=list(CASES))
def recorded(request, tmp_path_factory):
    case = CASES[request.param]
    images = torch.rand((N, case["channels"], SIZE, SIZE),
                        generator=torch.Generator().manual_seed(5)) * 2 - 1
    folder = tmp_path_factory.mktemp("recorded") / "run"
    run, notes = diffusers_style_loop(images, folder, **case)
    return run, notes, case, folder


def test_checkpoint_weights_count_visits_not_steps_times_batch(recorded):
    """N = 10 in batches of 4: an epoch is 3 steps but 4 + 4 + 2 = 10 visits, so each epoch's
    checkpoint weighs lr * 10 / 10 = its last step's lr (lr * steps * batch / N would be 1.2 lr)."""
    run, notes, _, _ = recorded
    last_lrs = [notes["lrs"][3 * (e + 1) - 1] for e in range(EPOCHS)]
    assert [c.visits for c in run.checkpoints] == [10] * EPOCHS
    assert run.checkpoint_weights().tolist() == pytest.approx(last_lrs, rel=1e-12)
    result = rl.attribute(run, run.data.images[:1], "tracin", timesteps=2, n_noise=1,
                          progress=False)
    assert result.checkpoint_weights.tolist() == pytest.approx(last_lrs, rel=1e-12)


def test_the_recorded_run_is_what_the_loop_did(recorded):
    run, notes, case, _ = recorded
    steps = EPOCHS * -(-N // BATCH)
    assert run.log.n_steps == steps and len(run.checkpoints) == EPOCHS
    assert run.log.lrs.tolist() == notes["lrs"] and len(set(notes["lrs"])) > 2  # warm-up + cosine
    for c, seen in zip(run.checkpoints, notes["at_checkpoint"]):
        assert (c.step, c.epoch, c.visits) == (steps // EPOCHS * (c.index + 1), c.index + 1, N)
        assert c.lr == notes["lrs"][c.step - 1]
        t, noise = run.recorded(c.index)
        assert t.tolist() == [seen[i][0] for i in range(N)]
        assert torch.equal(noise, torch.stack([seen[i][1] for i in range(N)]))
    assert run.config.loss == case["loss_name"] and type(run.scheduler) is case["scheduler_cls"]
    assert run.scheduler.config.beta_schedule == case["beta_schedule"]
    # the log replays: the first step after checkpoint 0 has the loss the loop measured
    idx, t, noise = run.log.step(run.checkpoints[0].step)
    with torch.no_grad():
        replay = diffusion_loss(run.model_at(0), run.scheduler, run.data.images[idx], t, noise,
                                case["loss_name"]).mean()
    assert replay.item() == pytest.approx(run.log.losses[run.checkpoints[0].step].item(), rel=1e-5)


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_scores_equal_the_slow_reference_and_survive_a_reload(recorded, method):
    run, _, case, folder = recorded
    queries = torch.rand((2, case["channels"], SIZE, SIZE),
                         generator=torch.Generator().manual_seed(9)) * 2 - 1
    grid = [2, 400, 990]
    noise = torch.randn((len(grid), 2, case["channels"], SIZE, SIZE),
                        generator=torch.Generator().manual_seed(3))
    res = rl.attribute(run, queries, method, timesteps=grid, query_noise=noise, progress=False)
    expected, _ = ref_scores(run, queries, [0, 1], grid, noise, case["loss_name"], method)
    assert res.scores.shape == (2, N)
    assert rel_err(res.scores, expected) <= REL_TOL
    assert res.checkpoint_weights.tolist() == pytest.approx([ref_weight(run, c) for c in (0, 1)])

    loaded = rl.recorder.load(folder)
    assert loaded.config == run.config and torch.equal(loaded.data.images, run.data.images)
    again = rl.attribute(loaded, queries, method, timesteps=grid, query_noise=noise, progress=False)
    assert torch.equal(again.scores, res.scores)


def test_cached_scores_are_keyed_by_the_recorded_weights_and_log(recorded, tmp_path):
    """Two loops on the same model and data that differ in seed or lr get their own scores."""
    run, _, case, folder = recorded
    queries = run.data.images[:2]
    kw = dict(timesteps=[10, 500], n_noise=2, progress=False)
    for other in (dict(lr=3e-3), dict(seed=1)):
        second, _ = diffusers_style_loop(run.data.images, None, **case, **other)
        assert second.config == run.config
        for r in (run, second):
            cached = rl.load_or_attribute(r, queries, "retrac", root=tmp_path, **kw)
            assert torch.equal(cached.scores, rl.attribute(r, queries, "retrac", **kw).scores)
    assert rl.recorder.load(folder).fingerprint() == run.fingerprint()  # a reload finds its entry
    sketch = rl.attribution.sketch_training(run, 64, timesteps=[10, 500], progress=False)
    with pytest.raises(ValueError, match="does not fit the call.*'run'"):
        rl.attribute(second, queries, "retrac", projection=sketch, **kw)
    rl.attribute(rl.recorder.load(folder), queries, "retrac", projection=sketch, **kw)


# ---------------------------------------------------------------------------------------------
# clear errors


@pytest.fixture
def fresh():
    images = torch.rand((6, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    model = make_model(1, attention=False)
    return rl.Recorder(model, DDPMScheduler(), images), model, images


def _batch(idx, shape=(1, SIZE, SIZE)):
    return torch.tensor(idx), torch.full((len(idx),), 10), torch.zeros((len(idx), *shape))


def test_bad_steps_are_refused(fresh):
    rec, _, images = fresh
    idx, t, noise = _batch([0, 1])
    with pytest.raises(ValueError, match="IndexedDataset"):
        rec.step(None, t, noise, 1e-3)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 6\).*\[0, 6\]"):
        rec.step(torch.tensor([0, 6]), t, noise, 1e-3)
    with pytest.raises(ValueError, match="indices must be a 1-D tensor of integers"):
        rec.step(idx.float(), t, noise, 1e-3)
    with pytest.raises(ValueError, match=r"noise has shape \(2, 1, 4, 4\); expected \[2, 1, 8, 8\]"):
        rec.step(idx, t, torch.zeros(2, 1, 4, 4), 1e-3)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        rec.step(idx, torch.tensor([5, 1000]), noise, 1e-3)
    with pytest.raises(ValueError, match="timesteps has 1 entries"):
        rec.step(idx, t[:1], noise, 1e-3)
    with pytest.raises(ValueError, match="lr must be the learning rate"):
        rec.step(idx, t, noise, -1e-3)
    with pytest.raises(ValueError, match="augments"):
        rec.step(idx, t, noise, 1e-3, images=images[[1, 0]])
    assert rec.n_steps == 0  # nothing was recorded by the refused calls
    rec.step(idx, t, noise, 1e-3, images=images[idx])
    assert rec.n_steps == 1


def test_bad_checkpoints_and_use_after_close_are_refused(fresh):
    rec, model, _ = fresh
    with pytest.raises(ValueError, match="No step was recorded"):
        rec.checkpoint(model)
    rec.step(*_batch([0, 1, 2]), 1e-3)
    with pytest.raises(ValueError, match=r"3 training samples \(e.g. \[3, 4, 5\]\) have not been"):
        rec.checkpoint(model)
    rec.step(*_batch([3, 4, 5]), 1e-3)
    with pytest.raises(ValueError, match="do not fit the architecture"):
        rec.checkpoint(make_model(1, attention=True))
    with pytest.raises(ValueError, match="No checkpoint was saved"):
        rec.close()
    rec.checkpoint(model)
    run = rec.close()
    for call in (lambda: rec.step(*_batch([0]), 1e-3), lambda: rec.checkpoint(model), rec.close):
        with pytest.raises(RuntimeError, match="Recorder was closed"):
            call()
    other = rl.models.ModelSpec.of(make_model(1, attention=True), DDPMScheduler(), "mse")
    with pytest.raises(ValueError, match="do not fit the run's model configuration"):
        dataclasses.replace(run, config=other).model_at(0)


def test_step_copies_the_batch_the_loop_reuses(fresh):
    # A loop that shuffles one numpy permutation in place and refills the same timestep and
    # noise buffers every step: the recorder must keep what each step had, not the buffers.
    rec, model, _ = fresh
    rng, order = np.random.default_rng(0), np.arange(6)
    t, noise = torch.empty(3, dtype=torch.long), torch.empty(3, 1, SIZE, SIZE)
    expected = []
    for _ in range(4):
        rng.shuffle(order)
        for b in (0, 3):
            t.copy_(torch.randint(0, 1000, (3,)))
            noise.copy_(torch.randn(3, 1, SIZE, SIZE))
            rec.step(order[b:b + 3], t, noise, 1e-3)
            expected.append((order[b:b + 3].tolist(), t.clone(), noise.clone()))
        rec.checkpoint(model)
    log = rec.close().log
    for s, (idx, steps, eps) in enumerate(expected):
        got_idx, got_t, got_noise = log.step(s)
        assert got_idx.tolist() == idx and torch.equal(got_t, steps) and torch.equal(got_noise, eps)


def test_a_zero_lr_warns_once_and_a_non_finite_lr_is_refused(fresh):
    rec, model, _ = fresh
    read_before = re.escape('Read lr = optimizer.param_groups[0]["lr"] before optimizer.step')
    for lr in (float("nan"), float("inf"), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match=r"lr must be the learning rate.*got (nan|inf)\. "
                                             + read_before):
            rec.step(*_batch([0, 1, 2]), lr)
    assert rec.n_steps == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.step(*_batch([0, 1, 2]), 0.0)             # a warm-up starting at 0 is no mistake
    # the lr read after lr_scheduler.step() is the next step's: 0 after the last step of a
    # linear decay, so the only checkpoint would weigh 0 and every score would be 0
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    lr_scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=2)
    with pytest.warns(rl.recorder.ZeroLearningRateWarning,
                      match=r"lr=0 at optimizer step 2, after positive lrs: checkpoints weighted "
                            r"by it add nothing.*probably read after lr_scheduler.step") as caught:
        for idx in ([0, 1, 2], [3, 4, 5]):
            optimizer.step()
            lr_scheduler.step()
            rec.step(*_batch(idx), optimizer.param_groups[0]["lr"])
    assert issubclass(rl.recorder.ZeroLearningRateWarning, UserWarning) and len(caught) == 1
    assert caught[0].filename == __file__          # it points at the loop's step() call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.step(*_batch([0, 1, 2, 3, 4, 5]), 0.0)   # warned once per recorder
    assert rec.n_steps == 4 and rec.checkpoint(model).lr == 0


def test_a_failed_close_keeps_the_recording_for_another_folder(fresh, tmp_path):
    _, model, images = fresh
    taken, blocker = tmp_path / "taken", tmp_path / "not-a-folder"
    blocker.write_text("a file where the run's folder should go")  # unwritable, even by root
    taken.mkdir()
    with pytest.raises(FileExistsError, match="exists already.*never overwritten.*resume"):
        rl.Recorder(model, DDPMScheduler(), images, folder=taken)
    rec = rl.Recorder(model, DDPMScheduler(), images)
    rec.step(*_batch([0, 1, 2, 3, 4, 5]), 1e-3)
    rec.checkpoint(model)
    with pytest.raises(OSError, match=re.escape(f"could not be written to {blocker / 'run'}") +
                       r".*the recorder is still open, so call "
                       r"recorder.close\(folder=\.\.\.\) with a new, writable folder"):
        rec.close(folder=blocker / "run")
    with pytest.raises(FileExistsError, match=re.escape(f"could not be written to {taken}") +
                       r".*exists already"):
        rec.close(folder=taken)
    assert not rec.closed and not any(taken.iterdir())
    run = rec.close(folder=tmp_path / "saved")
    assert rec.closed and run.path == rec.folder == tmp_path / "saved"
    loaded = rl.recorder.load(run.path)
    assert torch.equal(loaded.log.noise, run.log.noise) and loaded.log.n_steps == 1


def test_a_diverged_user_loop_is_refused_not_saved(fresh, tmp_path):
    _, model, images = fresh
    rec = rl.Recorder(model, DDPMScheduler(), images, folder=tmp_path / "run")
    with pytest.raises(rl.runs.TrainingDiverged,
                       match=r"batch loss is nan.*lr=0.5.*The run was not completed"):
        rec.step(*_batch([0, 1]), 0.5, loss=float("nan"))
    assert rec.n_steps == 0
    rec.step(*_batch([0, 1, 2, 3, 4, 5]), 0.5)
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(rl.runs.TrainingDiverged, match=r"weights \[.*\] are NaN or infinite"):
        rec.checkpoint(model)
    assert not rec.checkpoints
    with pytest.raises(rl.recorder.IncompleteRunError, match="never closed"):
        rl.recorder.load(tmp_path / "run")


def test_a_wrong_loss_or_scheduler_is_refused_at_the_first_step():
    """The first step's logged loss is replayed from the initial weights: an L1 loop recorded
    as "mse" would score ~45 % off, so it is refused and the right loss named; the right loss
    passes; a loop that logs a scaled loss, or calls add_noise on another scheduler than the
    one recorded, is refused too."""
    images = torch.rand((N, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(5)) * 2 - 1
    case = dict(channels=1, attention=False, scheduler_cls=DDPMScheduler, beta_schedule="linear")
    pattern = (r"first step's logged loss (\S+) is not what loss='mse' with this DDPMScheduler "
               r"\(beta_schedule='linear'\) gives when the recorder replays that batch from the "
               r"initial weights: (\S+) \(relative.*Pass loss='l1': it reproduces the logged "
               r"loss \((\S+)\)")
    with pytest.raises(ValueError, match=pattern) as refused:
        diffusers_style_loop(images, None, **case, loss_name="l1", recorded_loss="mse")
    logged, as_mse, as_l1 = map(float, re.search(pattern, str(refused.value)).groups())
    assert as_l1 == pytest.approx(logged, rel=1e-5) and abs(as_mse - logged) > 0.1 * logged
    run, _ = diffusers_style_loop(images, None, **case, loss_name="l1")
    assert run.config.loss == "l1" and run.log.losses[0].item() == pytest.approx(logged, rel=1e-6)
    with pytest.raises(ValueError, match=r"No supported loss \('mse', 'l1'\) or beta schedule "
                       r"reproduces it \(the logged loss is 0.5 x the replay\).*not scaled"):
        diffusers_style_loop(images, None, **case, loss_name="mse", loss_scale=0.5)
    with pytest.raises(ValueError, match=r"beta_schedule='linear'\) gives.*Pass the noise "
                       r"scheduler the loop calls add_noise on \(beta_schedule="
                       r"'squaredcos_cap_v2'\)"):
        _wrong_scheduler_loop(images)


def _wrong_scheduler_loop(images):
    """A loop that noises with a cosine schedule but hands the recorder a linear one."""
    torch.manual_seed(0)
    model = make_model(1, attention=False)
    trained_with = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    rec = rl.Recorder(model, DDPMScheduler(beta_schedule="linear"), images)
    idx = torch.arange(BATCH)
    t, noise = torch.randint(0, 1000, (BATCH,)), torch.randn(BATCH, 1, SIZE, SIZE)
    pred = model(trained_with.add_noise(images[idx], noise, t), t).sample
    rec.step(idx, t, noise, 1e-3, loss=F.mse_loss(pred, noise).item())


def test_the_first_step_replays_from_the_recorders_initial_weights(fresh):
    """The replay is what the loop measured (to float32 rounding), and replay_tolerance=None
    (or dropout, which makes the logged loss random) skips it."""
    rec, model, images = fresh
    idx, t = torch.tensor([4, 0, 2]), torch.tensor([3, 500, 999])
    noise = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    logged = F.mse_loss(model(DDPMScheduler().add_noise(images[idx], noise, t), t).sample, noise)
    rec.step(idx, t, noise, 1e-3, loss=logged.item())
    assert rec.replayed[0] == logged.item()
    assert rec.replayed[1] == pytest.approx(logged.item(), rel=1e-6)
    unchecked = rl.Recorder(model, DDPMScheduler(), images, replay_tolerance=None)
    unchecked.step(idx, t, noise, 1e-3, loss=123.0)
    assert unchecked.replayed is None
    dropout = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1,
                          block_out_channels=(8, 16), norm_num_groups=4, dropout=0.5,
                          down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    noisy = rl.Recorder(dropout, DDPMScheduler(), images)   # a random loss: nothing to replay
    noisy.step(idx, t, noise, 1e-3, loss=123.0)
    assert noisy.replayed is None and noisy.n_steps == 1
    with pytest.raises(ValueError, match="loss 123 is not what"):   # the same without dropout
        rl.Recorder(model, DDPMScheduler(), images).step(idx, t, noise, 1e-3, loss=123.0)
    with pytest.raises(ValueError, match="replay_tolerance must be positive"):
        rl.Recorder(model, DDPMScheduler(), images, replay_tolerance=0)


def test_unsupported_models_schedulers_and_losses_are_refused():
    images = torch.zeros(4, 1, SIZE, SIZE)
    model = make_model(1, attention=False)
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        rl.Recorder(model, DDPMScheduler(prediction_type="v_prediction"), images)
    with pytest.raises(ValueError, match="loss must be 'mse' or 'l1'"):
        rl.Recorder(model, DDPMScheduler(), images, loss="huber")
    with pytest.raises(ValueError, match="supports UNet2DModel"):
        rl.Recorder(torch.nn.parallel.DataParallel(model), DDPMScheduler(), images)
    with pytest.raises(ValueError, match=r"data has shape \(4, 3, 8, 8\)"):
        rl.Recorder(model, DDPMScheduler(), torch.zeros(4, 3, SIZE, SIZE))


def test_an_existing_folder_is_never_overwritten(recorded):
    run, _, case, folder = recorded
    with pytest.raises(FileExistsError, match="exists already"):
        rl.Recorder(make_model(case["channels"], case["attention"]), case["scheduler_cls"](),
                    run.data, loss=case["loss_name"], folder=folder)


def test_rl_train_records_through_the_recorder(tiny_config, tiny_digits, monkeypatch):
    calls = {"step": 0, "checkpoint": 0}
    for name in calls:
        original = getattr(rl.Recorder, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(rl.Recorder, name, spy)
    run = rl.train(tiny_config.replace(epochs=2), tiny_digits, progress=False)
    assert calls == {"step": run.log.n_steps, "checkpoint": len(run.checkpoints)} == {"step": 6, "checkpoint": 2}


# ---------------------------------------------------------------------------------------------
# gradient accumulation, EMA weights, mixed precision


def test_micro_batches_make_one_optimizer_step(fresh):
    """With sync=False until the last micro-batch, a recorded step is the optimizer step: its
    visits are all micro-batches', its loss their mean over samples (replayed from the initial
    weights), its lr the step's."""
    rec, model, images = fresh
    scheduler = DDPMScheduler()
    gen = torch.Generator().manual_seed(4)
    parts = [torch.tensor([3, 0]), torch.tensor([5, 1, 2]), torch.tensor([4])]
    ts = [torch.randint(0, 1000, (len(i),), generator=gen) for i in parts]
    eps = [torch.randn((len(i), 1, SIZE, SIZE), generator=gen) for i in parts]
    with torch.no_grad():
        losses = [diffusion_loss(model, scheduler, images[i], t, e).mean().item()
                  for i, t, e in zip(parts, ts, eps)]
    for k, (i, t, e, loss) in enumerate(zip(parts, ts, eps, losses)):
        rec.step(i, t, e, 1e-3, loss=loss, images=images[i], sync=k == len(parts) - 1)
        assert rec.n_steps == (k == len(parts) - 1)
    expected = (2 * losses[0] + 3 * losses[1] + losses[2]) / 6
    assert rec.replayed[0] == pytest.approx(expected, rel=1e-12)
    assert rec.replayed[1] == pytest.approx(expected, rel=1e-5)
    rec.checkpoint(model)
    run = rec.close()
    assert run.log.n_steps == 1 and run.checkpoints[0].visits == 6
    assert torch.equal(run.log.indices, torch.cat(parts))
    assert torch.equal(run.log.noise, torch.cat(eps))
    assert run.checkpoint_weights().tolist() == pytest.approx([1e-3 * 6 / 6])


def test_accumulation_misuse_is_refused(fresh):
    rec, model, images = fresh
    idx, t, noise = _batch([0, 1, 2])
    rec.step(idx, t, noise, 1e-3, sync=False)
    with pytest.raises(ValueError, match="1 micro-batch.*pending: checkpoint after a step"):
        rec.checkpoint(model)
    with pytest.raises(ValueError, match="1 micro-batch.*pending: close after a step"):
        rec.close()
    with pytest.raises(ValueError, match="sync must be True or False"):
        rec.step(*_batch([3, 4, 5]), 1e-3, sync=1)
    with pytest.raises(ValueError, match=r"report different lrs \[0.001, 0.002\]: pass "
                                         r"sync=False for every micro-batch but the last"):
        rec.step(*_batch([3, 4, 5]), 2e-3)
    with pytest.raises(ValueError, match="shared=True needs the torch.distributed process group"):
        rl.Recorder(model, DDPMScheduler(), images, shared=True)
    with pytest.raises(ValueError, match="no folder to flush to"):
        rl.Recorder(model, DDPMScheduler(), images).flush()
    with pytest.raises(ValueError, match="flush_every must be >= 1, got 0"):
        rl.Recorder(model, DDPMScheduler(), images, flush_every=0)


def test_ema_weights_are_kept_and_chosen(fresh, tmp_path):
    from diffusers.training_utils import EMAModel

    _, model, images = fresh
    rec = rl.Recorder(model, DDPMScheduler(), images, folder=tmp_path / "run")
    ema = EMAModel(model.parameters(), decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    idx, t, noise = _batch([0, 1, 2, 3, 4, 5])
    diffusion_loss(model, DDPMScheduler(), images[idx], t, noise).mean().backward()
    optimizer.step()
    ema.step(model.parameters())
    rec.step(idx, t, noise, 0.1)
    with pytest.raises(ValueError, match="ema must be a diffusers EMAModel or the EMA model"):
        rec.checkpoint(model, ema={"not": "an ema"})
    with pytest.raises(ValueError, match="ema tracks 1 parameters, the model has"):
        rec.checkpoint(model, ema=EMAModel([next(model.parameters())]))
    rec.checkpoint(model, ema=ema)
    run = rl.recorder.load(rec.close().path)
    names = [n for n, _ in model.named_parameters()]
    (c,) = run.checkpoints
    for name, shadow, param in zip(names, ema.shadow_params, model.parameters()):
        assert torch.equal(c.ema[name], shadow) and torch.equal(c.params[name], param.detach())
    assert not all(torch.equal(c.ema[k], c.params[k]) for k in names)
    ema_run = run.with_weights("ema")
    assert ema_run.checkpoints[0].params is c.ema and run.with_weights("trained") is run
    assert ema_run.fingerprint() != run.fingerprint()     # their scores get their own cache keys
    assert torch.equal(next(ema_run.model_at(0).parameters()), ema.shadow_params[0])
    with pytest.raises(ValueError, match="which must be one of \\('trained', 'ema'\\)"):
        run.with_weights("average")
    with pytest.raises(ValueError, match=r"Checkpoints \[0\] hold no EMA weights.*ema=ema_model"):
        ema_run.with_weights("ema")


def test_mixed_precision_noise_and_images(fresh):
    """Under bf16 the loop draws bf16 noise (held exactly in float32: recorded) and trains on
    bf16-rounded images (the recorder says to record those)."""
    rec, model, images = fresh
    idx, t, _ = _batch([0, 1, 2])
    noise = torch.randn((3, 1, SIZE, SIZE)).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"rounded to torch.bfloat16.*images.to\(torch.bfloat16\)"
                                         r".to\(torch.float32\) to the Recorder"):
        rec.step(idx, t, noise, 1e-3, images=images[idx].to(torch.bfloat16))
    with pytest.raises(ValueError, match="torch.float64, which torch.float32.*does not hold"):
        rec.step(idx, t, torch.randn((3, 1, SIZE, SIZE), dtype=torch.float64), 1e-3)
    with torch.no_grad():
        replay = diffusion_loss(model, DDPMScheduler(), images[idx], t, noise.float()).mean()
    with pytest.raises(ValueError, match=r"noise was torch.bfloat16, so its forward pass ran in "
                                         r"reduced precision.*pass replay_tolerance=1e-2"):
        rec.step(idx, t, noise, 1e-3, loss=replay.item() * 1.005)
    rounded = rl.Recorder(model, DDPMScheduler(), images.to(torch.bfloat16).float())
    rounded.step(idx, t, noise, 1e-3, images=images[idx].to(torch.bfloat16))
    rounded.step(*_batch([3, 4, 5]), 1e-3)
    rounded.checkpoint(model)
    run = rounded.close()
    assert run.log.noise.dtype == torch.float32 and torch.equal(run.log.noise[:3], noise.float())


def test_the_command_line_refuses_ema_weights_a_run_does_not_hold(recorded, tmp_path, capsys):
    _, _, case, folder = recorded
    torch.save(torch.zeros(1, case["channels"], SIZE, SIZE), tmp_path / "q.pt")
    with pytest.raises(SystemExit):
        cli.main(["attribute", str(folder), str(tmp_path / "q.pt"), "--out",
                     str(tmp_path / "s"), "--weights", "ema"])
    assert "--weights: Checkpoints [0, 1] hold no EMA weights" in capsys.readouterr().err
