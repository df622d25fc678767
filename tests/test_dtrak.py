"""D-TRAK as published (rl.dtrak): against a slow reference and hand-computed tiny cases."""
import pytest
import torch

from retrac_lib import dtrak, projection, seeding
from retrac_lib.projection import GaussianProjection
from retrac_lib.grads import per_sample_grads_loop


def test_uniform_timesteps_are_the_official_set():
    assert dtrak.uniform_timesteps(10).tolist() == list(range(0, 1000, 100))
    assert dtrak.uniform_timesteps(3, 12).tolist() == [0, 4, 8]
    with pytest.raises(ValueError, match="exceeds"):
        dtrak.uniform_timesteps(13, 12)


def test_whitened_scores_by_hand_and_in_both_spaces(generator):
    # k = 1: the kernel is the scalar sum_i phi_i^2 + lam
    phi, phi_q = torch.tensor([[1.0], [2.0], [-1.0]]), torch.tensor([[3.0]])
    expected = torch.tensor([[3 * 1 / 7.0, 3 * 2 / 7.0, 3 * -1 / 7.0]]).double()
    assert torch.allclose(dtrak.whitened_scores(phi_q, phi, 1.0), expected)
    # N < k (solved in N-space) and N > k (k-space) agree with the explicit inverse
    for n, k in ((5, 9), (9, 5)):
        f, q = torch.randn(n, k, generator=generator), torch.randn(2, k, generator=generator)
        ref = q.double() @ torch.linalg.inv(f.double().T @ f.double() + 0.3 * torch.eye(k).double()) @ f.double().T
        assert torch.allclose(dtrak.whitened_scores(q, f, 0.3), ref, atol=1e-10)
    with pytest.raises(ValueError, match="lam must be > 0"):
        dtrak.whitened_scores(q, f, 0.0)


def test_gaussian_projection_is_seeded_blockwise_and_preserves_inner_products(monkeypatch, generator):
    monkeypatch.setattr(projection, "ROW_BLOCK", 7)          # several blocks for a 20-dim input
    p = GaussianProjection(20, 3000, seed=1)
    g = torch.randn(4, 20, generator=generator)
    assert torch.allclose(p(g), g @ p.matrix(), atol=1e-5)
    assert torch.equal(p.matrix(), GaussianProjection(20, 3000, seed=1).matrix())
    assert not torch.equal(p.matrix(), GaussianProjection(20, 3000, seed=2).matrix())
    pg = p(g)
    assert torch.allclose(pg @ pg.T, g @ g.T, rtol=0.15, atol=0.3 * g.norm(dim=1).max() ** 2 / 5)
    with pytest.raises(ValueError, match=r"\[B, 20\]"):
        p(torch.zeros(2, 19))


def test_attribute_dtrak_matches_a_slow_reference(tiny_points_run):
    """Per sample and timestep one plain backward pass of mean eps_theta^2, averaged, projected
    with the explicit matrix, whitened with the explicit k x k inverse."""
    run, q, k, seed = tiny_points_run, tiny_points_run.data.images[:3] + 0.05, 16, 2
    res = dtrak.attribute_dtrak(run, q, checkpoints=[1], timesteps=4, proj_dim=k, damping=0.5, seed=seed)
    model, grid = run.model_at(1), torch.tensor([0, 250, 500, 750])

    def features(x, *stream):
        noise = torch.randn((len(x), 4, 2), generator=seeding.generator(seed, *stream))
        rows = [torch.stack([per_sample_grads_loop(model, run.scheduler, x[i:i + 1], grid[j:j + 1],
                                                   noise[i, j:j + 1], loss="square_norm")[0]
                             for j in range(4)]).mean(0) for i in range(len(x))]
        return torch.stack(rows).double()

    g, gq = features(run.data.images), features(q, seeding.DTRAK_QUERY_NOISE)
    proj = GaussianProjection(g.shape[1], k, seed).matrix().double()
    phi, phi_q = g @ proj, gq @ proj
    lam = 0.5 * phi.square().sum() / min(phi.shape)
    expected = phi_q @ torch.linalg.inv(phi.T @ phi + lam * torch.eye(k, dtype=torch.float64)) @ phi.T
    assert torch.allclose(res.scores, expected, rtol=1e-3, atol=1e-6 * expected.abs().max())
    assert torch.allclose(res.train_grad_norms[0].double(), g.norm(dim=1), rtol=1e-4)
    assert res.config.method == "dtrak" and res.config.timesteps == (0, 250, 500, 750)
    assert res.config.proj_dim == k and res.scores.shape == (3, len(run.data))


def test_attribute_dtrak_refuses_bad_input(tiny_points_run):
    q = tiny_points_run.data.images[:1]
    with pytest.raises(ValueError, match="queries"):
        dtrak.attribute_dtrak(tiny_points_run, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="damping"):
        dtrak.attribute_dtrak(tiny_points_run, q, damping=0)
    with pytest.raises(ValueError, match="proj_dim"):
        dtrak.attribute_dtrak(tiny_points_run, q, proj_dim=0)
    n = len(tiny_points_run.checkpoints)
    with pytest.raises(ValueError, match=rf"Checkpoints \[{n}\] do not exist"):   # never wrapped around
        dtrak.attribute_dtrak(tiny_points_run, q, checkpoints=[n])
    with pytest.raises(ValueError, match="more than once"):
        dtrak.attribute_dtrak(tiny_points_run, q, checkpoints=[-1, n - 1])
