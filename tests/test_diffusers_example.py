"""Issue 23's acceptance test: the loop of diffusers' ``train_unconditional.py``
(``train_unconditional.py`` here) with accelerate on 2 CPU processes, EMA, gradient
accumulation 2 and bf16 autocast, killed after optimizer step 5 and resumed from its
``checkpoint-4``, records the run an uninterrupted launch records, bit for bit, and its scores
(trained and EMA weights) equal the slow batch-1 reference of ``test_attribution``.

24 digits, 3 per process and micro-batch: an optimizer step holds 2 micro-batches x 2 processes
= 12 samples, an epoch 2 steps; 4 epochs, a recorder checkpoint after each.
"""
from pathlib import Path

import pytest
import torch
from crashing_loop import launch
from test_attribution import REL_TOL, ref_scores, rel_err

import retrac_lib as rl
from retrac_lib import cli, journal

pytest.importorskip("accelerate")
# One worker runs this file (--dist loadgroup, the README's command), so the three launches of
# the module fixture below run once, not once per worker (about half a minute each).
pytestmark = pytest.mark.xdist_group("accelerate_launches")
SCRIPT = Path(__file__).with_name("train_unconditional.py")
OPTIONS = ("--use_ema", "--mixed_precision", "bf16", "--gradient_accumulation_steps", "2")
GRID = [5, 500, 990]


def _launch(out, *args, expect=0):
    done = launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   SCRIPT, "--output_dir", out, *OPTIONS, *args])
    assert (done.returncode == 0) == (expect == 0), done.stderr[-4000:]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example")
    _launch(tmp / "whole")
    _launch(tmp / "resumed", "--crash_at_step", "5", expect=1)
    crashed = journal.read(tmp / "resumed" / "recorded-run")
    with pytest.raises(rl.recorder.IncompleteRunError, match="never closed"):
        rl.recorder.load(tmp / "resumed" / "recorded-run")
    _launch(tmp / "resumed", "--resume_from_checkpoint", "latest")
    return tmp, crashed


def test_the_killed_launch_left_a_recording_of_its_flushed_steps(launched):
    _, crashed = launched
    assert journal.flushed_steps(crashed) == 5             # flush_every=1: the step it died at
    assert [c["step"] for c in crashed["checkpoints"]] == [2, 4]


def test_the_resumed_run_equals_the_uninterrupted_run(launched):
    tmp, _ = launched
    whole = rl.recorder.load(tmp / "whole" / "recorded-run")
    resumed = rl.recorder.load(tmp / "resumed" / "recorded-run")
    assert resumed.log.n_steps == 8 and torch.equal(resumed.log.step_starts,
                                                    torch.arange(0, 97, 12))
    assert [c.meta() for c in resumed.checkpoints] == [c.meta() for c in whole.checkpoints]
    assert [c.visits for c in resumed.checkpoints] == [24] * 4
    for name, tensor in whole.log.to_tensors().items():
        assert torch.equal(getattr(resumed.log, name), tensor), name
    for a, b in zip(whole.checkpoints, resumed.checkpoints):
        for which in ("params", "ema"):
            assert all(torch.equal(getattr(a, which)[k], getattr(b, which)[k])
                       for k in a.params), which
    assert resumed.fingerprint() == whole.fingerprint()
    # every epoch trains each digit once (2 steps x 12 samples, no padding: 24 = 2 x 2 x 2 x 3)
    for epoch in range(4):
        a, b = int(resumed.log.step_starts[2 * epoch]), int(resumed.log.step_starts[2 * epoch + 2])
        assert sorted(resumed.log.indices[a:b].tolist()) == list(range(24))


@pytest.mark.parametrize("which", ["trained", "ema"])
def test_scores_equal_the_slow_reference(launched, which):
    tmp, _ = launched
    run = rl.recorder.load(tmp / "resumed" / "recorded-run").with_weights(which)
    queries = rl.data.digits("test").images[:2]
    noise = torch.randn((len(GRID), 2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    for method in ("tracin", "retrac"):
        res = rl.attribute(run, queries, method, timesteps=GRID, query_noise=noise,
                           progress=False)
        expected, _ = ref_scores(run, queries, [0, 1, 2, 3], GRID, noise, "mse", method)
        assert rel_err(res.scores, expected) <= REL_TOL


def test_the_command_line_attributes_the_ema_weights(launched, tmp_path, capsys):
    tmp, _ = launched
    folder = tmp / "resumed" / "recorded-run"
    run = rl.recorder.load(folder)
    queries = rl.data.digits("test").images[:2]
    torch.save(queries, tmp_path / "q.pt")
    opts = ["--timesteps", "3", "--n-noise", "2", "--method", "tracin"]
    for which in ("trained", "ema"):
        assert cli.main(["attribute", str(folder), str(tmp_path / "q.pt"), "--out",
                         str(tmp_path / which), "--weights", which, *opts]) == 0
        expected = rl.attribute(run.with_weights(which), queries, "tracin", timesteps=3,
                                n_noise=2, progress=False)
        assert torch.equal(rl.AttributionResult.load(tmp_path / which).scores, expected.scores)
    assert not torch.equal(rl.AttributionResult.load(tmp_path / "ema").scores,
                           rl.AttributionResult.load(tmp_path / "trained").scores)
