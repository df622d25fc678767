"""Training records what attribution needs, deterministically, and the cache refuses mismatches."""
import json

import pytest
import torch

import retrac_lib as rl
from retrac_lib.cache import CacheError
from retrac_lib.losses import diffusion_loss


def test_replay_of_logged_steps_gives_the_logged_loss(tiny_run):
    run = tiny_run
    replay_points = [(run.initial_model(), 0)] + [
        (run.model_at(c.index), c.step) for c in run.checkpoints[:-1]
    ]
    for model, step in replay_points:
        idx, t, noise = run.log.step(step)
        with torch.no_grad():
            loss = diffusion_loss(model, run.scheduler, run.data.images[idx], t, noise,
                                  run.config.loss).mean()
        assert loss.item() == run.log.losses[step].item()


def test_recorded_agrees_with_a_scan_of_the_log(tiny_run):
    run = tiny_run
    for c in run.checkpoints:
        t, noise = run.recorded(c.index)
        expected_t = {}
        expected_noise = {}
        for s in range(c.step):  # walk the log in order; later visits overwrite earlier ones
            idx, ts, eps = run.log.step(s)
            for j, i in enumerate(idx.tolist()):
                expected_t[i], expected_noise[i] = int(ts[j]), eps[j]
        assert sorted(expected_t) == list(range(len(run.data)))
        assert t.tolist() == [expected_t[i] for i in range(len(run.data))]
        assert torch.equal(noise, torch.stack([expected_noise[i] for i in range(len(run.data))]))


def test_log_covers_every_sample_once_per_epoch(tiny_run):
    run = tiny_run
    n = len(run.data)
    per_epoch = run.log.indices.reshape(run.config.epochs, n)
    for epoch in per_epoch:
        assert sorted(epoch.tolist()) == list(range(n))
    assert run.log.timesteps.min() >= 0 and run.log.timesteps.max() < 1000


def test_checkpoint_weight_is_lr_times_steps_times_batch_over_n(tiny_run):
    run = tiny_run
    steps_per_epoch = len(run.data) // run.config.batch_size + (len(run.data) % run.config.batch_size > 0)
    c = run.checkpoints[0]
    assert c.step == steps_per_epoch
    assert c.visits == len(run.data)  # one epoch: every sample once
    assert run.checkpoint_weights()[0].item() == pytest.approx(run.config.lr * c.visits / len(run.data))
    assert [c.epoch for c in run.checkpoints] == [1, 2, 3]


def test_same_config_is_bit_identical_and_a_changed_field_retrains(tiny_config, tiny_digits, tmp_path):
    a = rl.train(tiny_config, tiny_digits, progress=False)
    b = rl.train(tiny_config, tiny_digits, progress=False)
    for ca, cb in zip(a.checkpoints, b.checkpoints):
        assert all(torch.equal(ca.params[k], cb.params[k]) for k in ca.params)
    assert torch.equal(a.log.noise, b.log.noise)

    first = rl.load_or_train(tiny_config, tiny_digits, progress=False, root=tmp_path)
    again = rl.load_or_train(tiny_config, tiny_digits, progress=False, root=tmp_path)
    assert again.path == first.path
    assert torch.equal(again.checkpoints[-1].params["conv_in.weight"], a.checkpoints[-1].params["conv_in.weight"])
    changed = rl.load_or_train(tiny_config.replace(seed=1), tiny_digits, progress=False, root=tmp_path)
    assert changed.path != first.path
    assert not torch.equal(changed.checkpoints[-1].params["conv_in.weight"],
                           a.checkpoints[-1].params["conv_in.weight"])
    other_data = rl.load_or_train(tiny_config, tiny_digits.subset(range(32)), progress=False, root=tmp_path)
    assert other_data.path not in (first.path, changed.path)


def test_cache_refuses_another_config_and_corrupted_files(tiny_run, tiny_config, tiny_digits, tmp_path):
    folder = rl.save_run(tiny_run, tmp_path / "run")
    with pytest.raises(CacheError, match="differs in: lr"):
        rl.load_run(folder, tiny_config.replace(lr=1e-4), tiny_digits)
    with pytest.raises(CacheError, match="data"):
        rl.load_run(folder, tiny_config, tiny_digits.subset(range(32)))
    loaded = rl.load_run(folder, tiny_config, tiny_digits)
    assert torch.equal(loaded.log.noise, tiny_run.log.noise)

    weights = folder / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    with pytest.raises(CacheError, match="corrupted"):
        rl.load_run(folder, tiny_config, tiny_digits)
    (folder / "log.safetensors").unlink()
    with pytest.raises(CacheError, match="missing log.safetensors"):
        rl.load_run(folder, tiny_config, tiny_digits)


def test_interrupted_write_leaves_no_cache_entry(tiny_run, tmp_path):
    final = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with rl.cache.atomic_folder(final) as tmp:
            (tmp / "config.json").write_text(json.dumps({}))
            raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_index_out_of_range(tiny_run):
    with pytest.raises(IndexError, match="has 3 checkpoints"):
        tiny_run.model_at(3)
    with pytest.raises(IndexError, match="has 3 checkpoints"):
        tiny_run.recorded(-4)
    assert torch.equal(tiny_run.model_at(-1).conv_in.weight, tiny_run.model_at(2).conv_in.weight)


def test_run_without_log_says_so(tiny_run):
    import dataclasses
    with pytest.raises(ValueError, match="no training log"):
        dataclasses.replace(tiny_run, log=None).recorded(0)


def test_mlp_run_on_points_and_sampling(tiny_points_run, tiny_run):
    pts = rl.generate(tiny_points_run.model_at(-1), tiny_points_run.scheduler, 10, steps=20, seed=3)
    assert pts.shape == (10, 2) and torch.isfinite(pts).all()
    imgs = rl.generate(tiny_run.model_at(-1), tiny_run.scheduler, 3, steps=10, seed=3)
    assert imgs.shape == (3, 1, 8, 8) and imgs.min() >= -1 and imgs.max() <= 1
    assert torch.equal(imgs, rl.generate(tiny_run.model_at(-1), tiny_run.scheduler, 3, steps=10, seed=3))
    assert tiny_run.scheduler.timesteps.numel() == 1000  # sampling left the run's scheduler alone


def test_save_run_refuses_an_existing_folder(tiny_run, tmp_path):
    folder = rl.save_run(tiny_run, tmp_path / "run")
    before = (folder / "weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="exists already"):
        rl.save_run(tiny_run, folder)
    assert (folder / "weights.safetensors").read_bytes() == before
    assert rl.save_run(tiny_run, folder, exist_ok=True) == folder   # the cache's concurrent writers
