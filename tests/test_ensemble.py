"""ensemble.train_many against rl.train member by member, and the ledger's ensemble trainer.

Tolerances, measured on the 2-core CPU VM (torch 2.13 CPU, one thread) with the configs below:
per-step batch losses differ by at most 1.2e-7, final weights by 6.7e-6 (the weights moved by
about 1.5e-2), query losses by a relative 7e-8; the tests allow about 10x that. With one
channel per GroupNorm group (the study's first UNet level), the biases feeding such a group
get only rounding noise as gradient (the output is invariant to them) and Adam turns it into
lr-sized steps, so there only the outputs and query losses are compared.
"""
from __future__ import annotations

import diffusers
import pytest
import torch

import retrac_lib as rl
from retrac_lib import cache
from retrac_lib.evaluation import counterfactual as cf
from retrac_lib.ensemble import train_many

LOSS_OPTS = dict(timesteps=10, n_noise=4, loss="mse")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def members():
    """3 members of one recipe: 8x8 digits, UNet (8, 16) with 2 channels per GroupNorm group,
    2 epochs, different seeds and different 100-digit subsets."""
    data = rl.data.digits("train")
    cfg = rl.TrainConfig(block_out_channels=(8, 16), norm_num_groups=4, epochs=2,
                         batch_size=32, checkpoint_every=1)
    configs = [cfg.replace(seed=s) for s in (0, 1, 7)]
    sets = [data.subset(range(a, a + 100), name=f"digits[{a}:]") for a in (0, 50, 200)]
    return configs, sets, [rl.train(c, d, progress=False) for c, d in zip(configs, sets)]


def _queries():
    return rl.data.digits("test").images[:4]


def test_each_member_equals_its_own_training(members):
    configs, sets, runs = members
    ens = train_many(configs, sets)
    assert len(ens) == 3 and ens.losses.shape == (runs[0].log.n_steps, 3)
    for m, run in enumerate(runs):
        # the same batches, timesteps and noise: every step's loss agrees to float32 rounding
        assert (ens.losses[:, m] - run.losses).abs().max() < 1e-6
        final, weights = run.checkpoints[-1].params, ens.state_dict(m)
        assert weights.keys() == final.keys()
        for k in final:
            moved = (final[k] - run.initial_params[k]).abs().max()
            assert (weights[k] - final[k]).abs().max() < 5e-5, (k, float(moved))
        expected = cf.run_query_loss(run, _queries(), **LOSS_OPTS)
        got = cf.query_loss(ens.model(m), ens.scheduler, _queries(), **LOSS_OPTS)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


def test_one_channel_groups_agree_in_outputs_and_query_losses():
    data = rl.data.digits("train")
    cfg = rl.TrainConfig(block_out_channels=(8, 16), epochs=2, batch_size=32)   # 8 groups
    configs, sets = [cfg.replace(seed=3), cfg.replace(seed=4)], [data.subset(range(64)),
                                                                 data.subset(range(64, 128))]
    ens = train_many(configs, sets)
    x, t = rl.data.digits("test").images[:32], torch.arange(32) * 31
    for m, (c, d) in enumerate(zip(configs, sets)):
        run = rl.train(c, d, progress=False)
        with torch.no_grad():
            torch.testing.assert_close(ens.model(m)(x, t).sample, run.model_at(-1)(x, t).sample,
                                       rtol=0, atol=1e-4)
        torch.testing.assert_close(cf.query_loss(ens.model(m), ens.scheduler, _queries(),
                                                 **LOSS_OPTS),
                                   cf.run_query_loss(run, _queries(), **LOSS_OPTS),
                                   rtol=1e-6, atol=0)


def test_train_records_the_draws_of_its_original_loop(members):
    """The draws train (and so each member) makes, against train's loop as first written."""
    configs, sets, runs = members
    config, run = configs[2], runs[2]
    gen, n, idx, ts, noise = torch.Generator().manual_seed(config.seed), len(sets[2]), [], [], []
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(0, n, config.batch_size):
            idx.append(order[b:b + config.batch_size])
            ts.append(torch.randint(0, config.num_train_timesteps, (len(idx[-1]),),
                                    generator=gen))
            noise.append(torch.randn((len(idx[-1]), *sets[2].sample_shape), generator=gen))
    for mine, recorded in ((idx, run.log.indices), (ts, run.log.timesteps),
                           (noise, run.log.noise)):
        assert torch.equal(torch.cat(mine), recorded)


def test_one_adam_over_stacked_weights_is_separate_adams():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(3, 5, 4, generator=gen)
    grads = [torch.randn(3, 5, 4, generator=gen) for _ in range(4)]
    stacked = weights.clone().requires_grad_()
    alone = [weights[m].clone().requires_grad_() for m in range(3)]
    opt = torch.optim.Adam([stacked], lr=1e-2)
    opts = [torch.optim.Adam([w], lr=1e-2) for w in alone]
    for g in grads:   # the gradient of the members' summed losses is each member's own
        stacked.grad = g.clone()
        opt.step()
        for m, (w, o) in enumerate(zip(alone, opts)):
            w.grad = g[m].clone()
            o.step()
    assert all(torch.equal(stacked[m], alone[m]) for m in range(3))


def test_members_that_cannot_train_together_are_refused(members):
    configs, sets, _ = members
    with pytest.raises(ValueError, match=r"datasets\[1\] has 99 samples but datasets\[0\] has "
                                         r"100.*group the sets by size"):
        train_many(configs[:2], [sets[0], sets[1].subset(range(99))])
    other = configs[1].replace(block_out_channels=(8, 24), epochs=3)
    with pytest.raises(ValueError, match=r"configs\[1\] differs from configs\[0\] in "
                                         r"block_out_channels, epochs: .*separate ensembles"):
        train_many([configs[0], other], sets[:2])
    with pytest.raises(ValueError, match="datasets must be a list of 3 Dataset, one per config; "
                                         "got 2"):
        train_many(configs, sets[:2])
    with pytest.raises(ValueError, match="configs must be a non-empty list of TrainConfig"):
        train_many(configs[0], sets[:1])
    with pytest.raises(ValueError, match="device='cuda:9'"):
        train_many(configs[:1], sets[:1], device="cuda:9")


def test_ledger_keys_name_the_trainer_and_device(members):
    configs, sets, _ = members
    args = (configs[0], sets[0], _queries(), LOSS_OPTS)
    legacy = cache.key_for({"kind": "retrain-loss", "config": configs[0].to_dict(),
                            "data": sets[0].fingerprint(),
                            "queries": cache.tensor_fingerprint(_queries()),
                            "loss_options": LOSS_OPTS, "diffusers": diffusers.__version__})
    keys = {cf.LossLedger.key(*args, trainer, device) for trainer in cf.LossLedger.TRAINERS
            for device in ("cpu", "cuda")}
    assert len(keys) == 4 and cf.LossLedger.key(*args) == legacy   # older entries stay valid
    assert cf.LossLedger.key(*args, "single", "cpu") == legacy
    with pytest.raises(ValueError, match="trainer must be one of"):
        cf.LossLedger.key(*args, "batched")


def test_ledger_trains_in_ensembles_and_keeps_them_apart(members, tmp_path, monkeypatch):
    configs, sets, _ = members
    data = rl.data.digits("train").subset(range(60), name="digits-60")
    config, queries = configs[0].replace(epochs=1), _queries()[:2]
    masks = cf.random_subsets(len(data), 3, seed=2)
    path = tmp_path / "ledger.json"
    single = cf.subset_losses(config, data, masks, queries, seeds=(0, 1), loss_options=LOSS_OPTS,
                              progress=False, ledger=cf.LossLedger(path, owner="t"))
    calls = []
    monkeypatch.setattr(cf, "train_many", lambda c, d, device: calls.append(len(c)) or
                        train_many(c, d, device))
    ledger = cf.LossLedger(path, owner="t", ensemble_size=4)
    assert ledger.trainer == "ensemble" and len(ledger) == 6
    batched = cf.subset_losses(config, data, masks, queries, seeds=(0, 1),
                               loss_options=LOSS_OPTS, progress=False, ledger=ledger)
    assert calls == [4, 2] and len(ledger) == 12    # 6 retrains in ensembles of <= 4, apart
    torch.testing.assert_close(batched, single, rtol=1e-6, atol=0)
    entry = next(e for e in ledger.entries.values() if "trainer" in e)
    assert (entry["trainer"], entry["device"]) == ("ensemble", "cpu")
    assert entry["machine"] == rl.machine.device_name("cpu")

    def no_training(*args, **kwargs):
        raise AssertionError("a stored retrain was trained again")

    monkeypatch.setattr(cf, "train_many", no_training)
    again = cf.subset_losses(config, data, masks, queries, seeds=(0, 1), loss_options=LOSS_OPTS,
                             progress=False, ledger=cf.LossLedger(path, "t", ensemble_size=4))
    assert torch.equal(again, batched)


@cuda
def test_members_on_cuda_equal_cpu_training(members):
    configs, sets, runs = members
    tf32 = torch.backends.cudnn.allow_tf32
    ens = train_many(configs, sets, device="cuda")   # in full float32 whatever the TF32 flags
    assert all(v.is_cuda for v in ens.params.values())
    assert torch.backends.cudnn.allow_tf32 == tf32   # the flags are left as they were
    for m, run in enumerate(runs):
        assert (ens.losses[:, m] - run.losses).abs().max() < 1e-5
        final, weights = run.checkpoints[-1].params, ens.state_dict(m)
        assert max(float((weights[k] - final[k]).abs().max()) for k in final) < 1e-4
        with rl.ensemble.full_float32():
            got = cf.query_loss(ens.model(m), ens.scheduler, _queries(), **LOSS_OPTS)
        torch.testing.assert_close(got, cf.run_query_loss(run, _queries(), **LOSS_OPTS),
                                   rtol=1e-5, atol=0)


def test_a_diverged_member_is_named(members):
    configs, sets, _ = members
    images = sets[1].images.clone()
    images[3] = 3e38   # finite, but its loss overflows
    broken = rl.data.Dataset("huge-digit", images, sets[1].labels)
    with pytest.raises(rl.runs.TrainingDiverged, match=r"member 1 \(seed 1\)"):
        train_many(configs[:2], [sets[0], broken])
