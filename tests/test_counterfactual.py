"""Counterfactual tests (chapter 5): the LDS is right on a model whose retrained loss is known
exactly, is about 0 for random scores, and retraining uses exactly the kept samples."""
from __future__ import annotations

import json

import pytest
import torch

import retrac_lib as rl
from retrac_lib.evaluation import counterfactual as cf


@pytest.fixture(scope="module")
def points_config():
    return rl.TrainConfig(model="mlp", clip_sample=False, mlp_hidden=16, mlp_layers=1, epochs=1,
                          batch_size=8, checkpoint_every=1)


@pytest.fixture(scope="module")
def points():
    return rl.data.moons(n=24)


def _additive(beta: torch.Tensor, offset: float = 3.0):
    """A synthetic datamodel: a subset's query loss drops by the summed true effects of its members."""
    return lambda mask: offset - mask.double() @ beta.T


# LDS on synthetic linear datamodels (no training).

def test_lds_of_the_true_additive_effect_is_exactly_one(generator):
    beta = torch.randn(6, 40, generator=generator, dtype=torch.float64)
    masks = cf.random_subsets(40, 30, seed=1)
    res = cf.lds(beta, masks, _additive(beta))
    assert torch.equal(res.per_query, torch.ones(6, dtype=torch.float64))
    assert res.mean == 1.0 and res.std == 0.0
    # a monotone transform of the true effect ranks subsets the same way
    assert cf.lds(5 * beta + 0.0, masks, _additive(beta)).mean == 1.0


def test_lds_sign_convention_reversed_scores_give_minus_one(generator):
    beta = torch.randn(4, 30, generator=generator, dtype=torch.float64)
    masks = cf.random_subsets(30, 25, seed=2)
    assert torch.allclose(cf.lds(-beta, masks, _additive(beta)).per_query,
                          -torch.ones(4, dtype=torch.float64))


def test_lds_accepts_a_loss_matrix_or_a_function(generator):
    beta = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    scores = beta + 0.5 * torch.randn(3, 20, generator=generator, dtype=torch.float64)
    masks = cf.random_subsets(20, 15, seed=3)
    matrix = torch.stack([_additive(beta)(m) for m in masks])
    a, b = cf.lds(scores, masks, _additive(beta)), cf.lds(scores, masks, matrix)
    assert torch.equal(a.per_query, b.per_query)
    assert 0.3 < a.mean < 1.0, "noisy but informative scores should correlate partly"


def test_random_scores_give_lds_near_zero(generator):
    n, m, q = 50, 40, 300
    beta = torch.randn(q, n, generator=generator, dtype=torch.float64)
    noise_scores = torch.randn(q, n, generator=generator, dtype=torch.float64)
    res = cf.lds(noise_scores, cf.random_subsets(n, m, seed=4), _additive(beta))
    # each query's correlation has spread ~ 1/sqrt(M - 1) = 0.16; the mean over 300 ~ 0.009
    assert abs(res.mean) < 0.05, res.mean
    assert 0.1 < res.std < 0.25, res.std


def test_lds_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="share N"):
        cf.lds(torch.zeros(2, 10), torch.zeros(5, 9, dtype=torch.bool), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="losses must be"):
        cf.lds(torch.zeros(2, 10), torch.zeros(5, 10, dtype=torch.bool), torch.zeros(2, 5))


def test_random_subsets_are_seeded_and_of_exact_size():
    a, b = cf.random_subsets(21, 7, fraction=0.5, seed=5), cf.random_subsets(21, 7, 0.5, seed=5)
    assert torch.equal(a, b) and a.dtype == torch.bool and a.shape == (7, 21)
    assert (a.sum(1) == round(0.5 * 21)).all()
    assert len({tuple(r.tolist()) for r in a}) == 7
    assert not torch.equal(a, cf.random_subsets(21, 7, 0.5, seed=6))
    with pytest.raises(ValueError):
        cf.random_subsets(10, 2, fraction=1.0)


# Retraining on exactly the kept samples.

def test_kept_without():
    assert cf.kept_without(6, [4, 1]).tolist() == [0, 2, 3, 5]


def test_retrain_on_trains_on_exactly_the_kept_indices(points_config, points, tmp_path):
    kept = [17, 2, 3, 11, 20, 5, 8, 0, 23]
    run = cf.retrain_on(points_config, points, kept, root=tmp_path)
    expected = points.subset(sorted(kept))
    assert torch.equal(run.data.images, expected.images)
    assert torch.equal(run.data.labels, expected.labels)
    assert run.config == points_config, "a retrain keeps the configuration, seed included"
    assert set(run.log.indices.tolist()) == set(range(len(kept)))
    mask = torch.zeros(len(points), dtype=torch.bool)
    mask[kept] = True
    again = cf.retrain_on(points_config, points, mask, root=tmp_path)
    assert again.path == run.path, "the same kept set, as indices or mask, is one cached run"


def test_retrain_on_rejects_bad_kept_sets(points_config, points, tmp_path):
    with pytest.raises(ValueError, match="duplicates"):
        cf.retrain_on(points_config, points, [1, 1, 2], root=tmp_path)
    with pytest.raises(ValueError, match=r"kept \[24\] lie outside \[0, 24\)"):
        cf.retrain_on(points_config, points, [0, 24], root=tmp_path)
    with pytest.raises(TypeError, match="kept must be integers"):
        cf.retrain_on(points_config, points, torch.tensor([0.0, 3.0]), root=tmp_path)
    with pytest.raises(ValueError, match="empty"):
        cf.retrain_on(points_config, points, [], root=tmp_path)


def test_removal_test_retrains_without_exactly_each_top_k(points_config, points, tmp_path,
                                                           monkeypatch, generator):
    seen = []
    real = cf.load_or_train

    def recording(config, data, **kw):
        seen.append(data)
        return real(config, data, **kw)

    monkeypatch.setattr(cf, "load_or_train", recording)
    queries = rl.data.moons(n=8, seed=1).images[:2]
    scores = {"a": torch.randn(2, 24, generator=generator), "b": torch.randn(2, 24, generator=generator)}
    res = cf.removal_test(points_config, points, queries, scores, k=4, progress=False, root=tmp_path)
    assert torch.equal(seen[0].images, points.images), "the first run is the full-data reference"
    retrained = iter(seen[1:])
    for name, s in scores.items():
        for q in range(2):
            top = set(s[q].topk(4).indices.tolist())
            assert set(res.removed[name][q].tolist()) == top
            kept = [i for i in range(24) if i not in top]
            assert torch.equal(next(retrained).images, points.subset(kept).images)
    assert res.n_retrains == len({tuple(sorted(r.tolist())) for v in res.removed.values() for r in v})
    base = rl.load_or_train(points_config, points, root=tmp_path)
    assert torch.allclose(res.base_loss, cf.run_query_loss(base, queries))
    assert res.increase("a").shape == (2,)


def test_query_loss_is_the_mean_loss_over_a_fixed_grid_and_noise(tiny_points_run):
    model, sched = tiny_points_run.model_at(-1), tiny_points_run.scheduler
    z = tiny_points_run.data.images[:3]
    got = cf.query_loss(model, sched, z, timesteps=5, n_noise=3, seed=7)
    # other chunk sizes change the batch of the forward pass, which may round differently
    chunked = cf.query_loss(model, sched, z, timesteps=5, n_noise=3, seed=7, chunk_size=4)
    torch.testing.assert_close(chunked, got, rtol=1e-6, atol=0)
    grid = rl.timesteps.timestep_grid(5)
    noise = rl.timesteps.query_noise_draws((2,), 5, 3, 7)
    with torch.no_grad():
        manual = torch.stack([
            torch.stack([rl.losses.diffusion_loss(model, sched, zq.expand(3, 2), grid[i].repeat(3),
                                                  noise[i]) for i in range(5)]).double().mean()
            for zq in z])
    assert torch.allclose(got, manual)


def test_format_table():
    text = cf.format_table({"tracin": {"LDS": 0.25, "n": "8"}, "random": {"LDS": -0.01, "n": "8"}})
    lines = text.splitlines()
    assert lines[0].split() == ["method", "LDS", "n"] and "+0.250" in lines[2]


# Planted outliers and self-influence.

def test_digits_with_outliers_plants_visible_outliers():
    data = rl.data.digits_with_outliers(n_digits=50, n_outliers=4, seed=1)
    is_out = data.labels == rl.data.OUTLIER_LABEL
    assert len(data) == 54 and int(is_out.sum()) == 4
    assert data.images.shape == (54, 1, 8, 8) and data.images.abs().max() <= 1
    assert is_out.nonzero().min() < 50, "outliers are mixed in, not appended"
    again = rl.data.digits_with_outliers(n_digits=50, n_outliers=4, seed=1)
    assert data.fingerprint() == again.fingerprint()
    digits = rl.data.digits("train").subset(range(50)).images.flatten(1)
    nearest_digit = torch.cdist(data.images[is_out].flatten(1), digits).min(1).values
    typical = torch.cdist(digits, digits).fill_diagonal_(float("inf")).min(1).values.median()
    assert (nearest_digit > 2 * typical).all(), "an outlier should be far from every digit"
    outliers = data.images[is_out].flatten(1)
    spread = torch.cdist(outliers, outliers).max()
    assert spread < typical, "the outliers are one family: closer to each other than digits are"


def test_self_influence_outlier_auc_and_top():
    scores = torch.tensor([[5.0, 1.0, 0.0], [2.0, 0.5, 9.0], [0.0, 3.0, 7.0]])
    assert cf.self_influence(scores).tolist() == [5.0, 0.5, 7.0]
    pixel = -torch.cdist(torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([[0.0], [1.0], [5.0]]))
    assert cf.self_influence(pixel, "pixel").tolist() == [1.0, 1.0, 4.0]
    is_out = torch.tensor([False, False, True])
    assert cf.outlier_auc(torch.tensor([0.1, 0.2, 0.9]), is_out) == 1.0
    assert cf.outlier_auc(torch.tensor([0.5, 0.5, 0.5]), is_out) == 0.5
    assert cf.outlier_auc(torch.tensor([0.3, 0.2, 0.1]), is_out) == 0.0
    assert cf.outliers_in_top(torch.tensor([0.3, 0.2, 0.9]), is_out) == 1
    assert cf.outliers_in_top(torch.tensor([0.3, 0.2, 0.1]), is_out, k=2) == 0
    with pytest.raises(ValueError, match="N, N"):
        cf.self_influence(torch.zeros(2, 3))


def test_run_self_influence_is_the_diagonal_of_attribution(tiny_points_run):
    opts = dict(timesteps=3, n_noise=2, progress=False, cached=False)
    si = cf.run_self_influence(tiny_points_run, "retrac", checkpoints=[-1], **opts)
    last = len(tiny_points_run.checkpoints) - 1
    full = rl.attribute(tiny_points_run, tiny_points_run.data.images, "retrac", checkpoints=[last],
                        timesteps=3, n_noise=2, progress=False)
    assert torch.allclose(si, full.scores.diagonal())


def test_run_self_influence_reads_its_cache(tiny_points_run, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path))
    opts = dict(timesteps=3, n_noise=2, progress=False)
    first = cf.run_self_influence(tiny_points_run, "tracin", **opts)
    assert len(list((tmp_path / "attributions").iterdir())) == 1
    computed = []
    monkeypatch.setattr(rl.attribution.scoring, "_diagonal",
                        lambda p: computed.append(p) or torch.zeros(len(p.run.data)))
    assert torch.equal(cf.run_self_influence(tiny_points_run, "tracin", **opts), first)
    assert not computed                  # read back, not computed again
    cf.run_self_influence(tiny_points_run, "tracin", cached=False, **opts)
    assert len(computed) == 1            # cached=False computes


def test_removal_test_averages_seeds_and_draws_random_sets(points_config, points, tmp_path, generator):
    queries = rl.data.moons(n=8, seed=1).images[:2]
    scores = {"a": torch.randn(2, 24, generator=generator)}
    res = cf.removal_test(points_config, points, queries, scores, k=3, seeds=[0, 5], random_draws=2,
                          random_seed=7, progress=False, root=tmp_path)
    assert res.seeds == (0, 5) and res.removed["random"].shape == (2, 2, 3)
    assert torch.equal(res.removed["random"], cf.random_removals(24, 2, 2, 3, seed=7))
    assert res.n_retrains == 2 * (2 + 4)

    def loss(kept, q):   # the slow way: train each seed, measure, average
        runs = [rl.load_or_train(points_config.replace(seed=s), points.subset(kept), root=tmp_path)
                for s in (0, 5)]
        return sum(float(cf.run_query_loss(r, queries[q:q + 1])[0]) for r in runs) / 2

    top = scores["a"][1].topk(3).indices.tolist()
    assert res.loss["a"][1].item() == pytest.approx(loss([i for i in range(24) if i not in top], 1), rel=1e-9)
    draws = [loss(cf.kept_without(24, res.removed["random"][0, d]).tolist(), 0) for d in range(2)]
    assert res.draw_loss[0].tolist() == pytest.approx(draws, rel=1e-9)
    assert res.loss["random"][0].item() == pytest.approx(sum(draws) / 2, rel=1e-9)
    assert res.base_loss[0].item() == pytest.approx(loss(list(range(24)), 0), rel=1e-9)
    with pytest.raises(ValueError, match="not both"):
        cf.removal_test(points_config, points, queries, {"random": scores["a"]}, k=3, random_draws=1,
                        progress=False, root=tmp_path)
    with pytest.raises(ValueError, match="distinct training seeds"):
        cf.removal_test(points_config, points, queries, scores, k=3, seeds=[1, 1], progress=False,
                        root=tmp_path)


def test_subset_losses_average_the_seeds(points_config, points, tmp_path):
    queries = rl.data.moons(n=8, seed=1).images[:2]
    masks = cf.random_subsets(24, 2, seed=3)
    both = cf.subset_losses(points_config, points, masks, queries, seeds=[0, 1], progress=False, root=tmp_path)
    each = [cf.subset_losses(points_config.replace(seed=s), points, masks, queries, progress=False,
                             root=tmp_path) for s in (0, 1)]
    assert torch.allclose(both, (each[0] + each[1]) / 2)


def test_paired_difference_interval():
    same = cf.paired_difference(torch.tensor([3.0, 2.0, 5.0]), torch.tensor([1.0, 0.0, 3.0]))
    assert (same.mean, same.low, same.high) == (2.0, 2.0, 2.0) and same.excludes_zero
    assert same.pick("up", "down", "tie") == "up"
    flipped = cf.paired_difference(torch.tensor([1.0, 0.0, 3.0]), torch.tensor([3.0, 2.0, 5.0]))
    assert flipped.pick("up", "down", "tie") == "down" and flipped.excludes_zero
    mixed = cf.paired_difference(torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.zeros(4))
    assert mixed.pick("up", "down", "tie") == "tie" and not mixed.excludes_zero
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, generator=gen) + 0.1, torch.randn(400, generator=gen)
    res = cf.paired_difference(a, b, n_boot=4000, seed=1)
    half = 1.96 * float((a - b).std()) / 400 ** 0.5            # the normal-theory interval
    assert res.mean == pytest.approx(float((a - b).mean()))
    assert res.low == pytest.approx(res.mean - half, abs=0.25 * half)
    assert res.high == pytest.approx(res.mean + half, abs=0.25 * half)
    again = cf.paired_difference(a, b, n_boot=4000, seed=1)
    assert (again.low, again.high) == (res.low, res.high)
    assert "95 % CI" in res.text() and res.text(".1f", " %").count(" %") == 4
    with pytest.raises(ValueError, match="same length"):
        cf.paired_difference(a, b[:5])
    with pytest.raises(ValueError, match="level"):
        cf.paired_difference(a, b, level=1.5)


def test_outlier_auc_interval_brackets_the_auc_and_collapses_when_separated():
    is_out = torch.tensor([True, True, False, False, False])
    assert cf.outlier_auc_interval(torch.tensor([5.0, 6.0, 1.0, 2.0, 3.0]), is_out) == (1.0, 1.0)
    gen = torch.Generator().manual_seed(0)
    values, is_out = torch.randn(60, generator=gen), torch.arange(60) < 20
    values[is_out] += 0.8
    low, high = cf.outlier_auc_interval(values, is_out, seed=3)
    assert low < cf.outlier_auc(values, is_out) < high and 0.5 < high - low + 0.5 < 1
    assert (low, high) == cf.outlier_auc_interval(values, is_out, seed=3)
    with pytest.raises(ValueError, match="two outliers"):
        cf.outlier_auc_interval(values, torch.arange(60) < 1)


# The loss ledger: retrains resumable from a small file.

def test_ledger_gives_the_cached_retrain_loss_and_resumes_without_training(
        points_config, points, tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path / "cache"))
    queries, opts = points.images[:3], dict(timesteps=4, n_noise=2, loss="mse")
    masks = cf.random_subsets(len(points), 2, seed=5)
    reference = cf.subset_losses(points_config, points, masks, queries, seeds=(0, 1),
                                 loss_options=opts, progress=False)
    path = tmp_path / "ledger.json"
    ledger = cf.LossLedger(path, owner="test")
    losses = cf.subset_losses(points_config, points, masks, queries, seeds=(0, 1),
                              loss_options=opts, progress=False, ledger=ledger)
    assert torch.equal(losses, reference) and len(ledger) == 4   # 2 subsets x 2 seeds
    assert ledger.seconds() > 0
    stored = json.loads(path.read_text())["entries"].values()
    assert {e["machine"] for e in stored} == {rl.machine.device_name("cpu")}
    assert not (tmp_path / "cache" / "runs").exists() or len(
        list((tmp_path / "cache" / "runs").iterdir())) == 4     # only the reference's runs

    def no_training(*args, **kwargs):
        raise AssertionError("a stored retrain was trained again")

    monkeypatch.setattr(cf, "train", no_training)
    again = cf.subset_losses(points_config, points, masks, queries, seeds=(0, 1),
                             loss_options=opts, progress=False,
                             ledger=cf.LossLedger(path, owner="test"))
    assert torch.equal(again, reference)
    with pytest.raises(AssertionError, match="trained again"):   # other queries: a new entry
        cf.subset_losses(points_config, points, masks, queries[:2], seeds=(0,),
                         loss_options=opts, progress=False, ledger=ledger)


def test_ledger_refuses_another_owner_and_another_format(tmp_path):
    path = tmp_path / "ledger.json"
    rl.cache.write_json_atomic(path, {"format": cf.LossLedger.FORMAT, "owner": "rung-a",
                                      "entries": {}})
    with pytest.raises(ValueError, match="belongs to 'rung-a', not to 'rung-b'.*Move it away"):
        cf.LossLedger(path, owner="rung-b")
    rl.cache.write_json_atomic(path, {"format": 99, "owner": "rung-a", "entries": {}})
    with pytest.raises(ValueError, match="not a loss ledger of format 1"):
        cf.LossLedger(path, owner="rung-a")


def _ledger_jobs(points_config, points, n):
    """``n`` ledger jobs (config, kept subset, queries) on the moons, one per kept subset."""
    masks = cf.random_subsets(len(points), n, seed=3)
    return [(points_config, cf.kept_subset(points, m), points.images[:2]) for m in masks]


LEDGER_OPTIONS = dict(timesteps=3, n_noise=1, loss="mse")


def test_ledgers_sharing_a_file_read_each_others_entries_and_lose_none(
        points_config, points, tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    first, second = cf.LossLedger(path, owner="t"), cf.LossLedger(path, owner="t")
    one, two = _ledger_jobs(points_config, points, 2)
    stored = first.loss_many([one], LEDGER_OPTIONS)[0]
    with monkeypatch.context() as m:
        m.setattr(cf, "train", lambda *a, **k: pytest.fail("trained what another ledger stored"))
        assert torch.equal(second.loss_many([one], LEDGER_OPTIONS)[0], stored)
    second.loss_many([two], LEDGER_OPTIONS)
    first.loss_many([one], LEDGER_OPTIONS)   # nothing new: the file is not rewritten from memory
    assert len(cf.LossLedger(path, owner="t")) == 2


def test_a_ledger_from_the_end_trains_the_missing_retrains_last_to_first(
        points_config, points, tmp_path, monkeypatch):
    jobs = _ledger_jobs(points_config, points, 4)
    keys = [cf.LossLedger.key(c, s, q, LEDGER_OPTIONS) for c, s, q in jobs]
    order = []

    def record(self, todo, loss_options):
        for k, *_ in todo:
            order.append(k)
            self.entries[k] = {"losses": [0.0, 0.0], "seconds": 0.0}

    monkeypatch.setattr(cf.LossLedger, "_train", record)
    first = cf.LossLedger(tmp_path / "a.json", owner="t")
    first.loss_many(jobs[:1], LEDGER_OPTIONS)             # job 0 is stored already
    cf.LossLedger(tmp_path / "a.json", owner="t", from_end=True).loss_many(jobs, LEDGER_OPTIONS)
    assert order == [keys[0], keys[3], keys[2], keys[1]]


@pytest.mark.version_independent
def test_ledger_workers_train_in_processes_what_one_process_would(points_config, points,
                                                                  tmp_path):
    jobs = _ledger_jobs(points_config, points, 3)
    serial = cf.LossLedger(tmp_path / "serial.json", owner="t").loss_many(jobs, LEDGER_OPTIONS)
    parallel = cf.LossLedger(tmp_path / "parallel.json", owner="t", workers=2)
    assert all(torch.equal(a, b) for a, b in zip(parallel.loss_many(jobs, LEDGER_OPTIONS),
                                                 serial))
    stored = cf.LossLedger(tmp_path / "parallel.json", owner="t").entries.values()
    assert len(stored) == 3   # each trained by a worker process of one thread
    assert {e["machine"] for e in stored} == {f"cpu ({rl.machine.cpu_name()}, 1 threads)"}


@pytest.mark.version_independent
def test_ledger_workers_keep_the_running_retrains_when_one_fails(points_config, points,
                                                                 tmp_path):
    (config, subset, queries), = _ledger_jobs(points_config, points, 1)
    slow = (config.replace(epochs=300), subset, queries)   # still training at the failure
    failing = (config, subset, torch.zeros(2, 3))   # trains, then its query loss refuses
    ledger = cf.LossLedger(tmp_path / "l.json", owner="t", workers=2)
    with pytest.raises(ValueError, match="queries"):
        ledger.loss_many([failing, slow], LEDGER_OPTIONS)
    stored = cf.LossLedger(tmp_path / "l.json", owner="t")
    assert list(stored.entries) == [cf.LossLedger.key(*slow, LEDGER_OPTIONS)]


def test_ledger_workers_are_checked(tmp_path):
    with pytest.raises(ValueError, match="workers must be"):
        cf.LossLedger(tmp_path / "l.json", owner="t", workers=0)
    with pytest.raises(ValueError, match="workers=2 trains single retrains.*pass workers=1"):
        cf.LossLedger(tmp_path / "l.json", owner="t", workers=2, ensemble_size=4)


def test_a_failed_ledger_write_warns_once_and_keeps_the_losses(
        points_config, points, tmp_path, monkeypatch):
    jobs = _ledger_jobs(points_config, points, 2)
    reference = cf.LossLedger(tmp_path / "good.json", owner="t").loss_many(jobs, LEDGER_OPTIONS)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cf.cache, "write_json_atomic", disk_full)
    ledger = cf.LossLedger(tmp_path / "full.json", owner="t")
    with pytest.warns(UserWarning, match=r"full\.json cannot be read or written.*No space") as w:
        losses = ledger.loss_many(jobs, LEDGER_OPTIONS)
    assert len(w) == 1 and not (tmp_path / "full.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(losses, reference))



def test_a_ledger_pins_the_first_runs_removal_sets_for_every_later_run(
        points_config, points, tmp_path, monkeypatch):
    """A second machine's model ranks differently: its run removes the first run's sets, so
    the ledger's retrains count, and it says whose sets they are and how far its own differ."""
    queries = points.images[:2]
    first = torch.arange(48, dtype=torch.float64).view(2, 24)    # top 4: 20..23 for both
    other = first.clone()
    other[0, 0], other[1, :2] = 100.0, 100.0   # query 0 swaps one sample in, query 1 two
    path, opts = tmp_path / "ledger.json", dict(LEDGER_OPTIONS)
    res = cf.removal_test(points_config, points, queries, {"a": first}, k=4, progress=False,
                          loss_options=opts, ledger=cf.LossLedger(path, owner="t"),
                          chosen_by={"fingerprint": "first"})
    assert res.chosen_by == {"fingerprint": "first"} and res.own_overlap == {"a": 1.0}
    assert res.removed["a"].tolist() == [[20, 21, 22, 23]] * 2

    def no_training(*args, **kwargs):
        raise AssertionError("a stored retrain was trained again")

    monkeypatch.setattr(cf, "train", no_training)
    again = cf.removal_test(points_config, points, queries, {"a": other}, k=4, progress=False,
                            loss_options=opts, ledger=cf.LossLedger(path, owner="t"),
                            chosen_by={"fingerprint": "second"})
    assert torch.equal(again.removed["a"], res.removed["a"])
    assert torch.equal(again.loss["a"], res.loss["a"])
    assert again.chosen_by == {"fingerprint": "first"}
    assert again.own_overlap == {"a": pytest.approx((3 / 4 + 2 / 4) / 2)}
    with pytest.raises(AssertionError, match="trained again"):   # another k: sets of its own
        cf.removal_test(points_config, points, queries, {"a": other}, k=3, progress=False,
                        loss_options=opts, ledger=cf.LossLedger(path, owner="t"),
                        chosen_by={"fingerprint": "second"})
    with pytest.raises(AssertionError, match="trained again"):   # no chosen_by: no pin read
        cf.removal_test(points_config, points, queries, {"a": other}, k=4, progress=False,
                        loss_options=opts, ledger=cf.LossLedger(path, owner="t"))
    unpinned = cf.removal_test(points_config, points, queries, {"a": first}, k=4,
                               progress=False, loss_options=opts, root=tmp_path / "runs")
    assert unpinned.chosen_by is None and unpinned.own_overlap == {"a": 1.0}
    with pytest.raises(ValueError, match="chosen_by pins the removal sets in a ledger"):
        cf.removal_test(points_config, points, queries, {"a": first}, k=4, progress=False,
                        chosen_by={"fingerprint": "x"})


def test_pinned_sets_keep_the_order_of_the_scores_and_only_pinned_runs_pin(
        points_config, points, tmp_path):
    queries, path = points.images[:2], tmp_path / "ledger.json"
    scores = {"b": torch.arange(48.0).view(2, 24), "a": -torch.arange(48.0).view(2, 24)}
    test = lambda **kw: cf.removal_test(points_config, points, queries, scores, k=2,
                                        progress=False, loss_options=LEDGER_OPTIONS,
                                        ledger=cf.LossLedger(path, owner="t"), **kw)
    assert test().methods == ["b", "a"] and "pins" not in json.loads(path.read_text())
    first, again = test(chosen_by={"by": 1}), test(chosen_by={"by": 2})   # pinned, then read
    assert first.methods == again.methods == ["b", "a"] and again.chosen_by == {"by": 1}
    assert json.loads(path.read_text())["format"] == cf.LossLedger.PINNED_FORMAT
    only_random = cf.removal_test(points_config, points, queries, {}, k=2, random_draws=1,
                                  progress=False, loss_options=LEDGER_OPTIONS,
                                  ledger=cf.LossLedger(path, owner="t"), chosen_by={"by": 3})
    assert only_random.methods == ["random"] and only_random.chosen_by == {"by": 3}


def test_a_pin_that_cannot_be_written_warns_and_is_kept_for_this_run(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(cf.cache, "write_json_atomic", read_only)
    ledger = cf.LossLedger(tmp_path / "ledger.json", owner="t")
    with pytest.warns(UserWarning, match=r"not pinned there: a later run may choose otherwise"):
        assert ledger.pin("sets", [1], {"by": "me"})["value"] == [1]
    assert ledger.pin("sets", [2], {"by": "other"})["value"] == [1]   # in memory, as pinned


def test_two_ledgers_on_one_file_share_the_first_pin_and_keep_it(tmp_path):
    path = tmp_path / "ledger.json"
    a, b = cf.LossLedger(path, owner="t"), cf.LossLedger(path, owner="t")   # b: opened before
    assert a.pin("sets", [1, 2], {"by": "a"}) == {"value": [1, 2], "made_by": {"by": "a"}}
    assert b.pin("sets", [3, 4], {"by": "b"})["made_by"] == {"by": "a"}
    b.entries["x"] = {"losses": [1.0], "seconds": 1.0}
    b._save()                                                   # an entry written by b ...
    stored = json.loads(path.read_text())
    assert stored["pins"]["sets"]["value"] == [1, 2] and "x" in stored["entries"]   # ... keeps it


def test_a_damaged_pin_is_refused_with_the_file_named(points_config, points, tmp_path):
    path, queries = tmp_path / "ledger.json", points.images[:2]
    scores = {"a": torch.arange(48, dtype=torch.float64).view(2, 24)}
    cf.removal_test(points_config, points, queries, scores, k=2, progress=False,
                    loss_options=LEDGER_OPTIONS, ledger=cf.LossLedger(path, owner="t"),
                    chosen_by={"fingerprint": "f"})
    doc = json.loads(path.read_text())
    (key, pin), = doc["pins"].items()
    pin["value"]["a"][1] = "22 99"                                # an index beyond N = 24
    rl.cache.write_json_atomic(path, doc)
    with pytest.raises(ValueError, match=r"ledger\.json: the removal sets pinned under .* "
                                         r"not 2 sets of 2 indices below 24 for each of \['a'\]"):
        cf.removal_test(points_config, points, queries, scores, k=2, progress=False,
                        loss_options=LEDGER_OPTIONS, ledger=cf.LossLedger(path, owner="t"),
                        chosen_by={"fingerprint": "g"})

WORKER = """
import sys, time
import retrac_lib as rl
from retrac_lib.evaluation import counterfactual as cf

def fake_train(self, jobs, loss_options):      # a retrain of 20 ms with a recognisable loss
    time.sleep(0.02)
    for k, *_ in jobs:
        self.entries[k] = {"losses": [float(sys.argv[2])], "seconds": 0.02}

def slow_write(*args, _write=cf.cache.write_json_atomic):   # widen the read-merge-write window
    time.sleep(0.03)
    _write(*args)

cf.LossLedger._train = fake_train
cf.cache.write_json_atomic = slow_write
config = rl.TrainConfig(model="mlp", clip_sample=False, mlp_hidden=16, mlp_layers=1)
points = rl.data.moons(n=24)
masks = cf.random_subsets(24, 40, seed=int(sys.argv[2]))
jobs = [(config, cf.kept_subset(points, m), points.images[:2]) for m in masks]
cf.LossLedger(sys.argv[1], owner="t").loss_many(jobs, {})
"""


@pytest.mark.version_independent
def test_two_processes_writing_one_ledger_keep_every_entry(tmp_path):
    import subprocess
    import sys
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    path = tmp_path / "ledger.json"
    workers = [subprocess.Popen([sys.executable, str(script), str(path), str(seed)])
               for seed in (1, 2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    entries = cf.LossLedger(path, owner="t").entries
    assert len(entries) == 80   # 40 subsets each, all different: no write lost another's
    assert sorted({e["losses"][0] for e in entries.values()}) == [1.0, 2.0]
