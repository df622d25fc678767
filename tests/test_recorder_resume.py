"""A recording streams to disk, survives a killed training process, refuses to load while
unfinished, and resumed from the loop's own saved state gives the uninterrupted run bit for bit.

``crashing_loop.py`` trains 3 epochs of 3 steps in a subprocess, saving its training state every
3 steps (and flushing the recorder then) and flushing every 2 steps; killed after step 5, its
recording holds 5 steps (the last flush) and its last saved state is that of step 3.
"""
import shutil
from pathlib import Path

import pytest
import torch
from crashing_loop import launch, parts
from test_attribution import REL_TOL, ref_scores, rel_err

import retrac_lib as rl
from retrac_lib import cli, journal

# Not run again against the wheel (conftest.py); one worker runs the file (--dist loadgroup),
# so the two training processes of the module fixture below run once, not once per worker.
pytestmark = [pytest.mark.version_independent, pytest.mark.xdist_group("crashing_loops")]

LOOP = Path(__file__).with_name("crashing_loop.py")
GRID = [5, 500, 990]


def _loop(folder, state, *args, expect=0):
    done = launch([LOOP, folder, state, *args])
    assert done.returncode == expect, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    _loop(tmp / "whole", tmp / "whole.pt")
    _loop(tmp / "crashed", tmp / "crashed.pt", "--crash-at", 5, expect=3)
    return tmp


def test_a_killed_recording_holds_its_flushed_steps_and_is_refused_as_a_run(runs, capsys):
    folder = runs / "crashed"
    written = journal.read(folder)
    assert journal.flushed_steps(written) == 5 and len(written["checkpoints"]) == 1
    assert not (folder / "manifest.json").exists()
    with pytest.raises(rl.recorder.IncompleteRunError,
                       match=f"{folder} is a recording that was never closed.*Recorder.resume"):
        rl.recorder.load(folder)
    with pytest.raises(SystemExit):      # the command line says the same and exits
        cli.main(["attribute", str(folder), str(runs / "q.npy"), "--out", str(runs / "s")])
    err = capsys.readouterr().err
    assert f"RUN: {folder} is a recording that was never closed" in err


def test_resume_refuses_lost_steps_other_weights_and_damaged_shards(runs, tmp_path):
    model, scheduler, _, _ = parts()
    folder = runs / "crashed"
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(ValueError, match=r"holds the first 5 optimizer steps, but training "
                                         r"resumes at step 6.*steps 5..5 were lost"):
        rl.Recorder.resume(folder, model, scheduler, step=6)
    with pytest.raises(ValueError, match="step must be >= 0.*optimizer step of the training"):
        rl.Recorder.resume(folder, model, scheduler, step=-1)
    with pytest.raises(ValueError, match="model does not hold the weights the recorder saved at "
                                         "step 3"):
        rl.Recorder.resume(folder, model, scheduler, step=3)   # initial, not step 3's weights
    with pytest.raises(ValueError, match="differs in: model_config"):
        rl.Recorder.resume(folder, type(model).from_config(
            {**model.config, "block_out_channels": (16, 16)}), scheduler, step=3)
    with pytest.raises(FileExistsError, match="exists already.*Recorder.resume"):
        rl.Recorder(model, scheduler, torch.zeros(10, 1, 8, 8), folder=folder)
    assert sorted(p.name for p in folder.iterdir()) == before   # refusals change nothing
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    shard = sorted(damaged.glob("steps-*"))[0]
    shard.write_bytes(shard.read_bytes()[:-4] + b"xxxx")
    with pytest.raises(rl.cache.CacheError, match=f"{damaged} is damaged: {shard.name}"):
        rl.Recorder.resume(damaged, model, scheduler, step=3)
    with pytest.raises(ValueError, match="is a complete run.*nothing to resume"):
        rl.Recorder.resume(runs / "whole", model, scheduler, step=3)


def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(runs):
    folder = runs / "crashed"
    (folder / "steps-00000007-00000009.safetensors").write_bytes(b"a killed flush's half file")
    _loop(folder, runs / "crashed.pt", "--resume")
    whole, resumed = rl.recorder.load(runs / "whole"), rl.recorder.load(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in (runs / "whole").iterdir())       # no shard, journal or stray file left
    assert resumed.log.n_steps == 9 and len(resumed.checkpoints) == 3
    for name, tensor in whole.log.to_tensors().items():
        assert torch.equal(getattr(resumed.log, name), tensor), name
    for a, b in zip(whole.checkpoints, resumed.checkpoints):
        assert a.meta() == b.meta()
        assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert resumed.fingerprint() == whole.fingerprint()
    queries = torch.rand((2, 1, 8, 8), generator=torch.Generator().manual_seed(9)) * 2 - 1
    noise = torch.randn((len(GRID), 2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    for method in ("tracin", "retrac"):
        scores = [rl.attribute(r, queries, method, timesteps=GRID, query_noise=noise,
                               progress=False).scores for r in (whole, resumed)]
        assert torch.equal(scores[0], scores[1])
        expected, _ = ref_scores(resumed, queries, [0, 1, 2], GRID, noise, "mse", method)
        assert rel_err(scores[1], expected) <= REL_TOL


SHARED = '''
import os, sys, torch, torch.distributed as dist
from diffusers import DDPMScheduler
from crashing_loop import images, parts
import retrac_lib as rl
dist.init_process_group("gloo")
rank, model = dist.get_rank(), parts()[0]
rec = rl.Recorder(model, DDPMScheduler(), images(), folder=sys.argv[1], shared=True)
def say(line):   # one write per line: the ranks share the pipe (PIPE_BUF keeps it whole)
    os.write(1, (line[:3000] + chr(10)).encode())
def attempt(what, *args, **kwargs):
    try:
        getattr(rec, what)(*args, **kwargs)
    except ValueError as err:
        say(f"rank {rank} {what}: {err}".replace(chr(10), " "))
t, eps = torch.full((2,), 7), torch.zeros(2, 1, 8, 8)
attempt("step", torch.tensor([0, 99 if rank else 1]), t, eps, 1e-3)      # rank 1's indices
attempt("step", torch.tensor([2 * rank, 2 * rank + 1]), t, eps, 1e-3)    # good: 4 samples
attempt("checkpoint", model)                                             # rank 0 refuses
say(f"rank {rank} steps {rec.n_steps}")
os._exit(0)   # gloo can deadlock in the interpreter's teardown (see train_unconditional.py)
'''


def test_shared_recorders_raise_every_process_s_error_on_all_processes(tmp_path):
    script = tmp_path / "shared.py"
    script.write_text(SHARED)
    done = launch(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   script, tmp_path / "run"])
    assert done.returncode == 0, done.stderr[-3000:]
    lines = sorted(done.stdout.splitlines())
    for rank in (0, 1):
        assert any(line.startswith(f"rank {rank} step: On process 1: indices must lie in "
                                   "[0, 10)") for line in lines), lines
        assert any(line.startswith(f"rank {rank} checkpoint: ") and "6 training samples" in line
                   and "have not been trained" in line for line in lines), lines
        assert f"rank {rank} steps 1" in lines
    run = journal.read(tmp_path / "run")
    assert run["shards"] == [] and journal.is_recording(tmp_path / "run")
