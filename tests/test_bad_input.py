"""Bad input never yields a silent wrong answer: each case below once returned noise, zeros or a
coerced value, or crashed deep inside torch; now it gets a clear error naming the argument."""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

import retrac_lib as rl
from retrac_lib import diagnostics as D
from retrac_lib.attribution import sketch_training
from retrac_lib.evaluation import counterfactual as cf
from retrac_lib.evaluation import metrics
from retrac_lib.losses import add_noise
from retrac_lib.validation import OutOfRangeWarning

OPTS = dict(timesteps=3, n_noise=2, progress=False)


@pytest.fixture(scope="module")
def digit_queries():
    return rl.data.digits("test").images[:2]


def _batch(run, n=4):
    t, eps = run.recorded(-1)
    return run.data.images[:n], t[:n], eps[:n]


# 1. Integer images would be noised into pure noise (diffusers casts the schedule to their dtype).

def test_integer_images_are_refused_everywhere(tiny_run):
    run, model = tiny_run, tiny_run.model_at(-1)
    x, t, eps = _batch(run)
    pixels = ((x + 1) * 127.5).round()
    for dtype in (torch.uint8, torch.long):
        with pytest.raises(TypeError, match=rf"images have dtype {dtype}.*floating point.*127.5 - 1"):
            rl.data.Dataset("ints", pixels.to(dtype), torch.zeros(4, dtype=torch.long))
        with pytest.raises(TypeError, match=rf"x has dtype {dtype}.*floating point"):
            rl.per_sample_grads(model, run.scheduler, pixels.to(dtype), t, eps)
        with pytest.raises(TypeError, match=rf"queries have dtype {dtype}.*floating point"):
            cf.query_loss(model, run.scheduler, pixels.to(dtype), timesteps=3, n_noise=1)
        with pytest.raises(TypeError, match=rf"queries have dtype {dtype}.*floating point"):
            rl.attribute(run, pixels.to(dtype), "tracin", **OPTS)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):  # the forward process itself
        add_noise(run.scheduler, pixels.long(), t, eps)


# 2. A negative chunk size gave all-zero gradients, a zero sketch and uninitialised losses.

@pytest.mark.parametrize("bad, error, message", [
    (-1, ValueError, r"chunk_size must be >= 1, got -1.*must be at least 1"),
    (0, ValueError, r"chunk_size must be >= 1, got 0"),
    (2.5, TypeError, r"chunk_size must be an integer, got 2.5"),
    (True, TypeError, r"chunk_size must be an integer, got True"),
])
def test_chunk_size_is_checked_by_every_entry_point(bad, error, message, tiny_run, digit_queries):
    run, model = tiny_run, tiny_run.model_at(-1)
    x, t, eps = _batch(run)
    calls = [
        lambda: rl.per_sample_grads(model, run.scheduler, x, t, eps, chunk_size=bad),
        lambda: rl.grads.grouped_grads(model, run.scheduler, x[:, None], t[:, None], eps[:, None],
                                       chunk_size=bad),
        lambda: sketch_training(run, 16, checkpoints=[0], chunk_size=bad, progress=False),
        lambda: rl.attribute(run, digit_queries, chunk_size=bad, **OPTS),
        lambda: D.sample_losses(model, run.scheduler, x, t, eps, chunk_size=bad),
        lambda: D.grad_norms(model, run.scheduler, x, t, eps, chunk_size=bad),
        lambda: cf.query_loss(model, run.scheduler, digit_queries, timesteps=3, n_noise=1,
                              chunk_size=bad),
    ]
    for call in calls:
        with pytest.raises(error, match=message):
            call()


# 3. A NaN retrain loss counted as an LDS of 0 (the ptp > 0 guard), halving a perfect mean.

def test_lds_refuses_non_finite_losses_and_scores():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    masks = cf.random_subsets(6, 8, seed=1)
    losses = -(masks.double() @ scores.T)                  # a perfect additive attribution
    assert cf.lds(scores, masks, losses).mean == pytest.approx(1.0)
    losses[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"losses contains NaN.*subset 3, query 1"):
        cf.lds(scores, masks, losses)
    scores[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"scores contains NaN.*query 1, training sample 4"):
        cf.lds(scores, masks, -(masks.double() @ scores.T).nan_to_num())


# 5. Silent coercions of timesteps, checkpoints and configuration fields.

@pytest.mark.parametrize("timesteps, error, message", [
    (2.5, TypeError, r"timesteps must be an integer, got 2.5"),
    ([10.7, 500.2], TypeError, r"timesteps must be integers.*\[10.7, 500.2\]"),
    (torch.tensor([10.0, 500.0]), TypeError, r"timesteps must be integers"),
    ([10, 500, 10], ValueError, r"timesteps \[10\] appear more than once"),
    (1000, ValueError, r"timesteps=1000 evenly spaced points do not fit in \[1, 999\]"),
    ("10", TypeError, r"timesteps must be a number of grid points"),
    ([[1, 2]], ValueError, r"timesteps must be a non-empty list"),
])
def test_timesteps_are_never_coerced(timesteps, error, message, tiny_run, digit_queries):
    model = tiny_run.model_at(-1)
    with pytest.raises(error, match=message):
        rl.attribute(tiny_run, digit_queries, timesteps=timesteps, n_noise=1, progress=False)
    with pytest.raises(error, match=message):
        D.sweep_run(tiny_run, [0], timesteps=timesteps)
    with pytest.raises(error, match=message):
        cf.query_loss(model, tiny_run.scheduler, digit_queries, timesteps=timesteps, n_noise=1)


def test_unknown_options_are_refused_even_when_cached(tiny_run, digit_queries, tmp_path):
    rl.load_or_attribute(tiny_run, digit_queries, "tracin", root=tmp_path, **OPTS)
    for call in (rl.attribute, lambda *a, **kw: rl.load_or_attribute(*a, root=tmp_path, **kw)):
        with pytest.raises(TypeError, match=r"Unknown option\(s\) \['n_noises'\]; attribute takes"):
            call(tiny_run, digit_queries, "tracin", n_noises=3, **OPTS)


@pytest.mark.parametrize("checkpoints, error, message", [
    ([0, 0], ValueError, r"name checkpoint\(s\) \[0\] more than once"),
    ([2, -1], ValueError, r"name checkpoint\(s\) \[2\] more than once"),
    ([1.7], TypeError, r"checkpoints entry must be an integer, got 1.7"),
    (1, TypeError, r"checkpoints must be a list of checkpoint indices \(e.g. \[1\]\)"),
])
def test_checkpoints_are_never_coerced(checkpoints, error, message, tiny_run, digit_queries):
    with pytest.raises(error, match=message):
        rl.attribute(tiny_run, digit_queries, checkpoints=checkpoints, **OPTS)
    with pytest.raises(error, match=message):
        sketch_training(tiny_run, 16, checkpoints=checkpoints, progress=False)
    with pytest.raises(TypeError, match="checkpoint must be an integer, got 1.7"):
        D.model_at(tiny_run, 1.7)


@pytest.mark.parametrize("indices, error, message", [
    (torch.tensor([0.7, 1.2]), TypeError, r"indices must be integers, got torch.float32 values"),
    ([0.0, 1.0], TypeError, r"indices must be integers, got torch.float32 values"),
    (torch.tensor([True, False]), TypeError, r"indices is a boolean mask; pass .*mask.nonzero"),
    ([-1], ValueError, r"indices \[-1\] lie outside \[0, 40\).*not counted from the end"),
    ([3, 40], ValueError, r"indices \[40\] lie outside \[0, 40\): there are 40 samples"),
    ("3", TypeError, r"indices must be integer sample indices, got '3'"),
])
def test_training_indices_are_never_cast_or_wrapped(indices, error, message, tiny_run):
    assert len(tiny_run.data) == 40
    with pytest.raises(error, match=message):
        D.recorded_norms(tiny_run, -1, indices=indices)
    with pytest.raises(error, match=message):
        D.sweep_run(tiny_run, indices, timesteps=3)
    with pytest.raises(error, match=message):
        tiny_run.data.subset(indices)
    with pytest.raises(error, match=message.replace("indices", "removed", 1)):
        cf.kept_without(40, indices)
    scores = torch.zeros(len(torch.as_tensor(indices).reshape(-1)) if not isinstance(indices, str) else 1, 40)
    with pytest.raises(error, match=message.replace("indices", "query_train_indices", 1)):
        metrics.self_rank(scores, indices)


def test_training_indices_accept_ints_ranges_and_integer_tensors(tiny_run):
    a = D.recorded_norms(tiny_run, -1, indices=[3, 5]).norms
    assert torch.equal(D.recorded_norms(tiny_run, -1, indices=torch.tensor([3, 5])).norms, a)
    assert torch.equal(D.recorded_norms(tiny_run, -1, indices=range(3, 6, 2)).norms, a)
    assert torch.equal(D.recorded_norms(tiny_run, -1, indices=np.array([3, 5])).norms, a)
    assert torch.equal(tiny_run.data.subset(7).images, tiny_run.data.images[[7]])


@pytest.mark.parametrize("field, value, error, message", [
    ("clip_sample", "no", TypeError, r"clip_sample must be True or False, got 'no'"),
    ("epochs", 1.5, TypeError, r"TrainConfig.epochs must be an integer, got 1.5"),
    ("block_out_channels", (0,), ValueError, r"block_out_channels entry must be >= 1, got 0"),
    ("block_out_channels", 16, TypeError, r"block_out_channels must be a tuple"),
    ("layers_per_block", 0, ValueError, r"layers_per_block must be >= 1"),
    ("lr", "1e-3", TypeError, r"TrainConfig.lr must be a real number"),
    ("lr", float("nan"), ValueError, r"TrainConfig.lr must be finite"),
    ("seed", 0.5, TypeError, r"TrainConfig.seed must be an integer"),
    ("seed", -1, ValueError, r"TrainConfig.seed must be >= 0, got -1"),
    ("beta_schedule", "cosine", ValueError, r"beta_schedule='cosine' is not one of"),
])
def test_config_fields_are_checked_not_coerced(field, value, error, message):
    with pytest.raises(error, match=message):
        rl.TrainConfig(**{field: value})


def test_config_keeps_its_cache_key_for_integer_types():
    assert rl.TrainConfig(epochs=np.int64(40)).to_dict() == rl.TrainConfig().to_dict()
    assert type(rl.TrainConfig(epochs=np.int64(40)).epochs) is int


# 11. Crashes deep inside torch become clear errors.

def test_empty_and_float64_data(tiny_config):
    empty = rl.data.Dataset("empty", torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="data 'empty' is empty"):
        rl.train(tiny_config, empty, progress=False)
    with pytest.raises(ValueError, match=r"images have dtype torch.float64.*images.to\(torch.float32\)"):
        rl.data.Dataset("f64", torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"images must be a torch.Tensor, got ndarray.*torch.as_tensor"):
        rl.data.Dataset("np", np.zeros((2, 1, 8, 8), np.float32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"n must be >= 2, got 1"):
        rl.data.moons(n=1)
    with pytest.raises(ValueError, match=r"n must be >= 2, got 1"):
        rl.data.gaussian_mixture(n=1)


def test_float64_inputs_are_named(tiny_run, digit_queries):
    run, model = tiny_run, tiny_run.model_at(-1)
    x, t, eps = _batch(run)
    with pytest.raises(ValueError, match=r"x has dtype torch.float64.*x.to\(torch.float32\)"):
        rl.per_sample_grads(model, run.scheduler, x.double(), t, eps)
    with pytest.raises(ValueError, match=r"noise has dtype torch.float64.*noise.to\(torch.float32\)"):
        rl.per_sample_grads(model, run.scheduler, x, t, eps.double())
    with pytest.raises(ValueError, match=r"query_noise has dtype torch.float64"):
        rl.attribute(run, digit_queries, query_noise=torch.zeros(2, 1, 8, 8, dtype=torch.float64), **OPTS)
    with pytest.raises(ValueError, match=r"queries have dtype torch.float64"):
        cf.query_loss(model, run.scheduler, digit_queries.double(), timesteps=3, n_noise=1)


def test_noise_draw_counts(tiny_run, digit_queries):
    model = tiny_run.model_at(-1)
    with pytest.raises(ValueError, match=r"K = 0 noise draws.*K >= 1"):
        rl.attribute(tiny_run, digit_queries, query_noise=torch.zeros(0, 1, 8, 8), **OPTS)
    with pytest.raises(ValueError, match=r"query_noise contains NaN"):
        rl.attribute(tiny_run, digit_queries, query_noise=torch.full((2, 1, 8, 8), float("nan")), **OPTS)
    with pytest.raises(ValueError, match=r"n_noise must be >= 1, got 0"):
        cf.query_loss(model, tiny_run.scheduler, digit_queries, timesteps=3, n_noise=0)
    for call in (lambda: cf.query_loss(model, tiny_run.scheduler, digit_queries, n_noise=1.5),
                 lambda: rl.attribute(tiny_run, digit_queries, timesteps=3, n_noise=1.5, progress=False),
                 lambda: D.sweep_run(tiny_run, [0], timesteps=3, n_noise=1.5)):
        with pytest.raises(TypeError, match=r"n_noise must be an integer, got 1.5"):
            call()


def test_numpy_queries_say_how_to_convert(tiny_run, digit_queries):
    with pytest.raises(TypeError, match=r"queries must be a torch.Tensor, got ndarray.*torch.as_tensor"):
        rl.attribute(tiny_run, digit_queries.numpy(), **OPTS)
    with pytest.raises(TypeError, match=r"queries must be a torch.Tensor"):
        cf.query_loss(tiny_run.model_at(-1), tiny_run.scheduler, digit_queries.numpy())


def test_meta_device_is_refused_and_never_moves_the_scheduler(tiny_run, digit_queries):
    run = dataclasses.replace(tiny_run, scheduler=copy.deepcopy(tiny_run.scheduler))
    for device, message in [("meta", "device='meta' holds no data"),
                            ("gpu", "device='gpu' is not a device")]:
        with pytest.raises(ValueError, match=message):
            rl.attribute(run, digit_queries, device=device, **OPTS)
        with pytest.raises(ValueError, match=message):
            sketch_training(run, 16, device=device, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available here"):
            rl.attribute(run, digit_queries, device="cuda", **OPTS)
    # The forward process itself leaves a shared scheduler where it was, whatever the input's device.
    x, t, eps = _batch(run)
    out = add_noise(run.scheduler, x.to("meta"), t, eps.to("meta"))
    assert out.device.type == "meta"
    assert run.scheduler.alphas_cumprod.device.type == "cpu"
    ok = rl.attribute(run, digit_queries, **OPTS)
    assert torch.isfinite(ok.scores).all()


# 12. Queries on another scale than the training images ([0, 1], 0..255) were scored silently.

def test_queries_on_another_scale_are_refused_before_computing(
        tiny_run, tiny_points_run, digit_queries, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("scores were computed for queries on another scale")

    cached = lambda *a, **kw: rl.load_or_attribute(*a, root=tmp_path, **kw)  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(rl.attribution.scoring, "score", never)
        for scaled, hint in [((digit_queries + 1) * 127.5, "/ 127.5 - 1"),
                             ((digit_queries + 1) / 2, r"\* 2 - 1")]:
            for call in (rl.attribute, cached):
                with pytest.raises(ValueError, match=r"queries lie in \[.* trained on data in "
                                   rf"\[-1, 1\].*{hint}.*allow_out_of_range=True"):
                    call(tiny_run, scaled, "tracin", **OPTS)
        with pytest.raises(ValueError, match="queries lie in"):
            rl.attribute(tiny_points_run, tiny_points_run.data.images[:2] * 10, **OPTS)
    # the opt-out warns, gives the same numbers and leaves the cache key alone
    pixels = (digit_queries + 1) * 127.5
    with pytest.warns(OutOfRangeWarning, match="scoring them as they are"):
        forced = cached(tiny_run, pixels, "tracin", allow_out_of_range=True, **OPTS)
    with pytest.warns(OutOfRangeWarning):
        assert torch.equal(rl.attribute(tiny_run, pixels, "tracin", allow_out_of_range=True,
                                        **OPTS).scores, forced.scores)
    plain = cached(tiny_run, digit_queries, "tracin", **OPTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cached(tiny_run, digit_queries, "tracin", allow_out_of_range=True, **OPTS)
        assert torch.equal(again.scores, plain.scores)
        # samples at the data's bounds, as diffusers' clipped sampler returns them, and one point
        edges = torch.full_like(digit_queries, 1.0)
        edges[:, :, 0] = -1.0
        rl.attribute(tiny_run, edges, "tracin", **OPTS)
        rl.attribute(tiny_points_run, tiny_points_run.data.images[:1], **OPTS)
    assert len(list((tmp_path / "attributions").iterdir())) == 2


def test_a_query_grid_too_large_for_memory_is_named_before_allocating(tiny_run, monkeypatch):
    queries = tiny_run.data.images[:1]
    monkeypatch.setattr(rl.validation, "memory_bytes", lambda: 8 * 2**30)   # an 8 GiB machine
    with pytest.raises(ValueError, match=r"query grid of 100 timesteps x 200000 noise draws needs "
                                         r"4\.8 GiB .*100 x 200000 x 1x8x8 float32.*half of this "
                                         r"machine's 8\.0 GiB.*fewer timesteps or a smaller n_noise"):
        rl.attribute(tiny_run, queries, "retrac", timesteps=100, n_noise=200_000)
    assert rl.validation.grid_memory(100, 200_000, (1, 8, 8), available=2**40) == 4 * 100 * 200_000 * 64
    with pytest.raises(ValueError, match="3 queries x 10 timesteps"):
        rl.validation.grid_memory(10, 4, (1, 8, 8), n_queries=3, available=1000)
