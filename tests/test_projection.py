"""CountSketch projections and projected attribution (``retrac_lib.projection``)."""
import pytest
import torch

import retrac_lib as rl
from retrac_lib.ranking import spearman
from retrac_lib.projection import BLOCK, CountSketch


def _dense(sketch: CountSketch) -> torch.Tensor:
    """The [dim, k] matrix the sketch applies, built from its hash (reference for small dims)."""
    buckets, signs = sketch.buckets()
    m = torch.zeros(sketch.dim, sketch.k, dtype=torch.float64)
    m[torch.arange(sketch.dim), buckets] = signs.double()
    return m


def test_shapes_and_equality_with_the_dense_matrix():
    s = CountSketch(300, 17, seed=3)
    g = torch.randn(4, 5, 300, dtype=torch.float64)
    out = s(g)
    assert out.shape == (4, 5, 17) and out.dtype == torch.float64
    assert torch.allclose(out, g @ _dense(s), atol=1e-12)
    buckets, signs = s.buckets()
    assert buckets.shape == signs.shape == (300,)
    assert buckets.min() >= 0 and buckets.max() < 17
    assert set(signs.unique().tolist()) == {-1.0, 1.0}


def test_deterministic_by_seed_and_different_across_seeds():
    g = torch.randn(3, 1000)
    assert torch.equal(CountSketch(1000, 64, seed=5)(g), CountSketch(1000, 64, seed=5)(g))
    assert not torch.allclose(CountSketch(1000, 64, seed=5)(g), CountSketch(1000, 64, seed=6)(g))


def test_inner_product_exact_on_coordinates_in_distinct_buckets():
    s = CountSketch(5000, 256, seed=0)
    buckets, _ = s.buckets()
    first = {}
    for j, b in enumerate(buckets.tolist()):
        first.setdefault(b, j)
    support = torch.tensor(sorted(first.values()))  # one coordinate per bucket: no collisions
    x, y = torch.zeros(2, 5000, dtype=torch.float64)
    x[support] = torch.randn(len(support), dtype=torch.float64)
    y[support] = torch.randn(len(support), dtype=torch.float64)
    sx, sy = s(torch.stack([x, y]))
    assert torch.allclose(sx @ sy, x @ y, rtol=1e-12)
    assert torch.allclose(sx.norm(), x.norm(), rtol=1e-12)


def test_inner_products_unbiased_over_seeds():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, generator=gen, dtype=torch.float64)
    y = x + 0.5 * torch.randn(2000, generator=gen, dtype=torch.float64)
    exact = (x @ y).item()
    est = torch.tensor([(lambda s: (s[0] @ s[1]).item())(CountSketch(2000, 64, seed)(torch.stack([x, y])))
                        for seed in range(400)], dtype=torch.float64)
    # mean within 4 standard errors of the exact value; the estimator is not exact for one seed
    assert abs(est.mean().item() - exact) <= 4 * est.std().item() / 400 ** 0.5
    assert est.std().item() > 0
    # variance shrinks with k: a wider sketch is closer on average
    wide = torch.tensor([(lambda s: (s[0] @ s[1]).item())(CountSketch(2000, 1024, seed)(torch.stack([x, y])))
                         for seed in range(100)], dtype=torch.float64)
    assert (wide - exact).abs().mean() < (est - exact).abs().mean()


def test_dimensions_beyond_one_block_use_every_block():
    dim = BLOCK + 10
    s = CountSketch(dim, 8, seed=1)
    g = torch.zeros(1, dim)
    g[0, -3:] = 1.0  # only the second block is non-zero
    buckets, signs = s.hash_block(1)
    expected = torch.zeros(8).index_add_(0, buckets[-3:], signs[-3:])
    assert torch.equal(s(g)[0], expected)


@pytest.mark.parametrize("args, message", [
    ((0, 4), "dim must be a positive integer"),
    ((10, 0), "k must be a positive integer"),
    ((10, 2.5), "k must be a positive integer"),
])
def test_bad_sizes(args, message):
    with pytest.raises(ValueError, match=message):
        CountSketch(*args)


def test_bad_inputs():
    s = CountSketch(10, 4)
    with pytest.raises(ValueError, match=r"expects \[\.\.\., 10\] inputs; got shape \(3, 9\)"):
        s(torch.zeros(3, 9))
    with pytest.raises(ValueError, match="floating-point"):
        s(torch.zeros(3, 10, dtype=torch.long))


def _kw():
    return dict(timesteps=3, n_noise=2, progress=False)


@pytest.fixture(scope="module")
def queries():
    return rl.data.digits("test").images[:2]


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_projection_equals_sketched_exact_gradients(method, tiny_run, queries):
    """Projected scores are <S v, S g> computed from the exact vectors: check against a sketch of
    the exact per-sample gradients and query vectors."""
    k = 64
    res = rl.attribute(tiny_run, queries, method, projection=k, projection_seed=2, **_kw())
    assert res.config.projection == k and res.config.projection_seed == 2
    exact = rl.attribute(tiny_run, queries, method, **_kw())
    assert torch.allclose(res.train_grad_norms, exact.train_grad_norms, rtol=1e-5)
    grid = rl.timesteps.timestep_grid(3)
    noise = rl.timesteps.query_noise_draws((1, 8, 8), 3, 2, 0)
    expected = torch.zeros_like(res.scores)
    for j, c in enumerate(res.config.checkpoints):
        model = tiny_run.model_at(c)
        s = CountSketch(sum(p.numel() for p in model.parameters()), k, seed=2)
        engine = rl.attribution.engine_for("func", model, tiny_run.scheduler)
        v = rl.attribution.query_vectors(engine, queries, grid, noise,
                                         rl.attribution.method_for(method))
        t, eps = tiny_run.recorded(c)
        g = rl.per_sample_grads(model, tiny_run.scheduler, tiny_run.data.images, t, eps)
        if method == "retrac":
            g = g / g.norm(dim=1, keepdim=True)
        expected += res.checkpoint_weights[j] * (s(v) @ s(g).T).double()
    assert torch.allclose(res.scores, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())
    assert not torch.allclose(res.scores, exact.scores)


def test_stored_sketch_scores_many_queries_and_agrees_with_exact_at_large_k(tiny_run, queries):
    sketch = rl.attribution.sketch_training(tiny_run, 4096, timesteps=3, progress=False)
    assert sketch.sketches.shape == (3, len(tiny_run.data), 4096)
    assert sketch.nbytes == 3 * len(tiny_run.data) * 4096 * 4
    for method in ("tracin", "retrac"):
        stored = rl.attribute(tiny_run, queries, method, projection=sketch, **_kw())
        direct = rl.attribute(tiny_run, queries, method, projection=4096, **_kw())
        assert torch.allclose(stored.scores, direct.scores, rtol=1e-6)
        exact = rl.attribute(tiny_run, queries, method, **_kw())
        assert spearman(stored.scores, exact.scores).min() > 0.9, method


def test_sketch_of_other_options_is_refused(tiny_run, queries):
    sketch = rl.attribution.sketch_training(tiny_run, 32, checkpoints=[0], timesteps=3, progress=False)
    with pytest.raises(ValueError, match=r"checkpoints \[1, 2\] were not sketched"):
        rl.attribute(tiny_run, queries, "retrac", projection=sketch, **_kw())
    with pytest.raises(ValueError, match="loss"):
        rl.attribute(tiny_run, queries, "retrac", projection=sketch, checkpoints=[0], loss="l1", **_kw())
    with pytest.raises(ValueError, match="projection must be None, a positive int"):
        rl.attribute(tiny_run, queries, "retrac", projection=0, **_kw())


def test_exact_results_keep_their_cache_key(tiny_run, queries, tmp_path):
    exact = rl.load_or_attribute(tiny_run, queries, "retrac", root=tmp_path, **_kw())
    assert "projection" not in exact.config.to_dict()
    projected = rl.load_or_attribute(tiny_run, queries, "retrac", root=tmp_path, projection=32, **_kw())
    assert projected.config.projection == 32
    assert len(list((tmp_path / "attributions").iterdir())) == 2
    again = rl.load_or_attribute(tiny_run, queries, "retrac", root=tmp_path, projection=32, **_kw())
    assert torch.equal(again.scores, projected.scores) and again.config == projected.config


def test_results_carry_no_autograd_graph(tiny_run, queries):
    """Scores and gradient rows are plain tensors (no graph kept alive by the gradient engine)."""
    for projection in (None, 16):
        res = rl.attribute(tiny_run, queries, "tracin", projection=projection, **_kw())
        assert not res.scores.requires_grad and not res.train_grad_norms.requires_grad
    model = tiny_run.model_at(0)
    x = tiny_run.data.images[:4]
    t, eps = tiny_run.recorded(0)
    grouped = rl.grads.grouped_grads(model, tiny_run.scheduler, x.expand(2, 4, 1, 8, 8),
                                     t[:4].expand(2, 4), eps[:4].expand(2, 4, 1, 8, 8))
    assert not grouped.requires_grad and grouped.grad_fn is None
    assert not rl.per_sample_grads(model, tiny_run.scheduler, x, t[:4], eps[:4]).requires_grad
