"""``rl.seeding``: plain seeds draw what ``manual_seed`` draws; streams of a seed (a purpose and
indices) draw independently, never colliding by arithmetic as the old formulas did."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import retrac_lib as rl
from retrac_lib import dtrak, seeding
from retrac_lib.attribution.sketch import sketch_training
from retrac_lib.diagnostics import sample_noise
from retrac_lib.evaluation import counterfactual as cf
from retrac_lib.projection import CountSketch, GaussianProjection
from retrac_lib.timesteps import per_query_noise_draws


def draws(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(64, generator=gen)


@pytest.mark.parametrize("seed", [0, 7, 1_000_003, 2**63 + 5])
def test_a_plain_seed_draws_what_manual_seed_draws(seed):
    assert torch.equal(draws(seeding.generator(seed)),
                       draws(torch.Generator().manual_seed(seed)))
    assert seeding.generator(seed).initial_seed() == seed


def test_the_same_stream_draws_the_same_and_every_other_stream_differs():
    streams = [(0,), (1,), (0, seeding.SAMPLE_NOISE), (0, seeding.SAMPLE_NOISE, 0),
               (0, seeding.SAMPLE_NOISE, 1), (0, seeding.SAMPLE_NOISE, 0, 0),
               (0, seeding.TRAINING_NOISE, 0), (0, seeding.PER_QUERY_NOISE, 0, 0),
               (0, seeding.PER_QUERY_NOISE, 0, 1), (0, seeding.PER_QUERY_NOISE, 1, 0),
               (1, seeding.PER_QUERY_NOISE, 0, 0)]
    streams += [(3, purpose, 2) for purpose in seeding.PURPOSES]
    seen = [draws(seeding.generator(*s)) for s in streams]
    for s, d in zip(streams, seen):
        assert torch.equal(d, draws(seeding.generator(*s)))
    distinct = {tuple(d.tolist()) for d in seen}
    assert len(distinct) == len(streams)


def test_streams_do_not_collide_where_the_old_formulas_did():
    # sample_noise drew from 1_000_003 * seed + i: seed 0's sample 1_000_003 was seed 1's sample 0
    old = [torch.Generator().manual_seed(1_000_003 * s + i) for s, i in ((0, 1_000_003), (1, 0))]
    assert torch.equal(draws(old[0]), draws(old[1]))
    assert not torch.equal(draws(seeding.generator(0, seeding.SAMPLE_NOISE, 1_000_003)),
                           draws(seeding.generator(1, seeding.SAMPLE_NOISE, 0)))
    a, b = sample_noise((2,), [1_000_003], seed=0), sample_noise((2,), [0], seed=1)
    assert not torch.equal(a, b)
    # SeedSequence alone pads with zeros and splits large ints into words: the encoding does not
    assert np.array_equal(np.random.SeedSequence([2**32]).generate_state(2),
                          np.random.SeedSequence([0, 1]).generate_state(2))
    assert not torch.equal(draws(seeding.generator(2**32, seeding.COUNTSKETCH_HASH)),
                           draws(seeding.generator(0, seeding.COUNTSKETCH_HASH, 1)))


def test_a_stream_seed_fits_in_63_bits():
    for i in range(50):
        assert 0 <= seeding.generator(2**64 - 1, seeding.GAUSSIAN_PROJECTION, i).initial_seed() \
            < 2**63


def test_the_librarys_streams_come_from_the_helper():
    """Each composite draw of the library is its purpose's stream (the formulas are gone)."""
    assert torch.equal(sample_noise((3,), [4], n_noise=2, seed=5)[0],
                       torch.randn((2, 3), generator=seeding.generator(5, seeding.SAMPLE_NOISE, 4)))
    noise = per_query_noise_draws((3,), 2, 4, 5, seed=6, checkpoint=1)
    assert torch.equal(noise[1], torch.randn(
        (4, 5, 3), generator=seeding.generator(6, seeding.PER_QUERY_NOISE, 1, 1)))
    gen = seeding.generator(2, seeding.COUNTSKETCH_HASH, 0)
    buckets, signs = CountSketch(100, 7, seed=2).buckets()
    assert torch.equal(buckets, torch.randint(0, 7, (100,), generator=gen))
    assert torch.equal(signs, torch.randint(0, 2, (100,), generator=gen).mul(2).sub(1).float())
    rows = torch.randn(30, 4, generator=seeding.generator(2, seeding.GAUSSIAN_PROJECTION, 0))
    assert torch.equal(GaussianProjection(30, 4, seed=2).matrix(), rows / 2)


@pytest.mark.parametrize("call, message", [
    (lambda: seeding.generator(-1), r"seed must be >= 0, got -1"),
    (lambda: seeding.generator(-3, name="noise_seed"), r"noise_seed must be >= 0, got -3"),
    (lambda: seeding.generator(0, seeding.TRAINING_NOISE, -1),
     r"training-side noise index 0 must be >= 0, got -1"),
    (lambda: seeding.generator(0, seeding.PER_QUERY_NOISE, 0, -2),
     r"per-query noise index 1 must be >= 0, got -2"),
    (lambda: seeding.generator(2**64), r"seed must be below 2\*\*64"),
    (lambda: seeding.generator(0, 99), r"purpose must be one of"),
    (lambda: sample_noise((2,), [0], seed=-1), r"seed must be >= 0, got -1"),
    (lambda: per_query_noise_draws((2,), 1, 1, 1, seed=-1, checkpoint=0),
     r"noise_seed must be >= 0"),
    (lambda: CountSketch(10, 2, seed=-1), r"seed must be >= 0"),
    (lambda: GaussianProjection(10, 2, seed=-1), r"seed must be >= 0"),
    (lambda: rl.TrainConfig(seed=-1), r"TrainConfig.seed must be >= 0"),
])
def test_negative_seeds_and_indices_are_refused_naming_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_seed_must_be_an_integer():
    with pytest.raises(TypeError, match=r"seed must be an integer, got 1.5"):
        seeding.generator(1.5)
    with pytest.raises(TypeError, match=r"seed must be an integer, got True"):
        seeding.generator(True)


def test_public_callers_refuse_negative_seeds(tiny_points_run):
    run, q = tiny_points_run, tiny_points_run.data.images[:1]
    with pytest.raises(ValueError, match=r"noise_seed must be >= 0, got -1"):
        rl.attribute(run, q, "tracin", noise_seed=-1, progress=False)
    with pytest.raises(ValueError, match=r"projection_seed must be >= 0, got -2"):
        rl.attribute(run, q, "tracin", projection=4, projection_seed=-2, progress=False)
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        sketch_training(run, 4, seed=-1, progress=False)
    with pytest.raises(ValueError, match=r"noise_seed must be >= 0, got -1"):
        sketch_training(run, 4, noise_seed=-1, progress=False)
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        dtrak.attribute_dtrak(run, q, seed=-1, progress=False)
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        cf.query_loss(run.model_at(-1), run.scheduler, q, timesteps=2, n_noise=1, seed=-1)


def test_seeding_is_a_core_leaf():
    """It imports torch, numpy and ``validation`` only, so every layer may use it."""
    tree = ast.parse(Path(seeding.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {f"{'.' * node.level}{node.module or ''}:{a.name}" for a in node.names}
    assert names == {"__future__:annotations", "numpy", "torch", ".:validation"}
