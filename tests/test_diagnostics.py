"""Timestep-bias diagnostics, checked against the reference gradient loop and hand computations."""
import math
import os
import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch

from retrac_lib import diagnostics as D
from retrac_lib.grads import per_sample_grads_loop
from retrac_lib.losses import diffusion_loss
from retrac_lib.ranking import spearman

matplotlib.use("Agg")


def _loop_norms(model, run, x, t, eps, loss="mse"):
    return per_sample_grads_loop(model, run.scheduler, x, t, eps, loss=loss).norm(dim=1)


# ---------------------------------------------------------------------------------------------
# norms of a batch


def test_grad_norms_equal_the_loop_norms_and_ignore_chunking(tiny_run):
    run = tiny_run
    model = run.model_at(-1)
    t, eps = run.recorded(-1)
    x = run.data.images[:7]
    ref = _loop_norms(model, run, x, t[:7], eps[:7])
    for chunk in (1, 3, 64):
        got = D.grad_norms(model, run.scheduler, x, t[:7], eps[:7], chunk_size=chunk)
        assert got.shape == (7,)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_grad_norms_of_2d_points(tiny_points_run):
    run = tiny_points_run
    model = run.model_at(-1)
    t, eps = run.recorded(-1)
    x = run.data.images[:5]
    grads = per_sample_grads_loop(model, run.scheduler, x, t[:5], eps[:5])
    norms = D.grad_norms(model, run.scheduler, x, t[:5], eps[:5], chunk_size=2)
    torch.testing.assert_close(norms, grads.norm(dim=1), rtol=1e-5, atol=0)


def test_sample_losses_equal_diffusion_loss(tiny_run):
    run = tiny_run
    model = run.model_at(0)
    t, eps = run.recorded(0)
    got = D.sample_losses(model, run.scheduler, run.data.images, t, eps, "l1", chunk_size=7)
    with torch.no_grad():
        ref = diffusion_loss(model, run.scheduler, run.data.images, t, eps, "l1")
    torch.testing.assert_close(got, ref)


def test_grad_norms_refuses_bad_batches(tiny_run):
    run = tiny_run
    model = run.model_at(-1)
    x = run.data.images[:3]
    with pytest.raises(ValueError, match="must describe the same batch"):
        D.grad_norms(model, run.scheduler, x, torch.tensor([1, 2]), torch.randn_like(x))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        D.grad_norms(model, run.scheduler, x, torch.tensor([1, 2, 1000]), torch.randn_like(x))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        D.grad_norms(model, run.scheduler, x, torch.tensor([1, 2, 3]), torch.randn_like(x), chunk_size=0)


# ---------------------------------------------------------------------------------------------
# the training set at its recorded timesteps


def test_recorded_norms_match_the_loop_at_the_recorded_timestep_and_noise(tiny_run):
    run = tiny_run
    for c in (0, 2):
        rec = D.recorded_norms(run, c, indices=[5, 0, 17], chunk_size=2)
        t, eps = run.recorded(c)
        idx = torch.tensor([5, 0, 17])
        assert rec.indices.tolist() == [5, 0, 17]
        assert torch.equal(rec.timesteps, t[idx])
        assert rec.label == f"epoch {run.checkpoints[c].epoch}" and rec.recorded_at == c
        model = run.model_at(c)
        torch.testing.assert_close(rec.norms, _loop_norms(model, run, run.data.images[idx], t[idx], eps[idx]),
                                   rtol=1e-5, atol=0)
        with torch.no_grad():
            ref_loss = diffusion_loss(model, run.scheduler, run.data.images[idx], t[idx], eps[idx])
        torch.testing.assert_close(rec.losses, ref_loss)


def test_recorded_norms_at_init_use_initial_weights_and_last_recorded_draws(tiny_run):
    run = tiny_run
    rec = D.recorded_norms(run, "init")
    assert rec.label == "init" and rec.recorded_at == len(run.checkpoints) - 1
    t, eps = run.recorded(-1)
    assert len(rec.norms) == len(run.data) and torch.equal(rec.timesteps, t)
    ref = _loop_norms(run.initial_model(), run, run.data.images[:4], t[:4], eps[:4])
    torch.testing.assert_close(rec.norms[:4], ref, rtol=1e-5, atol=0)


def test_recorded_norms_with_another_loss(tiny_points_run):
    run = tiny_points_run
    rec = D.recorded_norms(run, -1, indices=range(4), loss="l1")
    t, eps = run.recorded(-1)
    ref = _loop_norms(run.model_at(-1), run, run.data.images[:4], t[:4], eps[:4], loss="l1")
    torch.testing.assert_close(rec.norms, ref, rtol=1e-5, atol=0)


def test_checkpoint_names_and_errors(tiny_run):
    run = tiny_run
    assert D.checkpoint_keys(run) == ["init", 0, 1, 2]
    assert D.checkpoint_keys(run, include_init=False) == [0, 1, 2]
    assert [D.checkpoint_label(run, k) for k in D.checkpoint_keys(run)] == ["init", "epoch 1", "epoch 2", "epoch 3"]
    assert D.checkpoint_label(run, -1) == "epoch 3"
    with pytest.raises(ValueError, match="checkpoint must be an index into run.checkpoints or 'init'"):
        D.recorded_norms(run, "last")
    with pytest.raises(IndexError, match="Checkpoint 7 does not exist: this run has 3 checkpoints"):
        D.recorded_norms(run, 7)


# ---------------------------------------------------------------------------------------------
# one sample across the timestep grid


def test_sweep_matches_the_loop_at_every_timestep_and_draw(tiny_run):
    run = tiny_run
    sw = D.sweep_run(run, [4, 9], checkpoint=1, timesteps=[0, 250, 999], n_noise=2, seed=3, chunk_size=5)
    assert sw.norms.shape == sw.losses.shape == (2, 3, 2)
    assert sw.label == "epoch 2" and sw.indices.tolist() == [4, 9]
    noise = D.sample_noise(run.data.sample_shape, [4, 9], n_noise=2, seed=3)
    model = run.model_at(1)
    for s, i in enumerate([4, 9]):
        for j, t in enumerate([0, 250, 999]):
            x = run.data.images[i].expand(2, *run.data.sample_shape)
            ts = torch.full((2,), t)
            torch.testing.assert_close(sw.norms[s, j], _loop_norms(model, run, x, ts, noise[s]),
                                       rtol=1e-5, atol=0)
            with torch.no_grad():
                ref_loss = diffusion_loss(model, run.scheduler, x, ts, noise[s])
            torch.testing.assert_close(sw.losses[s, j], ref_loss)
    torch.testing.assert_close(sw.mean_norms, sw.norms.mean(-1))
    torch.testing.assert_close(sw.swing(), sw.mean_norms.max(1).values / sw.mean_norms.min(1).values)


def test_sweep_noise_is_seeded_per_sample(tiny_points_run):
    run = tiny_points_run
    alone = D.sweep_run(run, [7], "init", timesteps=4, n_noise=3)
    together = D.sweep_run(run, [2, 7], "init", timesteps=4, n_noise=3)
    torch.testing.assert_close(together.norms[1], alone.norms[0])
    assert torch.equal(D.sample_noise((2,), [7], 3), D.sample_noise((2,), [7], 3))
    assert not torch.equal(D.sample_noise((2,), [7], 3, seed=0), D.sample_noise((2,), [7], 3, seed=1))
    # An integer grid is evenly spaced in [1, T - 1], like the attribution grid.
    assert alone.timesteps.tolist() == [1, 334, 666, 999]


def test_sweep_refuses_bad_grids_and_noise(tiny_run):
    run = tiny_run
    with pytest.raises(ValueError, match=r"timesteps must be a non-empty list in \[0, 1000\)"):
        D.sweep_run(run, [0], timesteps=[10, 1000])
    x = run.data.images[:2]
    with pytest.raises(ValueError, match=r"noise must be \[S, K, \*sample\]"):
        D.sweep(run.model_at(-1), run.scheduler, x, torch.tensor([5]), torch.randn(2, 1, 64))


# ---------------------------------------------------------------------------------------------
# summaries against hand computations


def test_bin_by_timestep_by_hand():
    t = torch.tensor([0, 99, 100, 249, 250, 999, 760])
    v = torch.tensor([1.0, 2.0, 6.0, 3.0, 10.0, 4.0, 8.0])
    b = D.bin_by_timestep(t, v, n_bins=4, num_train_timesteps=1000)
    # Bins [0, 250), [250, 500), [500, 750), [750, 1000).
    assert b.count.tolist() == [4, 1, 0, 2]
    assert b.edges.tolist() == [0, 250, 500, 750, 1000]
    assert b.centers.tolist() == [125, 375, 625, 875]
    assert b.mean[0].item() == pytest.approx(3.0)            # (1 + 2 + 6 + 3) / 4
    assert b.std[0].item() == pytest.approx(math.sqrt((4 + 1 + 9 + 0) / 4))
    assert b.median[0].item() == pytest.approx(2.5)
    assert b.mean[1].item() == 10.0 and b.std[1].item() == 0.0
    assert math.isnan(b.mean[2].item()) and math.isnan(b.q25[2].item())
    assert b.mean[3].item() == pytest.approx(6.0)
    assert b.q25[3].item() == pytest.approx(5.0) and b.q75[3].item() == pytest.approx(7.0)


def test_bin_by_timestep_errors():
    with pytest.raises(ValueError, match="3 timesteps but 2 values"):
        D.bin_by_timestep([1, 2, 3], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        D.bin_by_timestep([1, 1000], [1.0, 2.0])
    with pytest.raises(ValueError, match="n_bins must be >= 1"):
        D.bin_by_timestep([1], [1.0], n_bins=0)


def test_decile_ratio_by_hand():
    gen = torch.Generator().manual_seed(0)
    t = torch.randperm(20, generator=gen) * 50
    norms = 100.0 / (t + 1)
    order = sorted(range(20), key=lambda i: int(t[i]))
    low, high = [float(norms[i]) for i in order[:2]], [float(norms[i]) for i in order[-2:]]
    assert D.decile_ratio(t, norms) == pytest.approx(np.mean(low) / np.mean(high))
    # Fewer than ten samples: each end keeps one.
    assert D.decile_ratio([5, 1, 9], [2.0, 8.0, 4.0]) == pytest.approx(8.0 / 4.0)
    # Ties keep index order (a stable sort).
    assert D.decile_ratio([0, 0, 1, 1], [1.0, 3.0, 5.0, 7.0], fraction=0.25) == pytest.approx(1.0 / 7.0)
    assert D.decile_ratio(t, torch.ones(20)) == 1.0
    with pytest.raises(ValueError, match="need matching timesteps and norms"):
        D.decile_ratio([1, 2], [1.0])
    with pytest.raises(ValueError, match=r"fraction must lie in \(0, 0.5\]"):
        D.decile_ratio([1, 2], [1.0, 2.0], fraction=0.7)


def test_spearman_by_hand():
    t = torch.tensor([10, 400, 30, 900, 200])
    norms = torch.tensor([5.0, 0.3, 4.0, 0.7, 1.0])
    # No ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)) on the ranks.
    rt = torch.argsort(torch.argsort(t)).double()
    rn = torch.argsort(torch.argsort(norms)).double()
    n = len(t)
    expected = 1 - 6 * ((rt - rn) ** 2).sum().item() / (n * (n * n - 1))
    assert float(spearman(t, norms)) == pytest.approx(expected)
    assert float(spearman([1, 2, 3], [3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1.0])


def test_bias_over_training_summarizes_every_checkpoint(tiny_run):
    run = tiny_run
    history = D.bias_over_training(run, indices=range(0, 40, 2), n_bins=5)
    assert [s.label for s in history] == ["init", "epoch 1", "epoch 2", "epoch 3"]
    for c, s in zip(D.checkpoint_keys(run), history):
        rec = D.recorded_norms(run, c, indices=range(0, 40, 2))
        torch.testing.assert_close(s.record.norms, rec.norms)
        assert s.decile_ratio == pytest.approx(D.decile_ratio(rec.timesteps, rec.norms))
        assert s.spearman == pytest.approx(float(spearman(rec.timesteps, rec.norms)))
        torch.testing.assert_close(s.norm_bins.mean, D.bin_by_timestep(rec.timesteps, rec.norms, 5).mean,
                                   equal_nan=True)
        torch.testing.assert_close(s.loss_bins.mean, D.bin_by_timestep(rec.timesteps, rec.losses, 5).mean,
                                   equal_nan=True)
        assert s.norm_bins.count.sum().item() == 20
    assert [s.record.recorded_at for s in history] == [2, 0, 1, 2]


# ---------------------------------------------------------------------------------------------
# figures and the explorer


def test_figures_draw_the_measured_values(tiny_run):
    from retrac_lib.book.plots import bias as P

    run = tiny_run
    history = D.bias_over_training(run, indices=range(12))
    fig = P.recorded_scatter(history[-1])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.collections[0].get_offsets(),
                               np.stack([history[-1].record.timesteps.numpy(),
                                         history[-1].record.norms.numpy()], 1), rtol=1e-6)
    fig = P.over_training(history)
    bars = [p.get_height() for p in fig.axes[1].patches]
    assert bars == pytest.approx([s.decile_ratio for s in history])
    sweeps = [D.sweep_run(run, [0, 3], c, timesteps=4) for c in D.checkpoint_keys(run)]
    fig = P.small_multiples(run, sweeps, ncols=2)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["init", "epoch 1", "epoch 2", "epoch 3"]
    np.testing.assert_allclose(lines[-1].get_ydata(), sweeps[-1].mean_norms[0].numpy(), rtol=1e-6)
    for f in (P.norm_vs_timestep(sweeps[-1], run), P.loss_beside_norm(history),
              P.proponents_preview(run, run.data.images[:2], torch.tensor([[1, 2], [3, 4]]),
                                   run.recorded(-1)[0])):
        assert f.axes
    matplotlib.pyplot.close("all")


def test_points_figure(tiny_points_run):
    from retrac_lib.book.plots import bias as P

    history = D.bias_over_training(tiny_points_run)
    fig = P.points_bias(tiny_points_run, history)
    colours = fig.axes[0].collections[0].get_array()
    np.testing.assert_allclose(colours, history[-1].record.norms.numpy(), rtol=1e-6)
    matplotlib.pyplot.close("all")


def test_widgets_import_without_a_display():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "MPLBACKEND", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-c", "import retrac_lib.book.widgets as w; print(w.TimestepExplorer.__name__)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "TimestepExplorer"


def test_explorer_redraws_the_chosen_sample_and_checkpoint(tiny_run, capsys):
    from retrac_lib.book.widgets import TimestepExplorer

    run = tiny_run
    explorer = TimestepExplorer(run, timesteps=5, sample=2)
    first = bytes(explorer.image.value)
    assert first.startswith(b"\x89PNG") and explorer.image.format == "png"
    assert explorer.checkpoint.value == 2 and explorer.sample.max == len(run.data) - 1
    assert [label for label, _ in explorer.checkpoint.options] == ["init", "epoch 1", "epoch 2", "epoch 3"]
    explorer.sample.value = 11
    explorer.checkpoint.value = "init"
    expected = D.sweep_run(run, [11], "init", timesteps=5)
    drawn = [ln for ln in explorer.figure.axes[1].get_lines() if ln.get_label() == "init"]
    assert len(drawn) == 1
    np.testing.assert_allclose(drawn[0].get_ydata(), expected.mean_norms[0].numpy(), rtol=1e-6)
    # The curve of sample 11 at the last checkpoint, visited before, stays in grey.
    assert "epoch 3 (visited)" in [ln.get_label() for ln in explorer.figure.axes[1].get_lines()]
    assert set(explorer._curves) == {(2, 2), (11, 2), (11, "init")}
    redrawn = bytes(explorer.image.value)
    assert redrawn.startswith(b"\x89PNG") and redrawn != first
    with pytest.raises(ValueError, match="sample 40 is not a training index"):
        TimestepExplorer(run, sample=40)
    capsys.readouterr()
