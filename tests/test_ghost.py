"""The ghost engine (dot products and norms from layer factors) against the slow loop reference
(``grads.per_sample_grads_loop``: one autograd backward pass per draw) and the torch.func engine."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import retrac_lib as rl
from retrac_lib import ghost
from retrac_lib.grads import per_sample_grads_loop

TOL = 1e-4  # float32


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(params=["unet", "mlp"])
def any_run(request, tiny_run, tiny_points_run):
    return tiny_run if request.param == "unet" else tiny_points_run


def _groups(run, n_groups, draws, seed=0):
    """Groups of ``draws`` draws: each group one training sample at random timesteps and noise."""
    gen = torch.Generator().manual_seed(seed)
    x = run.data.images[:n_groups, None].expand(-1, draws, *run.data.sample_shape)
    t = torch.randint(0, run.config.num_train_timesteps, (n_groups, draws), generator=gen)
    return x, t, torch.randn(x.shape, generator=gen)


def _loop_group_grads(model, scheduler, x, t, noise, loss):
    """[G, P] reference: the loop's per-draw gradients averaged over each group's draws."""
    rows = per_sample_grads_loop(model, scheduler, x.flatten(0, 1), t.flatten(), noise.flatten(0, 1), loss)
    return rows.view(*t.shape, -1).mean(1)


@pytest.mark.parametrize("loss", ["mse", "l1"])
@pytest.mark.parametrize("draws, chunk_size", [(1, 4), (3, 7), (3, 5)])
def test_norms_and_dots_equal_the_loop_reference(any_run, loss, draws, chunk_size):
    """Chunks of whole groups ((1, 4), (3, 7)) and groups too large for the factor path (3, 5)."""
    run = any_run
    model, x, t, noise = run.model_at(-1), *_groups(run, 6, draws)
    ref = _loop_group_grads(model, run.scheduler, x, t, noise, loss)
    vectors = torch.randn(3, ref.shape[1], generator=torch.Generator().manual_seed(1))
    sq, dots = ghost.group_terms(model, run.scheduler, x, t, noise, loss, vectors, chunk_size)
    assert sq.shape == (6,) and dots.shape == (6, 3)
    assert _rel(sq, ref.square().sum(1)) <= TOL
    assert _rel(dots, ref @ vectors.T) <= TOL
    for weights_of in (lambda n: 1 / n, lambda n: n.square() + 1):
        total, norms = ghost.weighted_sum(model, run.scheduler, x, t, noise, weights_of, loss, chunk_size)
        w = weights_of(ref.norm(dim=1, keepdim=True))
        assert _rel(total, (ref * w).sum(0)) <= TOL
        assert _rel(norms, ref.norm(dim=1)) <= TOL


@pytest.mark.parametrize("forced", ["factor", "materialize"])
def test_both_routes_are_exact_for_every_layer(any_run, forced, monkeypatch):
    """The cost model picks one route per layer; each route alone must give the same numbers."""
    run = any_run
    model, x, t, noise = run.model_at(-1), *_groups(run, 4, 2, seed=3)
    ref = _loop_group_grads(model, run.scheduler, x, t, noise, "mse")
    vectors = torch.randn(2, ref.shape[1], generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(ghost, "route", lambda *args: forced)
    sq, dots = ghost.group_terms(model, run.scheduler, x, t, noise, "mse", vectors, chunk_size=8)
    total, _ = ghost.weighted_sum(model, run.scheduler, x, t, noise, lambda n: 1 / n, "mse", chunk_size=8)
    assert _rel(sq, ref.square().sum(1)) <= TOL
    assert _rel(dots, ref @ vectors.T) <= TOL
    assert _rel(total, (ref / ref.norm(dim=1, keepdim=True)).sum(0)) <= TOL


def test_frozen_parameters_are_left_out(tiny_points_run):
    run = tiny_points_run
    model = run.model_at(-1)
    model.input.weight.requires_grad_(False)
    model.output.bias.requires_grad_(False)
    x, t, noise = _groups(run, 5, 1)
    ref = _loop_group_grads(model, run.scheduler, x, t, noise, "mse")
    assert ref.shape[1] == rl.models.n_params(model)
    vectors = torch.randn(2, ref.shape[1])
    sq, dots = ghost.group_terms(model, run.scheduler, x, t, noise, "mse", vectors)
    assert _rel(sq, ref.square().sum(1)) <= TOL and _rel(dots, ref @ vectors.T) <= TOL


def test_routes_of_the_book_models(tiny_run, tiny_points_run):
    """The cost model by hand, and the routes the book's models take (documented in ghost.py)."""
    assert ghost.route(1, 32, 32, 16) == "factor"        # a vector input: |a|^2 |b|^2
    assert ghost.route(64, 144, 16, 16) == "materialize"  # an 8x8 convolution
    assert ghost.route(4, 1000, 1000, 0) == "factor"      # few positions, a large layer
    unet = ghost.plan(tiny_run.model_at(-1), tiny_run.data.images[0], draws=1, n_vectors=16)
    assert {r["route"] for r in unet if r["type"] == "Conv2d"} == {"materialize"}
    assert {r["route"] for r in unet if r["type"] == "Linear"} == {"factor"}
    mlp = ghost.plan(tiny_points_run.model_at(-1), tiny_points_run.data.images[0], n_vectors=16)
    assert {r["route"] for r in mlp} == {"factor"}


# ---------------------------------------------------------------------------------------------
# rl.attribute: the ghost engine gives the torch.func engine's scores

CASES = [
    # run,  method,   loss,  normalization,  train_side
    ("unet", "tracin", "mse", "per_timestep", "recorded"),
    ("unet", "retrac", "mse", "per_timestep", "recorded"),
    ("unet", "retrac", "l1", "per_timestep", "fresh_noise"),
    ("unet", "retrac", "mse", "per_draw", "timestep_average"),
    ("unet", "retrac", "l1", "cosine", "recorded"),
    ("unet", "tracin", "l1", "per_timestep", "timestep_average"),
    ("mlp", "tracin", "l1", "per_timestep", "fresh_noise"),
    ("mlp", "retrac", "mse", "per_timestep", "recorded"),
    ("mlp", "retrac", "l1", "per_draw", "recorded"),
    ("mlp", "retrac", "mse", "cosine", "timestep_average"),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_attribute_engines_agree(case, tiny_run, tiny_points_run):
    kind, method, loss, normalization, train_side = case
    run = tiny_run if kind == "unet" else tiny_points_run
    queries = run.data.images[-2:] * 0.9 + 0.05   # near the data, inside its range
    kw = dict(timesteps=3, n_noise=3, loss=loss, normalization=normalization, checkpoints=[2],
              train_side=train_side, chunk_size=16, progress=False)
    fast = rl.attribute(run, queries, method, engine="ghost", **kw)
    slow = rl.attribute(run, queries, method, engine="func", **kw)
    assert fast.config == slow.config
    assert _rel(fast.scores, slow.scores) <= TOL
    assert _rel(fast.train_grad_norms, slow.train_grad_norms) <= TOL
    # the default, for the book's models
    assert rl.attribution.engine_name("auto", run.model_at(0)) == "ghost"


def test_non_finite_training_gradient_names_the_sample(tiny_run, monkeypatch):
    original = ghost.group_terms

    def poison(model, scheduler, x, *args):
        sq, dots = original(model, scheduler, x, *args)
        hit = (x[:, 0] == tiny_run.data.images[7]).flatten(1).all(1)
        sq[hit] = float("nan")
        return sq, dots

    monkeypatch.setattr(ghost, "group_terms", poison)
    with pytest.raises(FloatingPointError, match="training sample 7 at checkpoint 1 is NaN or infinite"):
        rl.attribute(tiny_run, tiny_run.data.images[:1], "retrac", checkpoints=[1], timesteps=2,
                     n_noise=2, engine="ghost", progress=False)


# ---------------------------------------------------------------------------------------------
# layers the engine does not cover


class _Scaled(nn.Module):
    """A denoiser with a layer type the engine does not know (a bare learnable scale)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x, t):
        return SimpleNamespace(sample=self.lin(x) * self.scale)


class _Twice(nn.Module):
    """A denoiser that applies one layer twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x, t):
        return SimpleNamespace(sample=self.lin(self.lin(x)))


def test_unsupported_layers_are_named():
    model = _Scaled()
    model.conv = nn.Conv1d(2, 2, 1)
    model.norm = nn.BatchNorm1d(2)
    assert ghost.unsupported_layers(model) == ["<model> (_Scaled)", "conv (Conv1d)", "norm (BatchNorm1d)"]
    x = torch.randn(4, 2)
    with pytest.raises(NotImplementedError, match=r"<model> \(_Scaled\), conv \(Conv1d\).*engine='func'"):
        ghost.capture(model, x, torch.zeros(4, dtype=torch.long), x, "mse", 1.0)
    grouped = nn.Module()
    grouped.conv = nn.Conv2d(4, 4, 3, groups=2)
    assert ghost.unsupported_layers(grouped) == ["conv (Conv2d)"]
    assert rl.attribution.engine_name("auto", model) == "func"
    with pytest.raises(NotImplementedError, match="Use engine='func'"):
        rl.attribution.engine_name("ghost", model)
    with pytest.raises(ValueError, match="engine must be one of"):
        rl.attribution.engine_name("fast", model)


def test_a_layer_applied_twice_is_refused():
    x = torch.randn(4, 2)
    with pytest.raises(NotImplementedError, match="lin ran twice"):
        ghost.capture(_Twice(), x, torch.zeros(4, dtype=torch.long), x, "mse", 1.0)


def test_bad_engine_is_named(tiny_run):
    with pytest.raises(ValueError, match="engine must be one of"):
        rl.attribute(tiny_run, tiny_run.data.images[:1], "tracin", timesteps=2, n_noise=1,
                     engine="fast", progress=False)
