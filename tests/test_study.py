"""The scale study (retrac_lib.evaluation.study): a smoke rung end to end, provenance refusal, the cost
estimate and the plan, the feature baseline, and the ``study`` command."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import retrac_lib as rl
from retrac_lib import cli
from retrac_lib.book import setups
from retrac_lib.evaluation import baselines, features, study
from retrac_lib.evaluation import counterfactual as cf

# With --dist loadgroup (the README's command) one worker runs this file, so the smoke rung of
# the module fixture below is computed once, not once per worker (about a minute each).
pytestmark = pytest.mark.xdist_group("smoke_rung")

PARTS = ("train", "feature_classifier", "generation", "bias", "attribution", "lds", "removal",
         "self_influence", "generated_queries")


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    """The smoke n250 rung run once, in a cache of its own, and written to a result file."""
    root = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRAC_CACHE", str(root / "cache"))
        rung = study.get_rung("n250", smoke=True)
        result = study.run_rung(rung, progress=False, ledger=root / "ledger.json")
        path = study.write_result(result, root / "out")
        run = rl.load_or_train(rung.config, study.rung_data(rung)[0], progress=False)
        yield rung, result, path, run


def test_smoke_rung_writes_a_result_that_reads_back(smoke_result):
    rung, result, path, _ = smoke_result
    # about 8 kB of measurements and 11.5 kB of kept images (8 at 32 x 32, base64)
    assert path.name == "n250-smoke.json" and path.stat().st_size < 32_000
    assert path.stat().st_mode & 0o777 == rl.cache.modes()[1]
    doc = study.read_result(path)
    assert doc["format"] == study.FORMAT and doc["config_hash"] == rung.config_hash()
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["retrac_lib"] == rl.__version__
    assert doc["device"] == "cpu" and doc["seeds"]["training"] == [0, 1]
    # the CPU's model and instruction set: another CPU rounds differently
    assert rl.machine.cpu_name() in doc["device_name"]
    assert rl.machine.cpu_name().endswith(torch.backends.cpu.get_cpu_capability())
    assert set(doc["seconds"]) == set(PARTS) and all(v >= 0 for v in doc["seconds"].values())
    m = doc["measurements"]
    assert m == json.loads(json.dumps(result["measurements"]))
    assert set(m["lds"]["per_method"]) == set(study.METHODS)
    for v in m["lds"]["per_method"].values():
        assert len(v["per_query"]) == rung.n_queries
        assert v["mean"] == pytest.approx(sum(v["per_query"]) / rung.n_queries, abs=1e-6)
    d = m["lds"]["paired"]["retrac-tracin"]
    per_query = m["lds"]["per_method"]
    assert d["mean"] == pytest.approx(per_query["retrac"]["mean"] - per_query["tracin"]["mean"],
                                      abs=1e-6)
    assert d["low"] <= d["mean"] <= d["high"]
    # 5 methods + 1 random draw, 2 queries, 2 seeds: at most 24 distinct retrains
    assert m["removal"]["k"] == 2 and 0 < m["removal"]["n_retrains"] <= 24
    assert set(m["removal"]["per_method"]) == {*study.METHODS, "random"}
    assert m["quality"]["train_minority_share"] == pytest.approx(2 / 11)
    g = m["generated_queries"]
    assert g["top"] == 2 and 0 <= g["minority_like"] <= g["n_per_group"] == 1
    assert 0 <= g["ordinary_recognizable"] <= 1
    assert set(g["per_method"]) == set(study.METHODS)
    assert all(set(v) == {"near_minority", "ordinary"} for v in g["per_method"].values())


def test_recorded_values_are_recomputable(smoke_result):
    rung, result, _, run = smoke_result
    data, is_min, _ = study.rung_data(rung)
    assert len(data) == 11 and int(is_min.sum()) == 2
    assert torch.bincount(data.labels).tolist() == [2] + [1] * 9
    # the pixel self-influence AUC, by hand: distance to the nearest other training image
    d = torch.cdist(data.images.flatten(1).double(), data.images.flatten(1).double())
    d.fill_diagonal_(float("inf"))
    auc = cf.outlier_auc(d.min(1).values, is_min)
    assert result["measurements"]["self_influence"]["pixel"]["auc"] == auc
    # generation is seeded: the same images give the same nearest-label distance
    gen = rl.generate(run.model_at(-1), run.scheduler, rung.n_generated,
                      steps=rung.generation_steps, seed=rung.generation_seed)
    nearest = torch.cdist(gen.flatten(1).double(), data.images.flatten(1).double()).argmin(1)
    p = torch.bincount(data.labels[nearest], minlength=10).double() / len(gen)
    q = torch.bincount(data.labels, minlength=10).double() / len(data)
    tv = float(0.5 * (p - q).abs().sum())
    assert result["measurements"]["quality"]["nearest_label_tv"] == pytest.approx(tv)


def test_recognizable_images_and_kept_samples_are_recomputable(smoke_result):
    rung, result, _, run = smoke_result
    quality = result["measurements"]["quality"]
    data, is_min, _ = study.rung_data(rung)
    gen = rl.generate(run.model_at(-1), run.scheduler, rung.n_generated,
                      steps=rung.generation_steps, seed=rung.generation_seed)
    # by hand, one test digit at a time: its distance to the nearest training image
    test = rl.data.mnist("test")
    d_test = torch.stack([(data.images - x).flatten(1).double().norm(dim=1).min()
                          for x in test.images])
    radius = float(torch.quantile(d_test, 0.95))
    d_gen, nearest = torch.stack([(data.images - x).flatten(1).double().norm(dim=1)
                                  for x in gen]).min(1)
    recognizable = d_gen <= radius
    assert quality["recognition_radius"] == pytest.approx(radius, rel=1e-6)
    assert quality["recognizable_share"] == float(recognizable.double().mean())
    assert quality["recognizable_minority_share"] == float(
        (recognizable & is_min[nearest]).double().mean())
    kept = study.stored_samples(quality)
    n = min(study.SAMPLES_KEPT, len(gen))
    assert kept.images.shape == (n, 1, 32, 32)
    assert (kept.images - gen[:n].clamp(-1, 1)).abs().max() <= 0.5 / 127.5 + 1e-6
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRAC_CACHE", str(smoke_result[2].parents[1] / "cache"))
        net = features.load_or_train_classifier(features.classifier_config(True)).net
    with torch.no_grad():
        assert kept.classifier_label.tolist() == net(gen[:n]).argmax(1).tolist()
    assert kept.recognizable.tolist() == recognizable[:n].tolist()
    assert kept.minority_like.tolist() == (recognizable & is_min[nearest])[:n].tolist()


def test_generation_quality_counts_recognizable_and_minority_like_images(smoke_result):
    """On made-up images: a copy of a training zero, of a training digit and pure noise."""
    rung, _, path, _ = smoke_result
    data, is_min, _ = study.rung_data(rung)
    zero, digit = int(is_min.nonzero()[0]), int((~is_min).nonzero()[0])
    noise = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.cat([data.images[[zero, digit, zero]], noise])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRAC_CACHE", str(path.parents[1] / "cache"))
        classifier = features.load_or_train_classifier(features.classifier_config(True))
    radius = study.recognition_radius(data, rl.data.mnist("test"))
    quality = study.generation_quality(gen, data, is_min, classifier, radius)
    assert float(torch.cdist(noise.flatten(1), data.images.flatten(1)).min()) > radius
    assert quality["recognizable_share"] == 3 / 4            # the three copies
    assert quality["recognizable_minority_share"] == 2 / 4   # the two copies of a zero
    assert quality["nearest_minority_share"] == 2 / 4
    kept = study.stored_samples(quality)
    assert kept.recognizable.tolist() == [True, True, True, False]
    assert kept.minority_like.tolist() == [True, False, True, False]
    assert kept.nearest_distance[:3].tolist() == [0.0, 0.0, 0.0]


def test_generated_queries_count_minority_like_images_by_the_recognition_rule():
    """Made-up images with a radius of 1: a copy of a training zero (minority-like), the same
    zero brightened by 0.1 (nearest a zero, but 3.2 away: not recognizable), a copy of an
    inlier (ordinary) and noise. The old rule called every image nearest a zero minority-like."""
    data, is_min, _ = study.rung_data(study.get_rung("n250", smoke=True))
    zero, other_zero = is_min.nonzero().flatten()[:2].tolist()
    digit = int((~is_min).nonzero()[0])
    noise = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    copy, far_zero = data.images[[zero]], data.images[[zero]] + 0.1
    inlier = data.images[[digit]]
    gen = torch.cat([noise, far_zero, inlier, copy])
    queries, n_like, n_plain = study.generated_queries(gen, data, is_min, 1, radius=1.0)
    assert torch.equal(queries, torch.cat([copy, inlier])) and (n_like, n_plain) == (1, 1)
    queries, n_like, n_plain = study.generated_queries(gen, data, is_min, 2, radius=1.0)
    # near-minority: the copy, then the image nearest a zero; ordinary: the digit, then noise
    assert torch.equal(queries, torch.cat([copy, far_zero, inlier, noise]))
    assert (n_like, n_plain) == (1, 1)
    without_copy = torch.cat([noise, far_zero, inlier])
    queries, n_like, n_plain = study.generated_queries(without_copy, data, is_min, 1, 1.0)
    assert torch.equal(queries, torch.cat([far_zero, inlier])) and (n_like, n_plain) == (0, 1)
    with pytest.raises(ValueError, match="too few for 2 near-minority and 2 ordinary"):
        study.generated_queries(without_copy, data, is_min, 2, 1.0)
    # three zero-like images and no plain digit: the one left over goes after the noise
    near_copy = copy + 0.01                                   # 0.32 from the zero
    zeros = torch.cat([copy, data.images[[other_zero]], near_copy, noise])
    queries, n_like, n_plain = study.generated_queries(zeros, data, is_min, 2, 1.0)
    assert torch.equal(queries[2:], torch.cat([noise, near_copy])) and (n_like, n_plain) == (2, 0)


def test_stored_samples_refuses_a_result_without_them():
    with pytest.raises(ValueError, match="keeps no generated images.*rerun the rung"):
        study.stored_samples({"classifier_minority_share": 0.1})


@pytest.mark.parametrize("quantile, error", [(1.5, ValueError), (0, ValueError),
                                             ("0.95", TypeError)])
def test_recognition_radius_takes_a_quantile(quantile, error):
    data = rl.data.mnist("test")
    with pytest.raises(error, match="quantile"):
        study.recognition_radius(data, data, quantile)


def _edited(path, tmp_path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    out = tmp_path / path.name
    out.write_text(json.dumps(doc))
    return out


def test_read_result_refuses_other_provenance(smoke_result, tmp_path):
    _, _, path, _ = smoke_result
    bad = _edited(path, tmp_path, lambda d: d.update(config_hash="0" * 20))
    with pytest.raises(ValueError, match=r"n250-smoke\.json.*configuration hash"):
        study.read_result(bad)
    bad = _edited(path, tmp_path, lambda d: d.update(format=study.FORMAT + 1))
    with pytest.raises(ValueError, match=f"format {study.FORMAT + 1}.*reads format"):
        study.read_result(bad)
    bad = _edited(path, tmp_path, lambda d: d.update(format=1))
    with pytest.raises(ValueError, match="format 1, but this code reads format 3 .and 2 without"):
        study.read_result(bad)
    bad = _edited(path, tmp_path, lambda d: d["configuration"].update(k=3))
    with pytest.raises(ValueError, match=r"differs in: k\)"):
        study.read_result(bad)
    # the full rung of the same name is another configuration
    with pytest.raises(ValueError, match="differs in: .*n_inliers"):
        study.read_result(path, rung=study.get_rung("n250", smoke=False))


def test_a_format_2_result_is_read_without_its_generated_queries(smoke_result, tmp_path):
    """Format 2 counted noise nearest a zero as minority-like: that part is dropped, named in
    ``superseded`` and by ``describe_result``; every other part is read as it is."""
    _, _, path, _ = smoke_result
    assert study.read_result(path)["superseded"] == []
    doc = study.read_result(_edited(path, tmp_path, lambda d: d.update(format=2)))
    assert doc["superseded"] == ["generated_queries"]
    assert "generated_queries" not in doc["measurements"]
    assert doc["measurements"]["lds"] == json.loads(path.read_text())["measurements"]["lds"]
    text = study.describe_result(doc)
    assert "self-influence, LDS, removal; generated queries measured by an earlier rule" in text
    assert "complete" not in text
    checks = {c.what for c in study.reverify(doc, n_retrains=0, ledger=tmp_path / "none.json")}
    assert "decile ratio" in checks and "minority-like generated queries" not in checks


def test_feature_baseline_is_cosine_of_classifier_features(smoke_result, tiny_run, tmp_path,
                                                          monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path))
    _, _, _, run = smoke_result
    config = features.classifier_config(smoke=True)
    q = run.data.images[:3]
    res = baselines.attribute_baseline(run, q, "feature", classifier=config)
    net = features.load_or_train_classifier(config)
    a, b = net.features(q), net.features(run.data.images)
    expected = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    assert res.scores.shape == (3, len(run.data))
    assert torch.allclose(res.scores, expected, atol=1e-12)
    assert res.proponents(1).flatten().tolist() == [0, 1, 2]
    full = baselines.attribute_baseline(run, run.data.images, "feature", classifier=config)
    others = full.scores.clone().fill_diagonal_(-float("inf"))
    assert torch.equal(cf.self_influence(full.scores, "feature"), -others.max(1).values)
    with pytest.raises(ValueError, match="MNIST-shaped"):
        baselines.attribute_baseline(tiny_run, tiny_run.data.images[:1], "feature")


def _hand_rung():
    return dataclasses.replace(
        study.get_rung("n250", smoke=True), n_inliers=9, n_minority=2,
        config=rl.TrainConfig(block_out_channels=(8, 16, 32), epochs=2, checkpoint_every=1),
        n_subsets=4, subset_fraction=0.5, seeds=(0, 1), n_queries=2, k=2, random_draws=1,
        n_generated=8, generation_steps=4, n_generated_queries=1,
        loss_options=dict(timesteps=3, n_noise=2), attribution=dict(timesteps=2, n_noise=1),
        self_attribution=dict(checkpoints=[-1], timesteps=2, n_noise=1),
        dtrak=dict(checkpoints=[-1], timesteps=2, proj_dim=32))


def test_estimate_formula_on_a_hand_computed_probe():
    est = study.estimate_seconds(_hand_rung(), study.Probe(1e-3, 1e-2, 1e-4))
    # N = 11, E = 2, S = 2, Q = 2, L = 6, M = 4, n_h = 6, k = 2, 5 methods + 1 draw, C = 2
    assert est["train"] == pytest.approx(11 * 2 * 1e-3)   # one run, whatever S
    three_seeds = dataclasses.replace(_hand_rung(), seeds=(0, 1, 2))
    assert study.estimate_seconds(three_seeds, study.Probe(1e-3, 1e-2, 1e-4))["train"] \
        == pytest.approx(11 * 2 * 1e-3)
    assert est["generation"] == pytest.approx(8 * 4 * 1e-4)
    assert est["bias"] == pytest.approx(11 * 1e-2)
    # passes: held-out 2*2*(11 + 2*2) + 1*2*(11 + 2) = 86; generated the same; self-influence
    # 2*1*(11 + 11*2) + 1*2*(11 + 11) = 110
    assert est["attribution"] == pytest.approx(282 * 1e-2)
    assert est["lds"] == pytest.approx(4 * 2 * (6 * 2 * 1e-3 + 2 * 6 * 1e-4))
    removal = 6 * 2 * 2 * (9 * 2 * 1e-3 + 6 * 1e-4) + 2 * (11 * 2 * 1e-3 + 2 * 6 * 1e-4)
    assert est["removal"] == pytest.approx(removal)   # + the full set retrained per seed
    assert est["total"] == pytest.approx(3.5536)
    # retrains already stored in the ledger: 8 LDS and 26 removal retrains in all
    assert study.retrain_counts(_hand_rung()) == (8, 26)
    probe = study.Probe(1e-3, 1e-2, 1e-4)
    part = study.estimate_seconds(_hand_rung(), probe, stored=6)
    assert part["lds"] == pytest.approx(est["lds"] / 4) and part["removal"] == est["removal"]
    part = study.estimate_seconds(_hand_rung(), probe, stored=8 + 13)
    assert part["lds"] == 0 and part["removal"] == pytest.approx(removal / 2)
    assert study.estimate_seconds(_hand_rung(), probe, stored=40)["removal"] == 0
    # retrains in ensembles: their own cost per member sample-epoch, the rung's own run not
    ens = study.estimate_seconds(_hand_rung(), study.Probe(1e-3, 1e-2, 1e-4, retrain_s=1e-5,
                                                           ensemble_size=8))
    assert ens["train"] == est["train"] and ens["attribution"] == est["attribution"]
    assert ens["lds"] == pytest.approx(4 * 2 * (6 * 2 * 1e-5 + 2 * 6 * 1e-4))
    assert ens["removal"] == pytest.approx(6 * 2 * 2 * (9 * 2 * 1e-5 + 6 * 1e-4)
                                           + 2 * (11 * 2 * 1e-5 + 2 * 6 * 1e-4))
    # retrains in 4 processes: the retraining parts take a quarter of the time
    four = study.estimate_seconds(_hand_rung(), dataclasses.replace(probe, workers=4), stored=6)
    assert four["lds"] == pytest.approx(est["lds"] / 16)
    assert four["removal"] == pytest.approx(removal / 4) and four["train"] == est["train"]


def test_cache_bytes_on_a_hand_computed_probe():
    # the rung's own run: 11 digits * 2 epochs * (4 * 1024 + 16) bytes of log + 3 copies of
    # 100 weights, and two 11 x 11 float64 self-influence matrices; retrains keep no run
    expected = 11 * 2 * 4112 + 3 * 4 * 100 + 2 * 8 * 11 * 11
    assert expected == 93_600
    probe = study.Probe(1e-3, 1e-2, 1e-4, n_params=100)
    assert study.estimate_cache_bytes(_hand_rung(), probe) == expected


def test_measure_cost_gives_positive_unit_costs():
    probe = study.measure_cost(study.get_rung("n250", smoke=True), batches=1)
    assert probe.device == "cpu" and probe.n_params == 156_057   # the (8, 16, 32) UNet
    assert all(0 < v < 1 for v in (probe.train_s, probe.grad_s, probe.forward_s))
    assert probe.retrain_s is None and probe.retrain_cost == probe.train_s   # rl.train's
    with pytest.raises(ValueError, match="batches must be >= 1"):
        study.measure_cost(study.get_rung("n250", smoke=True), batches=0)
    ens = study.measure_cost(study.get_rung("n250", smoke=True), batches=1, repeats=1,
                             ensemble_size=2)
    assert ens.ensemble_size == 2 and 0 < ens.retrain_s < 1 and ens.retrain_cost == ens.retrain_s
    assert study.ensemble_size_for("cpu") == 1 and study.ENSEMBLE_SIZE["cuda"] == 32
    threads = torch.get_num_threads()
    par = study.measure_cost(study.get_rung("n250", smoke=True), batches=1, repeats=1, workers=2)
    assert par.workers == 2 and 0 < par.retrain_s < 1 and par.retrain_cost == par.retrain_s
    assert torch.get_num_threads() == threads   # timed with one thread, then restored
    with pytest.raises(ValueError, match="workers=2 probes single retrains"):
        study.measure_cost(study.get_rung("n250", smoke=True), ensemble_size=2, workers=2)
    with pytest.raises(ValueError, match="ensemble_size must be >= 1"):
        study.ensemble_size_for("cpu", 0)


def test_plan_takes_the_cheapest_rungs_that_fit():
    rungs = study.ladder(smoke=True)
    est = {"n250": 600.0, "n1000": 1200.0, "n3750": 3000.0, "n1000-long": 2000.0}
    names = lambda rs: [r.name for r in rs]
    chosen, skipped = study.plan(rungs, 30, est)                     # 1,800 s: 600 + 1,200
    assert names(chosen) == ["n250", "n1000"] and names(skipped) == ["n1000-long", "n3750"]
    chosen, skipped = study.plan(rungs, 100, est)                    # 6,000 s: + 2,000, not 3,000
    assert names(chosen) == ["n250", "n1000", "n1000-long"] and names(skipped) == ["n3750"]
    assert study.plan(rungs, 0, est) == ([], sorted(rungs, key=lambda r: est[r.name]))
    with pytest.raises(ValueError, match="budget_minutes must be >= 0"):
        study.plan(rungs, -1, est)
    with pytest.raises(ValueError, match="lack the rungs.*n3750"):
        study.plan(rungs, 10, {k: v for k, v in est.items() if k != "n3750"})


def test_ladder_follows_the_issue():
    full = {r.name: r for r in study.LADDER}
    assert list(full) == ["n250", "n1000", "n3750", "n1000-long"]
    assert [(r.n_inliers, r.n_minority) for r in full.values()] == [
        (240, 10), (960, 40), (3600, 150), (960, 40)]
    assert all(r.n_minority / r.n_train == 0.04 for r in full.values())
    assert all((r.n_subsets, len(r.seeds), r.n_queries) == (32, 3, 8) for r in full.values())
    assert full["n1000"].config == setups.mnist_setup(smoke=False).config
    assert full["n1000-long"].config.block_out_channels == (16, 32, 64)
    assert full["n1000-long"].config.epochs == 200
    data, is_min, queries = study.rung_data(full["n3750"])
    assert torch.bincount(data.labels).tolist() == [150] + [400] * 9
    assert not torch.isin(queries.labels, torch.tensor([0])).any() and len(queries) == 8
    assert len({r.config_hash() for r in study.ladder(smoke=True) + study.LADDER}) == 8


PROBE = study.Probe(1e-3, 1e-2, 1e-4, n_params=100)


def test_cli_estimate_only_prints_every_rung_and_runs_nothing(tmp_path, capsys, monkeypatch):
    # the probe is tested above
    monkeypatch.setattr(study, "measure_cost", lambda rung, device, ensemble_size, workers:
                        dataclasses.replace(PROBE, workers=workers))
    out = tmp_path / "out"
    assert cli.main(["study", "n250", "--estimate-only", "--budget-minutes", "0", "--out",
                     str(out)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for r in study.ladder():
        at = [i for i, line in enumerate(lines) if line.startswith(f"  {r.label}: N = ")]
        assert len(at) == 1
        est = study.format_seconds(study.estimate_seconds(r, PROBE)["total"])
        assert lines[at[0] + 1].startswith(f"    estimate {est} (train ")
        assert lines[at[0] + 1].endswith("[not selected]") == (r.name != "n250")
    assert "budget 0 min: would run nothing" in text
    assert "n250-smoke: not run (estimated 4 s, over the budget)" in text   # 3.58 s by hand
    assert not out.exists()


def test_cli_estimate_counts_the_retrains_its_ledger_holds(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "measure_cost", lambda rung, device, ensemble_size, workers:
                        dataclasses.replace(PROBE, workers=workers))
    rung, out = study.get_rung("n250"), tmp_path / "out"
    entries = {f"key{i}": {"losses": [1.0], "seconds": 1.0} for i in range(17)}
    entries["gpu"] = {"losses": [1.0], "seconds": 1.0, "trainer": "ensemble", "device": "cuda"}
    rl.cache.write_json_atomic(study.ledger_path(rung, out), {
        "format": cf.LossLedger.FORMAT, "owner": rung.ledger_owner(), "entries": entries})
    assert study.stored_retrains(study.ledger_path(rung, out), rung) == 17   # not the GPU's
    assert cli.main(["study", "n250", "--estimate-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    est = study.format_seconds(study.estimate_seconds(rung, PROBE, 17)["total"])
    assert f"    estimate {est} (train " in text and "; 17 of 34 retrains stored)" in text


def test_cli_estimate_says_when_the_ledger_holds_more_entries_than_retrains(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study, "measure_cost", lambda rung, device, ensemble_size, workers:
                        dataclasses.replace(PROBE, workers=workers))
    rung, out = study.get_rung("n250"), tmp_path / "out"
    entries = {f"key{i}": {"losses": [1.0], "seconds": 1.0} for i in range(40)}
    rl.cache.write_json_atomic(study.ledger_path(rung, out), {
        "format": cf.LossLedger.FORMAT, "owner": rung.ledger_owner(), "entries": entries})
    assert cli.main(["study", "n250", "--estimate-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "; 40 ledger entries for its 34 retrains, some of them made for removal sets " \
           "no longer asked for)" in text
    assert study.estimate_seconds(rung, PROBE, 40)["lds"] == 0


def test_cli_runs_a_rung_that_fits_and_writes_its_result(smoke_result, tmp_path, capsys,
                                                         monkeypatch):
    _, result, _, _ = smoke_result
    monkeypatch.setattr(study, "measure_cost", lambda rung, device, ensemble_size, workers:
                        dataclasses.replace(PROBE, workers=workers))
    ran, ledgers, ends = [], [], []
    monkeypatch.setattr(study, "run_rung", lambda rung, device, ledger, on_part, ensemble_size,
                        from_end, workers: (ran.append(rung.name), ledgers.append(ledger),
                                            ends.append((from_end, workers)),
                                            json.loads(json.dumps(result)))[-1])
    out = tmp_path / "out"
    assert cli.main(["study", "n250", "n1000", "--budget-minutes", "0.07", "--out",
                     str(out)]) == 0   # 4.2 s: n250 (3.55 s) fits, n1000 the same once more not
    text = capsys.readouterr().out
    assert ran == ["n250"] and "budget 0.07 min: runs n250" in text
    assert ledgers == [out / "ledger" / "n250-smoke.json"] and ends == [(False, 1)]
    assert cli.main(["study", "n250", "--budget-minutes", "1", "--out", str(out),
                     "--from-end", "--workers", "2"]) == 0
    assert ends == [(False, 1), (True, 2)]
    assert "n1000-smoke: not run (estimated 4 s, over the budget)" in text
    doc = study.read_result(out / "n250-smoke.json")
    assert doc["measurements"] == json.loads(json.dumps(result["measurements"]))
    one = study.estimate_seconds(study.get_rung("n250", smoke=True), PROBE)
    assert one["total"] == pytest.approx(3.5536)
    # the file of the second run, whose two retraining processes halve the LDS and removal
    halved = one["total"] - (one["lds"] + one["removal"]) / 2
    assert doc["estimate_seconds"]["total"] == round(halved, 1) < 3.5
    assert [p.name for p in out.iterdir()] == ["n250-smoke.json"]   # no temporary file left


@pytest.mark.parametrize("argv, message", [
    (["study", "n9999"], "unknown rung 'n9999'; the ladder has n250, n1000, n3750, n1000-long"),
    (["study", "--budget-minutes", "-5"], "--budget-minutes must be >= 0, got -5.0"),
    (["study", "--retrains-only"], "--retrains-only trains the retrains of the rungs named"),
    (["study", "n250", "--retrains-only", "--estimate-only"], "without --estimate-only"),
])
def test_cli_study_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(argv)
    assert err.value.code == 2 and message in capsys.readouterr().err


def test_unknown_rung_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown rung 'big'; the ladder has n250, n1000"):
        study.get_rung("big")


def test_rung_refuses_impossible_sizes():
    base = study.get_rung("n250", smoke=True)
    with pytest.raises(ValueError, match=r"Rung.k=11 must lie in \[1, 10\]"):
        dataclasses.replace(base, k=11)
    with pytest.raises(ValueError, match="Rung.n_minority must be >= 2"):
        dataclasses.replace(base, n_minority=1)
    with pytest.raises(ValueError, match="Rung.seeds must be distinct"):
        dataclasses.replace(base, seeds=(0, 0))


def test_a_rerun_reads_every_retrain_from_the_ledger(smoke_result, monkeypatch):
    rung, result, path, _ = smoke_result
    ledger = path.parent.parent / "ledger.json"   # the fixture's ledger, beside its out/
    n = len(json.loads(ledger.read_text())["entries"])
    assert result["measurements"]["retrains"]["entries"] == n > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a stored retrain was trained again")

    monkeypatch.setattr(cf, "train", no_training)
    again = study.run_rung(rung, progress=False, ledger=ledger)
    for part in ("lds", "removal"):
        assert again["measurements"][part] == result["measurements"][part]


def test_partial_results_are_written_before_the_retrains(smoke_result, tmp_path, monkeypatch):
    rung, result, path, _ = smoke_result
    ledger = path.parent.parent / "ledger.json"
    written = []

    def stop_before_removal(part):
        written.append(study.read_result(study.write_result(part, tmp_path)))
        if part["pending"] == ["removal"]:
            raise KeyboardInterrupt   # the session ends during the removal retrains

    with pytest.raises(KeyboardInterrupt):
        study.run_rung(rung, progress=False, ledger=ledger, on_part=stop_before_removal)
    assert [d["pending"] for d in written] == [["lds", "removal"], ["removal"]]
    first, second = (d["measurements"] for d in written)
    assert "lds" not in first and "removal" not in second
    assert second["lds"] == result["measurements"]["lds"]
    assert second["self_influence"] == result["measurements"]["self_influence"]
    assert result["pending"] == []


def test_reverify_measures_the_stored_numbers_again_and_catches_an_edit(smoke_result):
    rung, _, path, _ = smoke_result
    doc = study.read_result(path)
    ledger = path.parent.parent / "ledger.json"
    checks = study.reverify(doc, ledger=ledger, n_retrains=1)
    assert [c.what for c in checks][:3] == ["final training loss", "decile ratio",
                                           "nearest minority share"]
    retrains = [c for c in checks if c.what.startswith("retrain")]
    assert len(retrains) == rung.n_queries            # one subset, every query
    assert all(c.agrees for c in checks)
    assert all(c.measured == c.stored for c in retrains)   # same machine: to the last digit
    asked = {c.what: c for c in checks if "queries" in c.what}
    assert asked["minority-like generated queries"].measured == \
        doc["measurements"]["generated_queries"]["minority_like"]
    doc["measurements"]["bias"]["decile_ratio"] *= 1.05    # edited numbers
    doc["measurements"]["generated_queries"]["ordinary_recognizable"] += 2
    edited = {c.what: c.agrees for c in study.reverify(doc, ledger=ledger, n_retrains=0)}
    assert edited["decile ratio"] is False and edited["final training loss"] is True
    assert edited["plain digits among ordinary queries"] is False
    assert edited["minority-like generated queries"] is True


def test_reverification_tolerance_is_relative_or_absolute():
    assert study.Reverification("x", 2.0, 2.0019, 1e-3, True).agrees
    assert not study.Reverification("x", 2.0, 2.0021, 1e-3, True).agrees
    assert study.Reverification("x", 0.5, 0.55, 0.1, False).agrees
    assert not study.Reverification("x", 0.0, 0.2, 0.1, False).agrees


@pytest.mark.version_independent   # ledger files: the retrains are the fixture's code path
def test_retrains_only_trains_what_a_full_run_would_and_its_pinned_sets(
        smoke_result, tmp_path, capsys, monkeypatch):
    """A machine without the rung's run trains the same retrains into the ledger: the LDS,
    the random and full-set removals, and the method sets once a full run has pinned them."""
    rung, _, path, _ = smoke_result
    full = json.loads((path.parent.parent / "ledger.json").read_text())
    assert len(full["pins"]) == 1   # the full run pinned its removal sets
    ledger = tmp_path / "ledger" / "n250-smoke.json"
    assert cli.main(["study", "n250", "--retrains-only", "--out", str(tmp_path)]) == 0
    assert "removal sets not pinned yet" in capsys.readouterr().out
    first = cf.LossLedger(ledger, owner=rung.ledger_owner())
    n_lds, _ = study.retrain_counts(rung)
    n_random = rung.random_draws * rung.n_queries * len(rung.seeds) + len(rung.seeds)
    assert len(first) == n_lds + n_random and not first.pins
    doc = json.loads(ledger.read_text())
    doc["pins"] = full["pins"]              # as if a full run had pinned them meanwhile
    rl.cache.write_json_atomic(ledger, doc)
    line = study.train_retrains(rung, progress=False, ledger=ledger)
    assert f"removal sets pinned by the run on {rl.machine.device_name('cpu')}" in line
    again = cf.LossLedger(ledger, owner=rung.ledger_owner())
    losses = lambda entries: {k: e["losses"] for k, e in entries.items()}
    assert losses(again.entries) == losses(full["entries"])   # the same retrains and losses

    def no_training(*args, **kwargs):
        raise AssertionError("a stored retrain was trained again")

    monkeypatch.setattr(cf, "train", no_training)
    assert line in study.train_retrains(rung, progress=False, ledger=ledger)


def test_a_run_pins_its_removal_sets_before_its_first_retrain(smoke_result, tmp_path):
    rung, result, _, run = smoke_result

    class Stopped(Exception):
        pass

    def stop(part):
        raise Stopped(part["pending"])

    ledger = tmp_path / "ledger.json"
    with pytest.raises(Stopped, match="lds"):
        study.run_rung(rung, progress=False, ledger=ledger, on_part=stop)
    doc = json.loads(ledger.read_text())
    (pin,) = doc["pins"].values()
    assert doc["entries"] == {} and pin["made_by"]["fingerprint"] == run.fingerprint()
    assert sorted(pin["value"]) == sorted(study.METHODS)


def test_describe_result_names_what_is_pending_and_counts_the_ledger(smoke_result):
    _, result, path, _ = smoke_result
    doc = study.read_result(path)
    ledger = path.parent.parent / "ledger.json"
    n = len(json.loads(ledger.read_text())["entries"])
    text = study.describe_result(doc, ledger=ledger)
    assert text.startswith("n250-smoke: N = 11; measured quality") and "; complete;" in text
    assert f"; {n} retrains in its ledger" in text
    sets = doc["measurements"]["removal"]["sets"]
    assert sets["chosen_by"] == {"fingerprint": doc["measurements"]["train"]["fingerprint"],
                                 "device_name": doc["device_name"],
                                 "trained_on": rl.machine.cpu_name()}
    assert set(sets["own_overlap"].values()) == {1.0} and "earlier run" not in text
    sets["own_overlap"]["pixel"] = 0.8   # the same model, attributed otherwise since
    assert ("LDS, removal (of the sets an earlier run chose on " + doc["device_name"]
            + "; this run's own top proponents are 96 % of them); complete"
            ) in study.describe_result(doc)
    sets["chosen_by"] = {"fingerprint": "another", "device_name": "cuda (A GPU)",
                         "trained_on": "Other CPU"}
    sets["own_overlap"] = dict.fromkeys(sets["own_overlap"], 0.5)
    assert ("LDS, removal (of the sets an earlier run chose on cuda (A GPU), trained on Other "
            "CPU; this run's own top proponents are 50 % of them); complete"
            ) in study.describe_result(doc)
    doc["pending"] = ["removal"]
    del doc["measurements"]["removal"]
    assert "generated queries, LDS; pending: removal;" in study.describe_result(doc)


def test_rung_records_its_run_and_retrains_and_trains_them_in_ensembles(smoke_result,
                                                                        tmp_path):
    rung, result, path, run = smoke_result
    m = result["measurements"]
    assert m["train"]["run_key"] == rl.runs.run_key(run.config, run.data)
    assert m["train"]["fingerprint"] == run.fingerprint()
    assert (m["train"]["trainer"], m["train"]["device"]) == ("single", "cpu")
    n = m["retrains"]["entries"]
    assert {k: m["retrains"][k] for k in ("trainer", "device", "ensemble_size")} == {
        "trainer": "single", "device": "cpu", "ensemble_size": 1}
    ledger = tmp_path / "ledger.json"   # a copy: the fixture's ledger stays rl.train's alone
    ledger.write_bytes((path.parent.parent / "ledger.json").read_bytes())
    again = study.run_rung(rung, progress=False, ledger=ledger, ensemble_size=4)
    r = again["measurements"]["retrains"]
    assert (r["trainer"], r["device"], r["ensemble_size"]) == ("ensemble", "cpu", 4)
    assert r["entries"] == 2 * n   # the ensemble's entries beside, never instead of, rl.train's
    base, ens = (d["measurements"]["removal"] for d in (result, again))
    assert ens["base_loss"] == pytest.approx(base["base_loss"], rel=1e-5)
    for method, v in base["per_method"].items():
        assert ens["per_method"][method]["per_query_pct"] == pytest.approx(
            v["per_query_pct"], abs=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["--ensemble-size", "0"], "--ensemble-size must be >= 1, got 0"),
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "2", "--ensemble-size", "4"], "with --device cuda or --ensemble-size > 1"),
    (["--workers", "4096"], "--workers 4096 exceeds the"),
])
def test_cli_retraining_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["study", *argv, "--estimate-only"])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_committed_ledgers_stay_owned_by_their_rungs_when_the_draws_change(monkeypatch):
    """A ledger's owner hashes the rung without ``seeding.DRAWS_VERSION`` (retrains draw from
    plain seeds): the committed ledgers open, while a result's hash names the draws."""
    paths = sorted((study.RESULTS / "ledger").glob("*.json"))
    assert paths
    for path in paths:
        rung = study.get_rung(path.stem, smoke=False)
        ledger = cf.LossLedger(path, owner=rung.ledger_owner())
        assert len(ledger) > 0 or ledger.pins   # n1000-long: its removal sets pinned so far
        assert rung.ledger_owner() != rung.config_hash()
        assert rung.config_hash() == study.config_hash(rung.to_dict())
    configuration = study.get_rung("n250", smoke=False).to_dict()
    current, owner = study.config_hash(configuration), study.ledger_owner(configuration)
    monkeypatch.setattr(study.seeding, "DRAWS_VERSION", 1)
    assert study.config_hash(configuration) != current
    assert study.ledger_owner(configuration) == owner


def test_committed_results_are_where_the_study_reads_them():
    """``study.RESULTS`` is the package data folder the wheel ships (chapters 6 and 9 read it)."""
    assert study.read_result(study.RESULTS / "n250.json")["rung"] == "n250"


def test_ladder_figure_draws_every_stored_measure_with_its_interval():
    import matplotlib
    matplotlib.use("Agg")
    from retrac_lib.book.plots import study as splots

    doc = study.read_result(study.RESULTS / "n250.json")
    m = doc["measurements"]
    partial = {k: v for k, v in m.items() if k not in ("lds", "removal")}
    fig = splots.ladder_methods({"n250": m, "next": partial}, study.METHODS)
    removal = fig.axes[3]
    dots = [line.get_xdata()[0] for line in removal.get_lines() if line.get_marker() == "o"]
    assert dots == [m["removal"]["paired_pct"][f"{x}-random"]["mean"] for x in study.METHODS]
    bars = [tuple(line.get_xdata()) for line in removal.get_lines()
            if line.get_marker() != "o" and len(line.get_xdata()) == 2
            and line.get_linestyle() == "-"]
    assert bars == [(m["removal"]["paired_pct"][f"{x}-random"]["low"],
                     m["removal"]["paired_pct"][f"{x}-random"]["high"]) for x in study.METHODS]
    lds = [tuple(line.get_xdata()) for line in fig.axes[2].get_lines()
           if line.get_marker() != "o" and line.get_linestyle() == "-"]
    assert lds == [pytest.approx((v["mean"] - 1.96 * v["sem"], v["mean"] + 1.96 * v["sem"]))
                   for v in (m["lds"]["per_method"][x] for x in study.METHODS)]
    assert "(not yet measured:\nnext)" in removal.get_title()
    assert "not yet measured" not in fig.axes[1].get_title()
    matplotlib.pyplot.close(fig)


def test_generated_images_figure_captions_the_classifier_and_marks_minority_like_ones():
    import matplotlib
    matplotlib.use("Agg")
    from retrac_lib.book.plots import study as splots

    kept = study.StoredSamples(torch.zeros(3, 1, 32, 32), torch.tensor([0, 0, 7]),
                               torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64),
                               torch.tensor([True, True, False]), 3.0)
    fig = splots.generated_by_rung({"a": kept, "b": kept}, n=4)
    row = fig.axes[:4]
    assert [ax.get_title() for ax in row] == ["0", "(0)", "7", ""]
    assert [ax.title.get_color() for ax in row[:3]] == [splots.MINORITY_COLOR, "black",
                                                      "black"]
    assert row[0].get_ylabel() == "a" and fig.axes[4].get_ylabel() == "b"
    matplotlib.pyplot.close(fig)
