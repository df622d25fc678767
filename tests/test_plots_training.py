"""Chapter 1's figures draw from a run without errors, with titles and labelled axes."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from retrac_lib.book.plots import training as plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def _check(fig):
    assert fig._suptitle is not None or any(ax.get_title() for ax in fig.axes)
    drawn = [ax for ax in fig.axes if ax.lines or ax.collections or ax.patches]
    assert all(ax.get_xlabel() for ax in drawn)  # panels that share y label it once, on the left
    assert not drawn or drawn[0].get_ylabel()


def test_running_mean_matches_a_plain_loop():
    y = np.array([4.0, 2.0, 6.0, 1.0, 3.0])
    expected = [np.mean(y[max(0, i - 2):i + 1]) for i in range(len(y))]
    assert np.allclose(plots.running_mean(y, 3), expected)


def test_figures_for_an_image_run(tiny_run):
    run, T = tiny_run, tiny_run.config.num_train_timesteps
    _check(plots.digits_grid(run.data, n=10))
    _check(plots.forward_process(run.scheduler, run.data.images[0], [0, 100, T - 1]))
    _check(plots.loss_curve(run.losses, [c.step for c in run.checkpoints]))
    imgs = run.data.images[:6]
    _check(plots.samples_vs_data(imgs, imgs, ncols=4))
    _check(plots.samples_by_checkpoint([imgs, imgs], ["a", "b"]))
    t, eps = run.recorded(-1)
    _check(plots.timestep_histogram(t, T))
    _check(plots.loss_vs_timestep(t, torch.rand(len(t)) + 0.1))
    visits = (run.log.indices == 0).nonzero().flatten()
    epochs = visits // len(run.data) + 1
    recorded = [run.recorded(c.index)[0][0] for c in run.checkpoints]
    fig = plots.timestep_history(epochs, run.log.timesteps[visits],
                                 [c.epoch for c in run.checkpoints], recorded, 0, T)
    _check(fig)
    assert recorded[-1] == run.log.timesteps[visits][-1]  # the last checkpoint keeps the last visit


def test_figures_for_a_points_run(tiny_points_run):
    run = tiny_points_run
    _check(plots.points_scatter(run.data))
    fig = plots.points_by_checkpoint(run.data, [run.data.images, run.data.images], ["a", "b"])
    _check(fig)
    assert fig.legends
