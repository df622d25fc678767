"""Property-based: random shapes, dtypes, sizes and option values thrown at the public functions.

Each call either returns finite results of the right shape or raises a ValueError/TypeError
that names an argument that is wrong. Which arguments are wrong is decided here, independently
of ``retrac_lib.validation``, from what the functions document (an oracle per argument); a valid
call must succeed and an invalid one must fail naming one of the invalid arguments.
Bounded for CI: a few dozen derandomized examples per function on the tiny session runs.
"""
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import retrac_lib as rl
from retrac_lib.evaluation import counterfactual as cf

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
T = 1000  # num_train_timesteps of the tiny runs
NAMES = {"queries": r"quer", "x": r"\bx\b", "t": r"\bt\b|timesteps", "noise": r"\bnoise\b",
         "checkpoints": r"heckpoint", "timesteps": r"timesteps", "n_noise": r"n_noise",
         "query_noise": r"query_noise", "chunk_size": r"chunk_size", "method": r"method",
         "device": r"device"}
WRONG_DTYPES = [torch.float64, torch.float16, torch.int64, torch.uint8]


def mostly(valid, invalid):
    """Valid values about four times in five, so that whole calls are often valid too."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: valid if ok else invalid)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


# ---------------------------------------------------------------------------------------------
# strategies and the oracle for each argument

chunk_sizes = mostly(st.integers(4, 64), st.sampled_from([-2, -1, 0, 2.5, True, "8"]))
n_noises = mostly(st.sampled_from([1, 2, np.int64(2)]), st.sampled_from([-1, 0, 1.5, True]))
timesteps = mostly(st.one_of(st.integers(1, 4), st.lists(st.integers(0, T - 1), min_size=1,
                                                         max_size=4, unique=True)),
                   st.one_of(st.lists(st.integers(-2, T + 1), max_size=4),
                             st.sampled_from([-1, 0, T, 2.5, [10.7, 500.2], "5", [3, 3]])))
checkpoints = mostly(st.one_of(st.none(), st.lists(st.integers(-3, 2), min_size=1, max_size=3)),
                     st.one_of(st.lists(st.integers(-4, 3), max_size=3),
                               st.sampled_from([[1.5], 1, [np.int64(1)]])))


def ok_chunk(v):
    return _is_int(v) and v >= 1


def ok_n_noise(v):
    return _is_int(v) and v >= 1


def grid_len(v):
    """Length of the timestep grid ``v`` describes, or None when ``v`` is invalid."""
    if _is_int(v):
        return int(v) if 1 <= v <= T - 1 else None
    if isinstance(v, list) and v and all(_is_int(t) and 0 <= t < T for t in v) and len(set(v)) == len(v):
        return len(v)
    return None


def ok_checkpoints(v, n=3):
    if v is None:
        return True
    if not isinstance(v, list) or not v or not all(_is_int(c) and -n <= c < n for c in v):
        return False
    return len({int(c) % n for c in v}) == len(v)


@st.composite
def samples(draw, sample_shape):
    """(value, n, valid): a batch of samples with a random size, shape, dtype and container."""
    n = draw(st.sampled_from([1, 2, 3, 0]))
    defect = draw(st.sampled_from([None] * 6 + ["shape", "dtype", "numpy"]))
    shape = (n, *sample_shape)
    if defect == "shape":
        shape = draw(st.sampled_from([(n, 3), tuple(sample_shape), (n, 1, 7, 7)]))
    dtype = draw(st.sampled_from(WRONG_DTYPES)) if defect == "dtype" else torch.float32
    gen = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    x = torch.randn(shape, generator=gen).clamp(-1, 1)
    x = (x * 100).to(dtype) if not dtype.is_floating_point else x.to(dtype)
    valid = shape == (n, *sample_shape) and dtype == torch.float32 and defect != "numpy"
    return (x.numpy() if defect == "numpy" else x), n, valid


def _call(fn, invalid: list[str]):
    """``fn()``'s result when every argument is valid; None when it refused the call, which it
    must do exactly when ``invalid`` is not empty, with a ValueError/TypeError naming one of them."""
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - the property is about which errors come out
        event(f"refused: {type(err).__name__}")
        assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
        assert invalid, f"a valid call raised {type(err).__name__}: {err}"
        assert any(re.search(NAMES[name], str(err)) for name in invalid), (
            f"the error does not name any of the invalid arguments {invalid}: {err}")
        return None
    event("returned")
    assert not invalid, f"accepted invalid {invalid}"
    return out


# ---------------------------------------------------------------------------------------------
# the properties

@SETTINGS
@given(queries=samples((2,)), method=st.sampled_from(["tracin", "retrac", "trak"]),
       checkpoints=checkpoints, timesteps=timesteps, n_noise=n_noises, chunk_size=chunk_sizes,
       device=mostly(st.sampled_from([None, "cpu"]), st.sampled_from(["meta", "tpu9"])),
       query_noise=st.one_of(st.none(), st.tuples(st.integers(0, 2), st.booleans(),
                                                  mostly(st.just(torch.float32),
                                                         st.sampled_from(WRONG_DTYPES[:2])))))
def test_attribute(tiny_points_run, queries, method, checkpoints, timesteps, n_noise, chunk_size,
                   device, query_noise):
    queries, n_queries, queries_ok = queries
    n_grid = grid_len(timesteps)
    noise, noise_ok = None, True
    if query_noise is not None:
        k, per_timestep, dtype = query_noise
        shape = ((n_grid or 2), k, 2) if per_timestep else (k, 2)
        noise = torch.randn(shape).to(dtype)
        noise_ok = k >= 1 and dtype == torch.float32
    invalid = [name for name, ok in [
        ("queries", queries_ok and n_queries >= 1), ("method", method in ("tracin", "retrac")),
        ("checkpoints", ok_checkpoints(checkpoints)), ("timesteps", n_grid is not None),
        ("n_noise", ok_n_noise(n_noise)), ("chunk_size", ok_chunk(chunk_size)),
        ("device", device in (None, "cpu")), ("query_noise", noise_ok)] if not ok]
    res = _call(lambda: rl.attribute(tiny_points_run, queries, method, checkpoints=checkpoints,
                                     timesteps=timesteps, n_noise=n_noise, query_noise=noise,
                                     chunk_size=chunk_size, device=device, progress=False), invalid)
    if res is None:
        return
    n_ckpt = 3 if checkpoints is None else len(checkpoints)
    assert res.scores.shape == (n_queries, 48) and torch.isfinite(res.scores).all()
    assert res.train_grad_norms.shape == (n_ckpt, 48) and torch.isfinite(res.train_grad_norms).all()


@SETTINGS
@given(x=samples((1, 8, 8)), t=st.tuples(mostly(st.just("ok"), st.sampled_from(["float", "short", "range"])),
                                          st.integers(0, 99)),
       noise=mostly(st.just("ok"), st.sampled_from(["float64", "shape"])), chunk_size=chunk_sizes)
def test_per_sample_grads(tiny_run, x, t, noise, chunk_size):
    model = tiny_run.model_at(-1)
    x, n, x_ok = x
    kind, seed = t
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (max(n - 1, 0) if kind == "short" else n,), generator=gen)
    if kind == "float":
        t = t.float()
    if kind == "range" and n:
        t[0] = T
    shape = tuple(x.shape) if noise != "shape" else (n, 1, 8, 7)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64 if noise == "float64" else torch.float32)
    t_ok = kind == "ok" or (kind in ("range", "short") and n == 0)  # an empty t is a fine t
    invalid = [name for name, ok in [("x", x_ok), ("t", t_ok), ("noise", noise == "ok"),
                                     ("chunk_size", ok_chunk(chunk_size))] if not ok]
    g = _call(lambda: rl.per_sample_grads(model, tiny_run.scheduler, x, t, eps,
                                          chunk_size=chunk_size), invalid)
    if g is not None:
        assert g.shape == (n, rl.models.n_params(model)) and torch.isfinite(g).all()


@SETTINGS
@given(queries=samples((2,)), timesteps=timesteps, n_noise=n_noises, chunk_size=chunk_sizes)
def test_query_loss(tiny_points_run, queries, timesteps, n_noise, chunk_size):
    queries, n_queries, queries_ok = queries
    invalid = [name for name, ok in [
        ("queries", queries_ok), ("timesteps", grid_len(timesteps) is not None),
        ("n_noise", ok_n_noise(n_noise)), ("chunk_size", ok_chunk(chunk_size))] if not ok]
    loss = _call(lambda: cf.query_loss(tiny_points_run.model_at(-1), tiny_points_run.scheduler,
                                       queries, timesteps=timesteps, n_noise=n_noise,
                                       chunk_size=chunk_size), invalid)
    if loss is not None:
        assert loss.shape == (n_queries,) and loss.dtype == torch.float64 and torch.isfinite(loss).all()


@pytest.mark.parametrize("bad", [np.zeros((2, 2), np.float32), [[0.0, 0.0]]])
def test_containers_other_than_tensors_are_named(tiny_points_run, bad):
    with pytest.raises(TypeError, match="queries must be a torch.Tensor"):
        rl.attribute(tiny_points_run, bad, timesteps=2, n_noise=1, progress=False)
