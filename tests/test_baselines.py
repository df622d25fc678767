"""Baselines (chapter 5) under rl.attribute's interface: D-TRAK, plain
gradient cosine, pixel nearest neighbours and random scores."""
from __future__ import annotations

import pytest
import torch

import retrac_lib as rl
from retrac_lib.evaluation import baselines, counterfactual

OPTS = dict(timesteps=3, n_noise=2, progress=False)


def test_square_norm_output_function_ignores_the_true_noise(generator):
    pred = torch.randn(4, 2, generator=generator)
    a = rl.losses.error_loss(pred, torch.zeros(4, 2), "square_norm")
    b = rl.losses.error_loss(pred, torch.randn(4, 2, generator=generator), "square_norm")
    assert torch.equal(a, b) and torch.allclose(a, pred.square().mean(1))


def test_pixel_scores_are_negative_distances(tiny_points_run):
    q = tiny_points_run.data.images[[3, 7]] + 0.01
    res = baselines.attribute_baseline(tiny_points_run, q, "pixel")
    expected = -torch.cdist(q.double(), tiny_points_run.data.images.double())
    assert torch.allclose(res.scores, expected)
    assert res.proponents(1).flatten().tolist() == [3, 7]
    assert res.config.method == "pixel" and res.scores.shape == (2, len(tiny_points_run.data))


def test_random_scores_are_seeded(tiny_points_run):
    q = tiny_points_run.data.images[:3]
    a = baselines.attribute_baseline(tiny_points_run, q, "random", seed=1)
    b = baselines.attribute_baseline(tiny_points_run, q, "random", seed=1, timesteps=5)
    c = baselines.attribute_baseline(tiny_points_run, q, "random", seed=2)
    assert torch.equal(a.scores, b.scores) and not torch.equal(a.scores, c.scores)
    assert a.scores.shape == (3, len(tiny_points_run.data))


def test_cosine_is_retrac_with_one_normalization_of_the_averaged_query(tiny_points_run):
    q = tiny_points_run.data.images[:2]
    res = baselines.attribute_baseline(tiny_points_run, q, "cosine", **OPTS)
    ref = rl.attribute(tiny_points_run, q, "retrac", normalization="cosine", **OPTS)
    assert torch.equal(res.scores, ref.scores)
    assert res.config.method == "cosine" and res.config.normalization == "cosine"


def test_dtrak_baseline_is_rl_dtrak(tiny_points_run):
    q = tiny_points_run.data.images[:2]
    res = baselines.attribute_baseline(tiny_points_run, q, "dtrak", seed=3, timesteps=4, proj_dim=16)
    ref = rl.dtrak.attribute_dtrak(tiny_points_run, q, seed=3, timesteps=4, proj_dim=16)
    assert torch.equal(res.scores, ref.scores) and res.config.method == "dtrak"
    with pytest.raises(TypeError, match="n_noise"):
        baselines.attribute_baseline(tiny_points_run, q, "dtrak", n_noise=2)


def test_load_or_attribute_baseline_caches_gradient_baselines(tiny_points_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path))
    q = tiny_points_run.data.images[:2]
    first = baselines.load_or_attribute_baseline(tiny_points_run, q, "cosine", **OPTS)
    assert len(list((tmp_path / "attributions").iterdir())) == 1

    def no_computing(*args, **kwargs):
        raise AssertionError("the second call must come from the cache")

    with monkeypatch.context() as m:
        m.setattr(rl.attribution.scoring, "score", no_computing)
        again = baselines.load_or_attribute_baseline(tiny_points_run, q, "cosine", **OPTS)
        assert torch.equal(first.scores, again.scores) and again.config.method == "cosine"
        assert again.seconds == first.seconds  # the saved timing, not a new one
        with pytest.raises(AssertionError, match="from the cache"):  # other options: not cached
            baselines.load_or_attribute_baseline(tiny_points_run, q, "cosine", **{**OPTS, "n_noise": 3})
    both = baselines.attribute_any(tiny_points_run, q, "retrac", **OPTS)
    assert both.config.method == "retrac"


DTRAK = dict(seed=3, timesteps=4, proj_dim=16, progress=False)


def test_dtrak_results_are_cached_under_their_resolved_options(tiny_points_run, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path))
    run, q = tiny_points_run, tiny_points_run.data.images[:2]
    first = baselines.load_or_attribute_baseline(run, q, "dtrak", **DTRAK)
    assert torch.equal(first.scores, rl.dtrak.attribute_dtrak(run, q, **DTRAK).scores)
    assert len(list((tmp_path / "attributions").iterdir())) == 1

    def no_computing(*args, **kwargs):
        raise AssertionError("the second call must come from the cache")

    with monkeypatch.context() as m:
        m.setattr(rl.dtrak, "attribute_dtrak", no_computing)
        again = baselines.load_or_attribute_baseline(run, q, "dtrak", chunk_size=1,
                                                     checkpoints=[len(run.checkpoints) - 1],
                                                     **DTRAK)   # -1 resolved: the same key
        assert torch.equal(again.scores, first.scores) and again.config == first.config
        assert torch.equal(again.train_grad_norms, first.train_grad_norms)
        assert again.seconds == first.seconds
        for other in ({"proj_dim": 8}, {"damping": 0.2}, {"seed": 4}):
            with pytest.raises(AssertionError, match="from the cache"):
                baselines.load_or_attribute_baseline(run, q, "dtrak", **{**DTRAK, **other})
        with pytest.raises(AssertionError, match="from the cache"):   # other queries
            baselines.load_or_attribute_baseline(run, q + 1e-3, "dtrak", **DTRAK)
        with pytest.raises(ValueError, match="damping"):   # checked before the cache is read
            baselines.load_or_attribute_baseline(run, q, "dtrak", **{**DTRAK, "damping": 0})
        with pytest.raises(ValueError, match="chunk_size"):
            baselines.load_or_attribute_baseline(run, q, "dtrak", chunk_size=0, **DTRAK)
        with pytest.raises(TypeError, match="n_noise"):
            baselines.load_or_attribute_baseline(run, q, "dtrak", n_noise=2, **DTRAK)


def test_dtrak_self_influence_is_the_diagonal_and_cached_alone(tiny_points_run, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path))
    run = tiny_points_run
    full = rl.dtrak.attribute_dtrak(run, run.data.images, **DTRAK).scores
    cached = counterfactual.run_self_influence(run, "dtrak", **DTRAK)
    assert torch.equal(cached, full.diagonal())
    entry, = (tmp_path / "attributions").iterdir()
    stored = rl.cache.load_tensors(entry / "scores.safetensors")
    assert list(stored) == ["self_scores"] and stored["self_scores"].shape == (len(run.data),)
    with monkeypatch.context() as m:
        m.setattr(rl.dtrak, "attribute_dtrak", lambda *a, **k: pytest.fail("not from the cache"))
        assert torch.equal(rl.dtrak.load_or_self_scores(run, **DTRAK), cached)
    uncached = counterfactual.run_self_influence(run, "dtrak", cached=False, **DTRAK)
    assert torch.equal(uncached, cached)


def test_a_saved_dtrak_result_loads_with_its_config(tiny_points_run, tmp_path):
    res = rl.dtrak.attribute_dtrak(tiny_points_run, tiny_points_run.data.images[:2], **DTRAK)
    back = rl.AttributionResult.load(res.save(tmp_path / "dtrak"))
    assert isinstance(back.config, rl.dtrak.DTrakConfig) and back.config == res.config
    assert torch.equal(back.scores, res.scores) and back.query_noise is None


def test_bad_method_or_clashing_options_are_refused(tiny_points_run):
    q = tiny_points_run.data.images[:1]
    with pytest.raises(ValueError, match="method must be one of"):
        baselines.attribute_baseline(tiny_points_run, q, "trak")
    with pytest.raises(ValueError, match="fixes normalization='cosine'"):
        baselines.attribute_baseline(tiny_points_run, q, "cosine", normalization="per_timestep", **OPTS)
    with pytest.raises(ValueError, match="queries"):
        baselines.attribute_baseline(tiny_points_run, torch.zeros(2, 3), "pixel")


def test_baseline_results_say_what_they_lack(tiny_points_run, tmp_path):
    q = tiny_points_run.data.images[:2]
    res = baselines.attribute_baseline(tiny_points_run, q, "pixel")
    assert res.config == baselines.BaselineConfig("pixel", 0)
    with pytest.raises(ValueError, match="'pixel' scores read no recorded timesteps"):
        res.recorded_timesteps(tiny_points_run)
    with pytest.raises(TypeError, match="Only rl.attribute and D-TRAK results are saved"):
        res.save(tmp_path / "pixel")
    assert not (tmp_path / "pixel").exists()
