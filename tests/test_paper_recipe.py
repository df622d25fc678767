"""The paper's recipe: fresh query noise per query (``noise_per_query``) against the slow
reference of ``test_attribution``, and ``setups.paper_setup``."""
from __future__ import annotations

import pytest
import torch
from test_attribution import ref_scores, rel_err

import retrac_lib as rl
from retrac_lib.book import recipes, setups
from retrac_lib import seeding
from retrac_lib.timesteps import per_query_noise_draws

GRID, K = [5, 400, 990], 2


@pytest.mark.parametrize("method", ["tracin", "retrac"])
def test_noise_per_query_equals_reference_with_each_querys_own_draws(method, tiny_run):
    queries = rl.data.digits("test").images[:3]
    ckpts = [0, len(tiny_run.checkpoints) - 1]
    res = rl.attribute(tiny_run, queries, method, checkpoints=ckpts, timesteps=GRID, n_noise=K,
                       noise_seed=3, noise_per_query=True, progress=False)
    assert res.config.noise_per_query
    expected = torch.zeros_like(res.scores)
    for q in range(len(queries)):       # each query alone, each checkpoint with its own draws
        for c in ckpts:
            gen = seeding.generator(3, seeding.PER_QUERY_NOISE, c, q)
            noise = torch.randn((len(GRID), K, *queries.shape[1:]), generator=gen)
            expected[q] += ref_scores(tiny_run, queries[q:q + 1], [c], GRID, noise,
                                      tiny_run.config.loss, method)[0][0]
    assert rel_err(res.scores, expected) <= 1e-4


def test_per_query_draws_differ_between_queries_and_checkpoints():
    a = per_query_noise_draws((1, 8, 8), 2, 3, 4, seed=0, checkpoint=0)
    b = per_query_noise_draws((1, 8, 8), 2, 3, 4, seed=0, checkpoint=1)
    assert a.shape == (2, 3, 4, 1, 8, 8)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, b)
    assert torch.equal(a, per_query_noise_draws((1, 8, 8), 2, 3, 4, seed=0, checkpoint=0))


def test_noise_per_query_is_keyed_and_refuses_explicit_noise(tiny_run, tmp_path):
    queries = rl.data.digits("test").images[:2]
    opts = dict(checkpoints=[0], timesteps=2, n_noise=1, progress=False)
    shared = rl.load_or_attribute(tiny_run, queries, "tracin", root=tmp_path, **opts)
    fresh = rl.load_or_attribute(tiny_run, queries, "tracin", root=tmp_path, noise_per_query=True, **opts)
    assert not torch.equal(shared.scores, fresh.scores)
    assert len(list((tmp_path / "attributions").iterdir())) == 2
    assert "noise_per_query" not in shared.config.to_dict()   # old cache keys stay valid
    with pytest.raises(ValueError, match="either it or query_noise"):
        rl.attribute(tiny_run, queries, "tracin", query_noise=torch.zeros(1, 1, 8, 8),
                     noise_per_query=True, **opts)


@pytest.mark.parametrize("smoke", [True, False])
def test_paper_setup_changes_only_the_official_choices(smoke):
    book_cfg, book_data = setups.digits_setup(smoke)
    cfg, data, options = setups.paper_setup(smoke)
    assert data is not None and len(data) == len(book_data)
    assert cfg == book_cfg.replace(loss="l1", beta_schedule="squaredcos_cap_v2")
    assert options["train_side"] == "fresh_noise" and options["noise_per_query"] is True
    if not smoke:
        assert (options["timesteps"], options["n_noise"]) == (100, 16)
    assert rl.models.build_scheduler(cfg).config.beta_schedule == "squaredcos_cap_v2"


def test_agreement_hand_computed():
    a = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 4.0, 3.0]])
    agree = recipes.agreement(a, b, k=2)
    # row 0: reversed ranking; row 1: ranks (1,2,3,4,5) vs (1,2,3,5,4): 1 - 6*2/(5*24) = 0.9
    assert torch.allclose(agree.spearman, torch.tensor([-1.0, 0.9], dtype=torch.float64))
    assert agree.top_overlap.tolist() == [0.0, 1.0] and agree.mean_overlap == 0.5
    with pytest.raises(ValueError, match="same shape"):
        recipes.agreement(a, b[:, :4])


def test_run_bias_matches_scipy_on_the_recorded_norms(tiny_run):
    from scipy.stats import spearmanr
    bias = recipes.run_bias(tiny_run)
    t, eps = tiny_run.recorded(-1)
    norms = rl.per_sample_grads(tiny_run.model_at(-1), tiny_run.scheduler, tiny_run.data.images,
                                t, eps).norm(dim=1)
    losses = rl.losses.diffusion_loss(tiny_run.model_at(-1), tiny_run.scheduler, tiny_run.data.images,
                                      t, eps, tiny_run.config.loss).detach()
    assert bias.spearman == pytest.approx(spearmanr(t, norms).statistic, abs=1e-6)
    assert bias.loss_norm_spearman == pytest.approx(spearmanr(losses, norms).statistic, abs=1e-5)
    order = t.argsort(stable=True)
    tenth = len(t) // 10
    assert bias.decile_ratio == pytest.approx(
        float(norms[order[:tenth]].mean() / norms[order[-tenth:]].mean()), rel=1e-4)
