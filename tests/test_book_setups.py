"""The chapters' setups: where chapter 5 keeps its retrains and that they are its own."""
from __future__ import annotations

import dataclasses

import pytest

from retrac_lib.book import setups
from retrac_lib.evaluation import counterfactual as cf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RETRAC_CACHE", str(tmp_path))
    return tmp_path


def test_a_setup_ledger_lives_in_the_cache_and_trains_in_ensembles(cache):
    ledger = setups.counterfactual_setup(smoke=True).ledger("ch5-points")
    assert isinstance(ledger, cf.LossLedger)
    assert ledger.path.parent == cache / "ledgers"
    assert ledger.path.name.startswith("ch5-points-")
    assert (ledger.trainer, ledger.ensemble_size) == ("ensemble", setups.RETRAIN_ENSEMBLE)
    again = setups.counterfactual_setup(smoke=True).ledger("ch5-points")
    assert (again.path, again.owner) == (ledger.path, ledger.owner)


def test_setups_that_differ_keep_their_retrains_apart(cache):
    smoke = setups.counterfactual_setup(smoke=True)
    variants = [smoke, setups.counterfactual_setup(smoke=False),
                setups.digits_counterfactual_setup(smoke=True),
                dataclasses.replace(smoke, seeds=(0, 1, 2)),
                dataclasses.replace(smoke, loss_options=dict(timesteps=10, n_noise=8))]
    paths = {s.ledger("ch5").path for s in variants}
    assert len(paths) == len(variants)
    assert smoke.ledger("other").path != smoke.ledger("ch5").path


@pytest.mark.parametrize("name", ["../ch5", "ch5/points", "", "Ch5", 5])
def test_a_ledger_name_must_be_a_plain_file_name(cache, name):
    with pytest.raises(ValueError, match="name must be lower-case words joined by '-'"):
        setups.counterfactual_setup(smoke=True).ledger(name)
