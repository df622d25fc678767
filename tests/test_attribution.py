"""Diffusion-TracIn and Diffusion-ReTrac against a slow, independent reference.

The reference below is written from the formulas alone (one autograd backward pass per sample,
timestep and noise draw; no code from ``retrac_lib.attribution`` or ``retrac_lib.grads``):

    x_t        = sqrt(abar_t) x + sqrt(1 - abar_t) eps
    l          = mean |eps_theta(x_t, t) - eps|^p                  (p = 2 for "mse", 1 for "l1")
    g_c(x_i)   = grad l(theta_c; x_i, recorded t_i^c, recorded eps_i^c)
    m_c(z, t)  = 1/K sum_k grad l(theta_c; z, t, eps_{t,k})
    TracIn     = sum_c w_c < g_c, 1/|T'| sum_t m_c >
    ReTrac     = sum_c w_c < g_c/|g_c|, Q_c >   with Q_c by normalization:
                 per_timestep: 1/|T'| sum_t m_c/|m_c|;  per_draw: 1/(|T'|K) sum_{t,k} d/|d|;
                 cosine: M/|M| with M = 1/|T'| sum_t m_c
    w_c        = lr_c * visits_c / N
"""
import contextlib
import dataclasses
import json
import copy
import inspect

import pytest
import torch

import retrac_lib as rl

REL_TOL = 1e-4
GRID = [3, 250, 600, 980]  # an explicit grid T' (deliberately not sorted-evenly spaced)
K = 2


# ---------------------------------------------------------------------------------------------
# the independent reference


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _ref_grad(model, abar, x, t, eps, loss):
    """grad_theta of mean |eps_theta(x_t, t) - eps|^p for ONE sample, flattened, float64."""
    a = abar[t]
    x_t = a.sqrt() * x + (1 - a).sqrt() * eps
    pred = model(x_t.unsqueeze(0), torch.tensor([t], dtype=torch.long)).sample[0]
    diff = pred - eps
    value = diff.square().mean() if loss == "mse" else diff.abs().mean()
    grads = torch.autograd.grad(value, _trainable(model))
    return torch.cat([g.reshape(-1) for g in grads]).double()


_TRAIN_CACHE = {}


def ref_train_grads(run, c, loss):
    """[N, P]: g_c(x_i) for every training sample, with the recorded timestep and noise."""
    params = run.checkpoints[c].params  # kept in the cache entry so that its id stays unique
    key = (id(params), id(run.data), c, loss)
    if key not in _TRAIN_CACHE:
        model = run.model_at(c)
        abar = run.scheduler.alphas_cumprod
        t, noise = run.recorded(c)
        _TRAIN_CACHE[key] = params, torch.stack([
            _ref_grad(model, abar, run.data.images[i], int(t[i]), noise[i], loss)
            for i in range(len(run.data))
        ])
    return _TRAIN_CACHE[key][1]


def ref_query_grads(run, c, queries, grid, noise, loss):
    """[Q, T', K, P]: one gradient per query, grid timestep and noise draw (noise [T', K, ...])."""
    model = run.model_at(c)
    abar = run.scheduler.alphas_cumprod
    return torch.stack([
        torch.stack([
            torch.stack([_ref_grad(model, abar, z, t, noise[a, k], loss) for k in range(noise.shape[1])])
            for a, t in enumerate(grid)
        ])
        for z in queries
    ])


def ref_weight(run, c):
    ck = run.checkpoints[c]
    return ck.lr * ck.visits / len(run.data)


def ref_scores(run, queries, checkpoints, grid, noise, loss, method, normalization="per_timestep"):
    """[Q, N] float64 reference scores, and {c: [N] training-gradient norms}."""
    scores = torch.zeros(len(queries), len(run.data), dtype=torch.float64)
    norms = {}
    for c in checkpoints:
        G = ref_train_grads(run, c, loss)
        D = ref_query_grads(run, c, queries, grid, noise, loss)  # [Q, T', K, P]
        norms[c] = G.norm(dim=1)
        if method == "tracin":
            side, train = D.mean(2).mean(1), G
        else:
            train = G / G.norm(dim=1, keepdim=True)
            if normalization == "per_timestep":
                m = D.mean(2)
                side = (m / m.norm(dim=-1, keepdim=True)).mean(1)
            elif normalization == "per_draw":
                side = (D / D.norm(dim=-1, keepdim=True)).mean((1, 2))
            elif normalization == "cosine":
                M = D.mean((1, 2))
                side = M / M.norm(dim=-1, keepdim=True)
            else:
                raise AssertionError(normalization)
        scores += ref_weight(run, c) * side @ train.T
    return scores, norms


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# shared inputs


@pytest.fixture(scope="module")
def digit_queries(tiny_run):
    q = rl.data.digits("test").images[:2]
    # the queries must not be training images (the grouped_grads spies below rely on it)
    assert not any(torch.equal(z, x) for z in q for x in tiny_run.data.images)
    return q


@pytest.fixture(scope="module")
def reweighted_run(tiny_run):
    """tiny_run with checkpoints of different learning rates and visit counts.

    In tiny_run every w_c = 0.002 * 40 / 40 equals the learning rate, which cannot tell a correct
    weighting from one that forgets ``visits / N``; here the w_c differ (0.002, 0.002, 0.00025).
    """
    lrs, visits = (0.002, 0.001, 0.0005), (40, 80, 20)
    checkpoints = [dataclasses.replace(c, lr=lr, visits=v)
                   for c, lr, v in zip(tiny_run.checkpoints, lrs, visits)]
    return dataclasses.replace(tiny_run, checkpoints=checkpoints)


@pytest.fixture(scope="module")
def point_queries():
    return torch.randn(3, 2, generator=torch.Generator().manual_seed(7))


def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _even_grid(n, T):
    """n evenly spaced integer timesteps in [1, T - 1] (reference for timestep_grid)."""
    return torch.linspace(1, T - 1, n, dtype=torch.float64).round().long().tolist()


def _attribute(run, queries, method, **kw):
    return rl.attribute(run, queries, method, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# 1. equal to the slow reference

CASES = [
    # id,                          run,     method,   ckpts,     loss,   noise,   normalization
    ("tracin-one-ckpt-mse-TK",     "unet",  "tracin", [1],       "mse",  "TK",    "per_timestep"),
    ("tracin-all-mse-K",           "unet",  "tracin", None,      None,   "K",     "per_timestep"),
    ("tracin-reweighted-TK",       "reweighted", "tracin", None, "mse",  "TK",    "per_timestep"),
    ("retrac-reweighted-K",        "reweighted", "retrac", [1, 2], "mse", "K",    "per_timestep"),
    ("tracin-one-ckpt-l1-K",       "unet",  "tracin", [0],       "l1",   "K",     "per_timestep"),
    ("retrac-one-ckpt-mse-TK",     "unet",  "retrac", [2],       "mse",  "TK",    "per_timestep"),
    ("retrac-all-mse-K",           "unet",  "retrac", None,      "mse",  "K",     "per_timestep"),
    ("retrac-all-l1-TK",           "unet",  "retrac", None,      "l1",   "TK",    "per_timestep"),
    ("retrac-all-per_draw-TK",     "unet",  "retrac", None,      "mse",  "TK",    "per_draw"),
    ("retrac-all-cosine-K",        "unet",  "retrac", None,      "mse",  "K",     "cosine"),
    ("cosine-all-TK",              "unet",  "cosine", None,      "mse",  "TK",    None),
    ("points-tracin-all-mse-TK",   "mlp",   "tracin", None,      "mse",  "TK",    "per_timestep"),
    ("points-retrac-all-l1-K",     "mlp",   "retrac", None,      "l1",   "K",     "per_timestep"),
    ("points-retrac-per_draw-TK",  "mlp",   "retrac", [0, 2],    "mse",  "TK",    "per_draw"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_scores_equal_slow_reference(case, tiny_run, reweighted_run, tiny_points_run,
                                    digit_queries, point_queries):
    _, kind, method, ckpts, loss, noise_kind, normalization = case
    run, queries = {"unet": (tiny_run, digit_queries), "reweighted": (reweighted_run, digit_queries),
                    "mlp": (tiny_points_run, point_queries)}[kind]
    sample = run.data.sample_shape
    T = run.config.num_train_timesteps
    if noise_kind == "TK":
        grid = GRID
        query_noise = _noise((len(grid), K, *sample), seed=11)
        ref_noise = query_noise
        timesteps = grid
    else:  # [K, ...] reused at every grid timestep; integer grid
        grid = _even_grid(3, T)
        query_noise = _noise((K, *sample), seed=12)
        ref_noise = query_noise.unsqueeze(0).expand(len(grid), *query_noise.shape)
        timesteps = 3
    used = list(range(len(run.checkpoints))) if ckpts is None else ckpts
    eff_loss = loss or run.config.loss
    # the cosine method is ReTrac normalizing the averaged query vector once
    ref_method, ref_normalization = (("retrac", "cosine") if method == "cosine" else
                                     (method, normalization))
    expected, norms = ref_scores(run, queries, used, grid, ref_noise, eff_loss, ref_method,
                                 ref_normalization)
    for engine in ("ghost", "func", "loop"):  # every gradient engine against the reference
        res = _attribute(run, queries, method, checkpoints=ckpts, timesteps=timesteps, n_noise=K,
                         query_noise=query_noise, normalization=normalization, loss=loss,
                         engine=engine)
        _check_against_reference(res, expected, norms, grid, used, method, eff_loss, run, queries,
                                 engine)


def _check_against_reference(res, expected, norms, grid, used, method, eff_loss, run, queries,
                             engine):
    assert list(res.config.timesteps) == grid
    assert list(res.config.checkpoints) == used
    assert res.config.method == method and res.config.loss == eff_loss
    assert res.scores.dtype == torch.float64 and res.scores.shape == (len(queries), len(run.data))
    assert torch.allclose(res.checkpoint_weights.double(),
                          torch.tensor([ref_weight(run, c) for c in used], dtype=torch.float64))
    err = rel_err(res.scores, expected)
    assert err <= REL_TOL, f"{engine}: scores differ from the reference: relative error {err:.2e}"
    assert res.train_grad_norms.shape == (len(used), len(run.data))
    for row, c in enumerate(res.config.checkpoints):
        err = rel_err(res.train_grad_norms[row], norms[c])
        assert err <= REL_TOL, f"{engine}: train_grad_norms of checkpoint {c}: relative error {err:.2e}"


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_self_scores_equal_the_slow_references_diagonal(method, tiny_points_run):
    run = tiny_points_run
    grid = _even_grid(3, run.config.num_train_timesteps)
    noise = rl.timesteps.query_noise_draws(run.data.sample_shape, len(grid), K, 5)  # the draws
    expected, _ = ref_scores(run, run.data.images, [0, 2], grid, noise, run.config.loss, method)
    got = rl.attribution.self_scores(run, method, checkpoints=[0, 2], timesteps=3, n_noise=K,
                                     noise_seed=5, chunk_size=20, progress=False)
    assert got.dtype == torch.float64 and got.shape == (len(run.data),)
    assert rel_err(got, expected.diagonal()) <= REL_TOL


# Two cases on the UNet (images), at its last checkpoint, the others on the MLP's points: the
# option plumbing is the same, the whole matrix costs a fifth to a tenth of the UNet's, and the
# MLP's cases sum over checkpoints.
@pytest.mark.parametrize("model, method, engine, options", [
    ("unet", "retrac", "ghost", {"checkpoints": [2]}),
    ("unet", "retrac", "ghost", {"normalization": "per_draw", "train_side": "fresh_noise",
                                 "checkpoints": [2]}),
    ("mlp", "tracin", "ghost", {}), ("mlp", "cosine", "func", {}),
    ("mlp", "retrac", "loop", {"checkpoints": [2]}),
    ("mlp", "retrac", "ghost", {"noise_per_query": True}),
    ("mlp", "tracin", "func", {"train_side": "timestep_average"}),
])
def test_self_scores_are_the_diagonal_of_the_whole_matrix(model, method, engine, options,
                                                          tiny_run, tiny_points_run):
    run = tiny_run if model == "unet" else tiny_points_run
    opts = dict(timesteps=3, n_noise=K, engine=engine, progress=False, **options)
    whole = rl.attribute(run, run.data.images, method, chunk_size=64, **opts)
    got = rl.attribution.self_scores(run, method, chunk_size=7, **opts)  # 7 does not divide N
    diagonal = whole.scores.diagonal()   # float32 gradients: a score near 0 is a cancellation
    torch.testing.assert_close(got, diagonal, rtol=1e-5, atol=1e-6 * float(diagonal.abs().max()))


def test_self_scores_refuse_a_projection_and_unknown_options(tiny_points_run):
    with pytest.raises(ValueError, match=r"exact gradients only; do not pass \['projection'\]"):
        rl.attribution.self_scores(tiny_points_run, "tracin", projection=4, progress=False)
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['query_noise'\]; self_scores"):
        rl.attribution.self_scores(tiny_points_run, "tracin", query_noise=None)


def test_self_scores_check_the_memory_of_one_chunk_of_per_query_noise(tiny_run, monkeypatch):
    checked = []
    grid_memory = rl.validation.grid_memory
    monkeypatch.setattr(rl.validation, "grid_memory",
                        lambda *a, **k: checked.append(a[3]) or grid_memory(*a, **k))
    rl.attribution.self_scores(tiny_run, "tracin", timesteps=2, n_noise=1, chunk_size=8,
                               noise_per_query=True, checkpoints=[0], progress=False)
    assert checked == [8] and len(tiny_run.data) > 8   # one chunk of queries, not all N


def test_self_scores_name_the_sample_whose_gradient_is_not_finite(tiny_run):
    images = tiny_run.data.images.clone()
    images[9] = 3e38   # finite, but its loss and gradient overflow
    broken = dataclasses.replace(tiny_run, data=rl.data.Dataset("huge-digit", images,
                                                                tiny_run.data.labels))
    with pytest.raises(FloatingPointError, match=r"query 9 at checkpoint"):
        rl.attribution.self_scores(broken, "tracin", timesteps=2, n_noise=1, chunk_size=4,
                                   progress=False)


def test_load_or_self_scores_caches_and_keys_on_options(tiny_points_run, tmp_path, monkeypatch):
    """Cache keying (the MLP's points: the keys do not depend on the model)."""
    run = tiny_points_run
    kw = dict(timesteps=2, n_noise=1, checkpoints=[0, 2], progress=False)
    load = rl.attribution.load_or_self_scores
    first = load(run, "retrac", root=tmp_path, chunk_size=8, **kw)
    assert torch.equal(first, rl.attribution.self_scores(run, "retrac", chunk_size=8, **kw))
    folders = _result_folders(tmp_path)
    assert len(folders) == 1

    with gradients_forbidden(monkeypatch):
        again = load(run, "retrac", root=tmp_path, chunk_size=16, **kw)  # how, not what
        with pytest.raises(ValueError, match="engine"):    # checked on a cache hit too
            load(run, "retrac", root=tmp_path, engine="fast", **kw)
    assert torch.equal(again, first) and _result_folders(tmp_path) == folders

    for i, (method, options) in enumerate([("retrac", dict(kw, noise_seed=1)),
                                           ("tracin", kw)]):
        other = load(run, method, root=tmp_path, **options)
        assert len(_result_folders(tmp_path)) == len(folders) + 1 + i, (method, options)
        assert not torch.equal(other, first), (method, options)
    # the whole matrix of the same options is another entry, not these scores
    whole = rl.load_or_attribute(run, run.data.images, "retrac", root=tmp_path, **kw)
    assert len(_result_folders(tmp_path)) == len(folders) + 3
    torch.testing.assert_close(whole.scores.diagonal(), first, rtol=1e-5, atol=0)


def test_cached_self_scores_for_other_inputs_are_refused(tiny_points_run, tmp_path):
    run = tiny_points_run
    kw = dict(timesteps=2, n_noise=1, checkpoints=[0], progress=False)
    rl.attribution.load_or_self_scores(run, "tracin", root=tmp_path, **kw)
    (folder,) = (tmp_path / "attributions").iterdir()
    meta = json.loads((folder / "config.json").read_text())
    assert meta["key"]["kind"] == "self_scores"
    meta["key"]["noise"] = "something else"
    (folder / "config.json").write_text(json.dumps(meta))
    rl.cache.write_manifest(folder)
    with pytest.raises(rl.cache.CacheError, match="another run, queries or options"):
        rl.attribution.load_or_self_scores(run, "tracin", root=tmp_path, **kw)


def test_integer_timesteps_give_an_even_grid(tiny_run):
    assert rl.timesteps.timestep_grid(3, 1000).tolist() == [1, 500, 999]
    assert rl.timesteps.timestep_grid(4, 1000).tolist() == _even_grid(4, 1000) == [1, 334, 666, 999]
    assert rl.timesteps.timestep_grid(7, 50).tolist() == _even_grid(7, 50)


def test_timestep_gradients_average_each_timesteps_draws(tiny_run):
    """m(z, t) per grid timestep (chapter 4's cosine figure) against the one-draw reference."""
    model, z = tiny_run.model_at(-1), tiny_run.data.images[0]
    grid, noise = torch.tensor(GRID[:3]), _noise((3, K, 1, 8, 8), seed=5)
    got = rl.attribution.timestep_gradients(model, tiny_run.scheduler, z, grid, noise, chunk_size=4)
    abar = tiny_run.scheduler.alphas_cumprod
    ref = torch.stack([torch.stack([_ref_grad(model, abar, z, int(t), noise[j, d], "mse")
                                    for d in range(K)]).mean(0) for j, t in enumerate(grid)])
    assert got.shape == ref.shape == (3, ref.shape[1])
    torch.testing.assert_close(got.double(), ref, rtol=REL_TOL, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 2. ReTrac is invariant to a training gradient's scale, TracIn is linear in it


def _spy_training_rows(monkeypatch, run, edit):
    """Patch the func engine's grouped_grads so that ``edit(out, row, i)`` sees every training row.

    Training calls are those whose samples x[:, 0] are all training images; ``i`` is the training
    index of row ``row``. Returns a list that collects the training indices seen.
    """
    original = rl.attribution.engines.grouped_grads
    signature = inspect.signature(original)
    images = run.data.images.flatten(1)
    seen = []

    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        x = bound.arguments["x"]
        out = original(*args, **kwargs)
        first = x[:, 0].flatten(1)
        matches = (first[:, None, :] == images[None, :, :]).all(-1)  # [rows, N]
        if matches.any(1).all():
            out = out.clone()
            for row in range(len(first)):
                i = int(matches[row].nonzero()[0])
                seen.append(i)
                edit(out, row, i)
        else:
            assert not matches.any(), "a call mixes training samples with other samples"
        return out

    monkeypatch.setattr(rl.attribution.engines, "grouped_grads", wrapper)
    return seen


def test_retrac_ignores_and_tracin_follows_a_training_gradient_scale(
        tiny_run, digit_queries, monkeypatch):
    run, j, other, factor = tiny_run, 5, 17, 3.0
    kw = dict(timesteps=3, n_noise=K, query_noise=_noise((K, 1, 8, 8), seed=3), chunk_size=16,
              engine="func")  # the spy sees the rows of the torch.func engine
    base = {m: _attribute(run, digit_queries, m, **kw) for m in ("tracin", "retrac")}

    def scale(out, row, i):
        if i == j:
            out[row] *= factor
        elif i == other:
            out[row] *= 0.25

    seen = _spy_training_rows(monkeypatch, run, scale)
    scaled = {m: _attribute(run, digit_queries, m, **kw) for m in ("tracin", "retrac")}
    # every training sample went through the patched function once per checkpoint and method
    assert sorted(seen) == sorted(list(range(len(run.data))) * len(run.checkpoints) * 2)

    assert rel_err(scaled["retrac"].scores, base["retrac"].scores) <= 1e-6
    t0, t1 = base["tracin"].scores, scaled["tracin"].scores
    assert rel_err(t1[:, j], factor * t0[:, j]) <= 1e-6
    assert rel_err(t1[:, other], 0.25 * t0[:, other]) <= 1e-6
    rest = [i for i in range(len(run.data)) if i not in (j, other)]
    assert rel_err(t1[:, rest], t0[:, rest]) <= 1e-6
    assert not torch.allclose(t1[:, j], t0[:, j])
    for m in ("tracin", "retrac"):
        n0, n1 = base[m].train_grad_norms, scaled[m].train_grad_norms
        assert rel_err(n1[:, j], factor * n0[:, j]) <= 1e-6
        assert rel_err(n1[:, rest], n0[:, rest]) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 3. determinism, the result cache, save/load


@pytest.mark.parametrize("train_side", ["recorded", "fresh_noise", "timestep_average"])
def test_same_call_twice_is_bit_identical(train_side, tiny_run, digit_queries):
    kw = dict(timesteps=3, n_noise=K, train_side=train_side, checkpoints=[0, 2])
    a = _attribute(tiny_run, digit_queries, "retrac", **kw)  # seeded query noise (none passed)
    b = _attribute(tiny_run, digit_queries, "retrac", **kw)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.train_grad_norms, b.train_grad_norms)
    assert a.config == b.config and a.config.train_side == train_side


def test_other_train_sides_differ_from_recorded(tiny_run, digit_queries):
    kw = dict(timesteps=3, n_noise=K, checkpoints=[1], query_noise=_noise((K, 1, 8, 8), seed=4))
    rec = _attribute(tiny_run, digit_queries, "tracin", **kw)
    for side in ("fresh_noise", "timestep_average"):
        other = _attribute(tiny_run, digit_queries, "tracin", train_side=side, **kw)
        assert other.scores.shape == rec.scores.shape == (2, len(tiny_run.data))
        assert torch.isfinite(other.scores).all()
        assert other.train_grad_norms.shape == (1, len(tiny_run.data))
        assert rel_err(other.scores, rec.scores) > 1e-3, side
        assert not torch.allclose(other.train_grad_norms, rec.train_grad_norms), side


@contextlib.contextmanager
def gradients_forbidden(monkeypatch):
    """Inside, any gradient computation fails: what runs there must come from the cache."""
    def no_gradients(*args, **kwargs):
        raise AssertionError("a cached result must not recompute gradients")

    with monkeypatch.context() as m:
        m.setattr(rl.attribution.sides, "grouped_grads", no_gradients)
        m.setattr(rl.ghost, "capture", no_gradients)
        yield


def _result_folders(root):
    return {p.parent for p in root.rglob("*") if p.is_file()}


def _assert_same_result(a, b):
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.train_grad_norms, b.train_grad_norms)
    assert torch.equal(a.checkpoint_weights, b.checkpoint_weights)
    assert a.config == b.config


def test_load_or_attribute_caches_and_keys_on_options(tiny_run, digit_queries, tmp_path, monkeypatch):
    kw = dict(timesteps=3, n_noise=K, progress=False)
    first = rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, **kw)
    _assert_same_result(first, _attribute(tiny_run, digit_queries, "retrac", timesteps=3, n_noise=K))
    folders = _result_folders(tmp_path)
    assert len(folders) == 1

    with gradients_forbidden(monkeypatch):
        again = rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, **kw)
    _assert_same_result(first, again)
    assert _result_folders(tmp_path) == folders

    variants = [
        dict(kw, noise_seed=1),
        dict(kw, n_noise=K + 1),
    ]
    for i, options in enumerate(variants):
        other = rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, **options)
        assert len(_result_folders(tmp_path)) == len(folders) + 1 + i, options
        assert not torch.equal(other.scores, first.scores), options
    other_queries = rl.load_or_attribute(tiny_run, digit_queries.flip(0), "retrac", root=tmp_path, **kw)
    assert len(_result_folders(tmp_path)) == len(folders) + len(variants) + 1
    assert not torch.equal(other_queries.scores, first.scores)
    tracin = rl.load_or_attribute(tiny_run, digit_queries, "tracin", root=tmp_path, **kw)
    assert len(_result_folders(tmp_path)) == len(folders) + len(variants) + 2
    assert tracin.config.method == "tracin"


def test_save_load_round_trip(tiny_run, digit_queries, tmp_path):
    res = _attribute(tiny_run, digit_queries, "tracin", timesteps=3, n_noise=K, checkpoints=[2, 0])
    res.save(tmp_path / "result")
    back = rl.AttributionResult.load(tmp_path / "result")
    _assert_same_result(res, back)
    assert torch.equal(back.proponents(5), res.proponents(5))


def test_a_saved_result_holds_the_query_noise_that_reproduces_it(tiny_run, digit_queries,
                                                                 tmp_path):
    """The folder alone reproduces the scores: its query noise passed back to attribute gives
    them bit for bit, whatever seed drew it; a folder saved without noise loads with None."""
    kw = dict(timesteps=[5, 300, 900], n_noise=K, checkpoints=[0, 2])
    res = _attribute(tiny_run, digit_queries, "retrac", noise_seed=7, **kw)
    assert torch.equal(res.query_noise,
                       rl.timesteps.query_noise_draws(tiny_run.data.sample_shape, 3, K, 7))
    res.save(tmp_path / "result")
    back = rl.AttributionResult.load(tmp_path / "result")
    assert torch.equal(back.query_noise, res.query_noise) and back.query_noise.shape == (3, K, 1, 8, 8)
    again = _attribute(tiny_run, digit_queries, "retrac", query_noise=back.query_noise, **kw)
    assert torch.equal(again.scores, res.scores)
    assert not torch.equal(_attribute(tiny_run, digit_queries, "retrac", **kw).scores, res.scores)
    shared = back.query_noise[0]                                     # [K, *sample], every timestep
    given = _attribute(tiny_run, digit_queries, "tracin", query_noise=shared, **kw)
    assert torch.equal(given.query_noise, shared.expand(3, *shared.shape))
    per_query = _attribute(tiny_run, digit_queries, "retrac", noise_per_query=True, **kw)
    assert per_query.query_noise is None
    dataclasses.replace(res, query_noise=None).save(tmp_path / "older")  # what older code wrote
    older = rl.AttributionResult.load(tmp_path / "older")
    assert older.query_noise is None and torch.equal(older.scores, res.scores)


def test_a_cached_result_without_noise_gets_the_keys_noise(tiny_run, digit_queries, tmp_path,
                                                           monkeypatch):
    kw = dict(timesteps=2, n_noise=K, progress=False)
    real_save = rl.AttributionResult.save
    with monkeypatch.context() as m:   # write the cache entry as code before query_noise did
        m.setattr(rl.AttributionResult, "save", lambda self, *a, **k: real_save(
            dataclasses.replace(self, query_noise=None), *a, **k))
        first = rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, **kw)
    (entry,) = _result_folders(tmp_path)
    assert rl.AttributionResult.load(entry).query_noise is None
    again = rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, **kw)
    assert torch.equal(again.query_noise, first.query_noise) and again.query_noise.shape[:2] == (2, K)
    assert torch.equal(again.scores, first.scores)


# ---------------------------------------------------------------------------------------------
# 4. clear errors


@pytest.fixture(scope="module")
def small_result(tiny_run, digit_queries):
    return _attribute(tiny_run, digit_queries, "retrac", timesteps=3, n_noise=K)


def test_queries_of_the_wrong_shape(tiny_run, tiny_points_run, digit_queries):
    with pytest.raises(ValueError, match=r"queries has shape \(2, 1, 7, 7\).*\[B, 1, 8, 8\]"):
        _attribute(tiny_run, torch.zeros(2, 1, 7, 7), "retrac", timesteps=3, n_noise=K)
    with pytest.raises(ValueError, match=r"queries has shape \(1, 8, 8\).*\[B, 1, 8, 8\]"):
        _attribute(tiny_run, digit_queries[0], "retrac", timesteps=3, n_noise=K)
    with pytest.raises(ValueError, match=r"queries has shape \(4, 3\).*\[B, 2\]"):
        _attribute(tiny_points_run, torch.zeros(4, 3), "tracin", timesteps=3, n_noise=K)


def test_query_noise_of_the_wrong_shape(tiny_run, digit_queries):
    with pytest.raises(ValueError, match=r"query_noise has shape \(3, 2, 1, 8, 8\).*"
                                         r"\[K, 1, 8, 8\] or \[4 timesteps, K, 1, 8, 8\]"):
        _attribute(tiny_run, digit_queries, "retrac", timesteps=GRID, query_noise=torch.zeros(3, 2, 1, 8, 8))


def test_k_outside_1_to_n(small_result):
    with pytest.raises(ValueError, match=r"k=41 must lie between 1 and the number of training samples \(40\)"):
        small_result.proponents(41)
    with pytest.raises(ValueError, match=r"k=0 must lie between 1 and .*\(40\)"):
        small_result.opponents(0)
    with pytest.raises(ValueError, match=r"k=41"):
        small_result.top_k(41, largest=False)


def test_run_without_training_log(tiny_run, digit_queries):
    with pytest.raises(ValueError, match="no training log.*timesteps and noise"):
        _attribute(dataclasses.replace(tiny_run, log=None), digit_queries, "retrac", timesteps=3, n_noise=K)


def test_missing_checkpoint(tiny_run, digit_queries):
    with pytest.raises(ValueError, match=r"Checkpoints \[7\] do not exist.*0\.\.2"):
        _attribute(tiny_run, digit_queries, "tracin", checkpoints=[0, 7], timesteps=3, n_noise=K)


@pytest.mark.parametrize("option, value, message", [
    ("method", "trak", r"method must be one of \('tracin', 'retrac', 'cosine'\), got 'trak'"),
    ("normalization", "l2", r"normalization must be one of .*'per_timestep'.*got 'l2'"),
    ("train_side", "fresh", r"train_side must be one of .*'recorded'.*got 'fresh'"),
    ("loss", "huber", r"loss must be one of \('mse', 'l1', 'square_norm'\), got 'huber'"),
    ("timesteps", [0, 1000], r"timesteps must be .*\[0, 1000\)"),
])
def test_unknown_options(option, value, message, tiny_run, digit_queries):
    kw = dict(method="retrac", timesteps=3, n_noise=K)
    kw[option] = value
    with pytest.raises(ValueError, match=message):
        rl.attribute(tiny_run, digit_queries, progress=False, **kw)


def test_every_name_has_one_object_and_every_object_a_name():
    """The registries behind method_for and engine_for are the option names the door checks."""
    att = rl.attribution
    assert set(att.methods.BY_NAME) == set(att.METHODS)
    assert set(att.engines.BY_NAME) == set(att.ENGINES) - {"auto"}
    assert set(att.methods._RETRAC_GROUPS) == set(att.QUERY_NORMALIZATIONS)
    assert att.method_for("retrac") == att.ReTrac("per_timestep")
    assert att.method_for("cosine") == att.method_for("cosine", "cosine") == att.Cosine()
    with pytest.raises(ValueError, match="cosine method fixes normalization='cosine'"):
        att.method_for("cosine", "per_draw")
    with pytest.raises(ValueError, match="normalization must be one of"):
        att.method_for("tracin", "per_query")


def test_how_to_compute_is_checked_on_a_cache_hit_too(tiny_run, digit_queries, tmp_path):
    kw = dict(timesteps=3, n_noise=K, progress=False, root=tmp_path)
    rl.load_or_attribute(tiny_run, digit_queries, "tracin", **kw)
    assert len(list((tmp_path / "attributions").iterdir())) == 1
    with pytest.raises(ValueError, match="engine must be one of"):
        rl.load_or_attribute(tiny_run, digit_queries, "tracin", engine="fast", **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        rl.load_or_attribute(tiny_run, digit_queries, "tracin", chunk_size=0, **kw)


def test_nan_or_inf_query_names_the_query(tiny_run, digit_queries):
    for bad in (float("nan"), float("inf")):
        q = digit_queries.clone()
        q[1, 0, 3, 3] = bad
        with pytest.raises(FloatingPointError, match="query 1 at checkpoint 0 is NaN or infinite"):
            _attribute(tiny_run, q, "retrac", timesteps=3, n_noise=K)


def test_diverged_checkpoint_is_named(tiny_run, digit_queries):
    checkpoints = copy.deepcopy(tiny_run.checkpoints)
    checkpoints[1].params["conv_in.weight"][0, 0, 0, 0] = float("inf")
    run = dataclasses.replace(tiny_run, checkpoints=checkpoints)
    with pytest.raises(FloatingPointError, match=r"at checkpoint 1 is NaN or infinite.*diverged weights"):
        _attribute(run, digit_queries, "tracin", timesteps=3, n_noise=K)
    # the original run is untouched by the copy
    assert torch.isfinite(tiny_run.checkpoints[1].params["conv_in.weight"]).all()


def test_non_finite_training_gradient_names_the_sample(tiny_run, digit_queries, monkeypatch):
    def poison(out, row, i):
        if i == 7:
            out[row, 3] = float("nan")

    _spy_training_rows(monkeypatch, tiny_run, poison)
    with pytest.raises(FloatingPointError, match="training sample 7 at checkpoint 2 is NaN or infinite"):
        _attribute(tiny_run, digit_queries, "retrac", checkpoints=[2], timesteps=3, n_noise=K,
                   engine="func")


def test_zero_timesteps_is_refused(tiny_run, digit_queries):
    with pytest.raises(ValueError, match="timesteps"):
        _attribute(tiny_run, digit_queries, "retrac", timesteps=0, n_noise=K)


def test_zero_noise_draws_is_refused(tiny_run, digit_queries):
    with pytest.raises(ValueError, match="n_noise"):
        _attribute(tiny_run, digit_queries, "retrac", timesteps=3, n_noise=0)


def test_empty_queries_are_refused(tiny_run, digit_queries):
    with pytest.raises(ValueError, match="quer"):
        _attribute(tiny_run, digit_queries[:0], "retrac", timesteps=3, n_noise=K)


# ---------------------------------------------------------------------------------------------
# 5. properties


def test_proponents_opponents_and_top_k(small_result):
    s = small_result.scores
    n = s.shape[1]
    for k in (1, 4, n):
        prop, opp = small_result.proponents(k), small_result.opponents(k)
        assert prop.shape == opp.shape == (s.shape[0], k)
        top = s.gather(1, prop)
        bottom = s.gather(1, opp)
        assert (top[:, :-1] >= top[:, 1:]).all()          # sorted, highest first
        assert (bottom[:, :-1] <= bottom[:, 1:]).all()    # sorted, lowest first
        assert torch.equal(top[:, -1], s.sort(1, descending=True).values[:, k - 1])
        assert torch.equal(bottom[:, -1], s.sort(1).values[:, k - 1])
        assert torch.equal(small_result.top_k(k, largest=False), opp)
        assert torch.equal(small_result.top_k(k), prop)
    assert set(small_result.proponents(n)[0].tolist()) == set(range(n))


def test_scores_add_up_over_checkpoints(tiny_run, digit_queries):
    kw = dict(timesteps=3, n_noise=K, query_noise=_noise((K, 1, 8, 8), seed=5))
    for method in ("tracin", "retrac"):
        total = _attribute(tiny_run, digit_queries, method, **kw).scores
        parts = sum(_attribute(tiny_run, digit_queries, method, checkpoints=[c], **kw).scores
                    for c in range(len(tiny_run.checkpoints)))
        assert rel_err(total, parts) <= 1e-6, method


def test_chunk_size_and_query_batch_do_not_change_scores(tiny_run, digit_queries):
    noise = _noise((len(GRID), K, 1, 8, 8), seed=6)
    kw = dict(timesteps=GRID, n_noise=K, query_noise=noise, checkpoints=[1])
    ref = _attribute(tiny_run, digit_queries, "retrac", **kw)
    chunked = _attribute(tiny_run, digit_queries, "retrac", chunk_size=7, **kw)
    assert rel_err(chunked.scores, ref.scores) <= 1e-6
    assert rel_err(chunked.train_grad_norms, ref.train_grad_norms) <= 1e-6
    alone = _attribute(tiny_run, digit_queries[1:], "retrac", **kw)
    assert rel_err(alone.scores[0], ref.scores[1]) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 6. option parsing shared by every entry point


def test_timestep_counts_of_any_integer_type_give_the_same_grid(tiny_run, digit_queries):
    import numpy as np

    ref = _attribute(tiny_run, digit_queries, "tracin", timesteps=5, n_noise=K)
    for count in (np.int64(5), torch.tensor(5)):
        res = _attribute(tiny_run, digit_queries, "tracin", timesteps=count, n_noise=K)
        assert res.config.timesteps == ref.config.timesteps
        assert torch.equal(res.scores, ref.scores)


def test_negative_checkpoints_count_from_the_end(tiny_run, digit_queries):
    last = _attribute(tiny_run, digit_queries, "retrac", checkpoints=[-1], timesteps=3, n_noise=K)
    assert last.config.checkpoints == (len(tiny_run.checkpoints) - 1,)
    with pytest.raises(ValueError, match=r"Checkpoints \[-4\] do not exist"):
        _attribute(tiny_run, digit_queries, "retrac", checkpoints=[-4], timesteps=3, n_noise=K)


def test_bad_chunk_size_and_query_dtype_are_named(tiny_run, digit_queries):
    with pytest.raises(ValueError, match="chunk_size must be at least 1"):
        _attribute(tiny_run, digit_queries, "tracin", timesteps=3, n_noise=K, chunk_size=0)
    with pytest.raises(ValueError, match=r"queries have dtype torch.float64.*queries.to\(torch.float32\)"):
        _attribute(tiny_run, digit_queries.double(), "tracin", timesteps=3, n_noise=K)


def test_a_cached_attribution_for_other_inputs_is_refused(tiny_run, digit_queries, tmp_path):
    first = rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, timesteps=3,
                                 n_noise=K, progress=False)
    (folder,) = (tmp_path / "attributions").iterdir()
    meta = json.loads((folder / "config.json").read_text())
    meta["key"]["queries"] = "something else"
    (folder / "config.json").write_text(json.dumps(meta))
    rl.cache.write_manifest(folder)
    with pytest.raises(rl.cache.CacheError, match="another run, queries or options"):
        rl.load_or_attribute(tiny_run, digit_queries, "retrac", root=tmp_path, timesteps=3,
                             n_noise=K, progress=False)
    assert first.scores.shape == (2, len(tiny_run.data))
