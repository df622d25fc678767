"""Attribution across processes and the command line equal one process, bit for bit.

``torchrun --standalone --nproc_per_node 2 -m retrac_lib attribute ...`` runs two gloo processes
on the CPU against a run recorded from a diffusers-style loop (``test_recorder``); the scores
must be exactly those of ``rl.attribute`` in this process.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from test_recorder import diffusers_style_loop

import retrac_lib as rl
from retrac_lib import cli
from retrac_lib.cli import load_queries
from retrac_lib.distributed import shard_ranges, train_shards

pytestmark = pytest.mark.version_independent   # not run again against the wheel (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(timesteps=3, n_noise=2, chunk_size=4)
CLI_OPTIONS = ["--timesteps", "3", "--n-noise", "2", "--chunk-size", "4"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    images = torch.rand((10, 1, 8, 8), generator=torch.Generator().manual_seed(5)) * 2 - 1
    run, _ = diffusers_style_loop(images, tmp / "run", channels=1, attention=False,
                                  scheduler_cls=DDPMScheduler, beta_schedule="linear",
                                  loss_name="mse")
    queries = torch.rand((3, 1, 8, 8), generator=torch.Generator().manual_seed(8)) * 2 - 1
    save_file({"queries": queries}, str(tmp / "queries.safetensors"))
    return run, queries, tmp


def _cli(args, launcher=(sys.executable, "-m", "retrac_lib")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # as from a fresh clone: `python -m` finds the package in cwd
    done = subprocess.run([*launcher, "attribute", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_cli_from_a_fresh_clone_equals_attribute(saved):
    run, queries, tmp = saved
    done = _cli([tmp / "run", tmp / "queries.safetensors", "--out", tmp / "one", *CLI_OPTIONS])
    assert "retrac scores (3, 10)" in done.stdout
    expected = rl.attribute(run, queries, "retrac", progress=False, **OPTIONS)
    got = rl.AttributionResult.load(tmp / "one")
    assert torch.equal(got.scores, expected.scores) and got.config == expected.config
    # in this process: the other method and options reach rl.attribute
    main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out", str(tmp / "tracin"),
          "--method", "tracin", "--checkpoints", "1", *CLI_OPTIONS])
    expected = rl.attribute(run, queries, "tracin", checkpoints=[1], progress=False, **OPTIONS)
    assert torch.equal(rl.AttributionResult.load(tmp / "tracin").scores, expected.scores)


def main(argv):
    return cli.main(["attribute", *argv])


@pytest.mark.parametrize("shard", ["train", "queries"])
def test_torchrun_with_two_processes_equals_one_process(saved, shard):
    """Training shards are bit-identical; query shards change the shapes of the final matrix
    products (fewer query rows), which may round differently: equal to float precision."""
    run, queries, tmp = saved
    out = tmp / f"two-{shard}"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "retrac_lib")
    _cli([tmp / "run", tmp / "queries.safetensors", "--out", out, "--shard", shard, *CLI_OPTIONS],
         launcher=torchrun)
    expected = rl.attribute(run, queries, "retrac", progress=False, **OPTIONS)
    got = rl.AttributionResult.load(out)
    assert torch.equal(got.train_grad_norms, expected.train_grad_norms)
    if shard == "train":
        assert torch.equal(got.scores, expected.scores)
    else:
        assert torch.allclose(got.scores, expected.scores, rtol=1e-6, atol=0)


def test_torchrun_splits_a_training_set_smaller_than_the_chunks(saved):
    """N = 10 with chunk_size 16: aligned slices would give rank 0 nothing, so ranks split the
    samples 5 / 5; chunks then differ from one process's, equal to float32 rounding."""
    run, queries, tmp = saved
    assert shard_ranges(10, 2, align=16) == [range(0, 0), range(0, 10)]
    assert train_shards(10, 2, 16) == [range(0, 5), range(5, 10)]
    assert train_shards(10, 2, 4) == shard_ranges(10, 2, align=4)
    with pytest.warns(UserWarning, match="3 training samples for 4 processes: 1 process"):
        assert [len(r) for r in train_shards(3, 4)] == [0, 1, 1, 1]
    out = tmp / "two-small"
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "retrac_lib")
    options = {**OPTIONS, "chunk_size": 16}
    _cli([tmp / "run", tmp / "queries.safetensors", "--out", out, *CLI_OPTIONS[:-1], "16"],
         launcher=torchrun)
    expected = rl.attribute(run, queries, "retrac", progress=False, **options)
    got = rl.AttributionResult.load(out)
    assert torch.equal(got.train_grad_norms, expected.train_grad_norms)
    assert torch.allclose(got.scores, expected.scores, rtol=1e-5, atol=0)


def test_train_slices_cover_the_training_set_in_order(saved):
    run, queries, _ = saved
    whole = rl.attribute(run, queries[:1], "tracin", progress=False, **OPTIONS)
    parts = [rl.attribute(run, queries[:1], "tracin", progress=False, train_slice=r, **OPTIONS)
             for r in shard_ranges(10, 3, align=4)]
    for r, part in zip(shard_ranges(10, 3, align=4), parts):
        outside = torch.ones(10, dtype=torch.bool)
        outside[r.start:r.stop] = False
        assert (part.scores[:, outside] == 0).all() and (part.train_grad_norms[:, outside] == 0).all()
    assert torch.equal(sum(p.scores for p in parts), whole.scores)
    with pytest.raises(ValueError, match=r"train_slice must be a range\(start, stop\)"):
        rl.attribute(run, queries[:1], progress=False, train_slice=range(0, 11), **OPTIONS)
    with pytest.raises(ValueError, match="load_or_attribute caches whole"):
        rl.load_or_attribute(run, queries[:1], train_slice=range(0, 4))


def test_shard_ranges():
    assert shard_ranges(10, 2, align=4) == [range(0, 4), range(4, 10)]
    assert shard_ranges(10, 3) == [range(0, 3), range(3, 6), range(6, 10)]
    assert shard_ranges(2, 4) == [range(0, 0), range(0, 1), range(1, 1), range(1, 2)]
    for n, world, align in [(0, 2, 1), (1797, 7, 64), (65, 2, 64), (5, 1, 8)]:
        ranges = shard_ranges(n, world, align)
        assert len(ranges) == world and [i for r in ranges for i in r] == list(range(n))
        assert all(r.start % align == 0 or r.start == n for r in ranges)


def test_query_files_are_validated(saved, tmp_path):
    run, queries, tmp = saved
    shape = run.data.sample_shape
    np.save(tmp_path / "q.npy", queries.numpy())
    torch.save(queries, tmp_path / "q.pt")
    for name in ("q.npy", "q.pt"):
        assert torch.equal(load_queries(tmp_path / name, shape), queries)
    assert torch.equal(load_queries(tmp / "queries.safetensors", shape), queries)
    bad = {
        "two.safetensors": ({"a": queries, "b": queries.clone()}, r"tensors \['a', 'b'\]; name the query"),
        "f64.npy": (queries.double().numpy(), "dtype torch.float64; save float32"),
        "shape.npy": (queries[:, :, :4].numpy(), r"shape \(3, 1, 4, 8\); this run takes \[Q, 1, 8, 8\]"),
        "nan.npy": (np.full((1, 1, 8, 8), np.nan, dtype=np.float32), "finite values"),
        "list.pt": ([queries], "holds a list"),
    }
    for name, (content, message) in bad.items():
        path = tmp_path / name
        if name.endswith(".safetensors"):
            save_file(content, str(path))
        elif name.endswith(".npy"):
            np.save(path, content)
        else:
            torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            load_queries(path, shape)
    with pytest.raises(ValueError, match="must end in"):
        load_queries(tmp_path / "q.png", shape)


def test_cli_refuses_an_existing_output_and_a_run_without_images(saved, tiny_run, tmp_path, capsys):
    run, _, tmp = saved
    with pytest.raises(SystemExit):
        main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out", str(tmp / "run")])
    assert "exists already" in capsys.readouterr().err
    folder = rl.save_run(tiny_run, tmp_path / "cached")
    with pytest.raises(ValueError, match="holds no training images"):
        rl.recorder.load(folder)
    copy = rl.recorder.load(rl.save_run(tiny_run, tmp_path / "with-data", with_data=True))
    assert copy.config == tiny_run.config and torch.equal(copy.log.noise, tiny_run.log.noise)


def test_cli_refuses_an_unusable_output_before_computing(saved, tmp_path, capsys, monkeypatch):
    _, _, tmp = saved

    def never(*args, **kwargs):
        raise AssertionError("attribution ran although --out could not be written")

    monkeypatch.setattr(rl.distributed, "attribute", never)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output's folder should be")  # unwritable, even by root
    existing = tmp_path / "old-scores"
    existing.mkdir()
    for out, message in [(existing, f"--out {existing} exists already; choose a new folder"),
                         (blocker / "scores", f"--out {blocker / 'scores'}: its folder {blocker} "
                                              "cannot be written to")]:
        with pytest.raises(SystemExit):
            main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out", str(out)])
        assert message in capsys.readouterr().err


def test_cli_refuses_queries_on_another_scale_unless_allowed(saved, tmp_path, capsys,
                                                             monkeypatch):
    run, queries, tmp = saved
    unit = tmp_path / "unit.safetensors"
    save_file({"queries": (queries + 1) / 2}, str(unit))
    with monkeypatch.context() as m:
        m.setattr(rl.distributed, "attribute", lambda *a, **kw: pytest.fail("computed"))
        with pytest.raises(SystemExit):
            main([str(tmp / "run"), str(unit), "--out", str(tmp_path / "scores")])
    err = capsys.readouterr().err
    assert "queries lie in" in err and "* 2 - 1" in err and "--allow-out-of-range" in err
    with pytest.warns(rl.validation.OutOfRangeWarning):
        main([str(tmp / "run"), str(unit), "--out", str(tmp_path / "scores"),
              "--allow-out-of-range", *CLI_OPTIONS])
    with pytest.warns(rl.validation.OutOfRangeWarning):
        expected = rl.attribute(run, (queries + 1) / 2, "retrac", progress=False,
                                allow_out_of_range=True, **OPTIONS)
    assert torch.equal(rl.AttributionResult.load(tmp_path / "scores").scores, expected.scores)


def test_query_shards_refuse_noise_drawn_per_query(tiny_run):
    # Per-query noise is drawn by a query's position in its batch: a shard would draw other noise.
    with pytest.raises(ValueError, match="shard='train'"):
        rl.distributed.attribute(tiny_run, tiny_run.data.images[:2], "tracin", shard="queries",
                                 noise_per_query=True, timesteps=2, n_noise=1, progress=False)


def test_cli_says_what_a_run_argument_is_when_it_is_not_a_run(saved, tmp_path, capsys):
    _, queries, tmp = saved
    plain = tmp_path / "holiday-photos"
    plain.mkdir()
    (plain / "a.txt").write_text("not a run")
    scores = rl.attribute(saved[0], queries, "tracin", progress=False, **OPTIONS).save(
        tmp_path / "scores")
    afile = tmp_path / "run.txt"
    afile.write_text("x")
    cases = [(tmp_path / "missing", "no such run folder"),
             (plain, "is not a run folder: it holds none of config.json"),
             (scores, "holds attribution scores (AttributionResult.save, or the command line's "
                      "--out), not a run"),
             (afile, "is a file, not a run folder")]
    for run_arg, message in cases:
        with pytest.raises(SystemExit):
            main([str(run_arg), str(tmp / "queries.safetensors"), "--out",
                  str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert f"RUN: {run_arg}" in err and message in err, err
        assert "Delete" not in err and "cache" not in err.lower()
    assert plain.exists() and (plain / "a.txt").exists()


@pytest.mark.parametrize("name, content, message", [
    ("empty.safetensors", b"", r"empty.safetensors cannot be read as a .safetensors file"),
    ("empty.npy", b"", r"empty.npy cannot be read as a .npy file"),
    ("garbage.pt", b"not a pickle", r"garbage.pt cannot be read as a .pt file"),
    ("none.safetensors", {}, r"none.safetensors holds no tensors"),
])
def test_unreadable_query_files_are_named(name, content, message, saved, tmp_path):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file(content, str(path))
    with pytest.raises(ValueError, match=message):
        load_queries(path, saved[0].data.sample_shape)


def test_cli_keeps_the_scores_when_out_is_taken_while_computing(saved, tmp_path, capsys,
                                                                 monkeypatch):
    run, queries, tmp = saved
    out = tmp_path / "scores"
    compute = rl.distributed.attribute

    def another_process_takes_out(*args, **kwargs):
        result = compute(*args, **kwargs)
        out.mkdir()                       # as a second job with the same --out would
        (out / "theirs.txt").write_text("another job's file")
        return result

    monkeypatch.setattr(rl.distributed, "attribute", another_process_takes_out)
    status = main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out", str(out),
                   *CLI_OPTIONS])
    rescued = tmp_path / f"scores.rescued-{os.getpid()}"
    assert status == 1 and f"the scores were saved to {rescued} instead" in capsys.readouterr().err
    expected = rl.attribute(run, queries, "retrac", progress=False, **OPTIONS)
    assert torch.equal(rl.AttributionResult.load(rescued).scores, expected.scores)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]


RANKS_DIFFER = """
import sys, torch, retrac_lib as rl
from safetensors.torch import load_file
rl.distributed.init()
rank = torch.distributed.get_rank()
run = rl.recorder.load(sys.argv[1])
queries = load_file(sys.argv[2])["queries"]
for case, q in [("values", queries * (0.5 if rank else 1.0)),
                ("count", queries[: 3 - rank])]:
    try:
        rl.distributed.attribute(run, q, "retrac", progress=False, timesteps=3, n_noise=2)
    except ValueError as err:
        sys.stdout.write(f"rank {rank} {case}: {err}\\n")   # one write: lines never merge
        sys.stdout.flush()
torch.distributed.destroy_process_group()
"""


def test_torchrun_ranks_with_different_queries_are_refused_before_computing(saved, tmp_path):
    _, _, tmp = saved
    script = tmp_path / "differ.py"
    script.write_text(RANKS_DIFFER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), str(tmp / "run"),
                           str(tmp / "queries.safetensors")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = sorted(line for line in done.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":")[0] for line in lines] == [
        "rank 0 count", "rank 0 values", "rank 1 count", "rank 1 values"], done.stdout
    for line in lines:
        assert "The 2 processes were given different inputs (queries: rank 0 3 queries" in line
        assert "nothing was computed" in line
    assert all("rank 1 2 queries" in line for line in lines if " count:" in line)


def test_cli_options_reach_attribute(saved, tmp_path):
    """Every rl.attribute option the command line sets gives the API's scores for the same
    options, bit for bit, and the result folder holds the query noise it used."""
    run, queries, tmp = saved
    grid = [5, 300, 900]
    noise = torch.randn((3, 2, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    save_file({"query_noise": noise}, str(tmp_path / "noise.safetensors"))
    calls = {
        "per-query": (["--method", "tracin", "--timesteps", "5,300,900", "--loss", "l1",
                       "--noise-per-query", "--noise-seed", "3", "--engine", "func",
                       "--checkpoints", "1", "--n-noise", "2", "--chunk-size", "4"],
                      dict(method="tracin", timesteps=grid, loss="l1", noise_per_query=True,
                           noise_seed=3, engine="func", checkpoints=[1], n_noise=2,
                           chunk_size=4)),
        "noise-file": (["--timesteps", "5,300,900", "--query-noise",
                        str(tmp_path / "noise.safetensors"), "--projection", "16",
                        "--projection-seed", "2", "--engine", "ghost",
                        "--normalization", "per_draw", "--train-side", "fresh_noise"],
                       dict(timesteps=grid, query_noise=noise, projection=16, projection_seed=2,
                            engine="ghost", normalization="per_draw", train_side="fresh_noise")),
    }
    for name, (argv, options) in calls.items():
        assert main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out",
                     str(tmp_path / name), *argv]) == 0
        got = rl.AttributionResult.load(tmp_path / name)
        expected = rl.attribute(run, queries, options.pop("method", "retrac"), progress=False,
                                **options)
        assert torch.equal(got.scores, expected.scores) and got.config == expected.config, name
    assert got.config.projection == 16 and got.config.normalization == "per_draw"
    assert torch.equal(got.query_noise, noise)
    per_query = rl.AttributionResult.load(tmp_path / "per-query")
    assert per_query.config.noise_per_query and per_query.config.loss == "l1"
    assert per_query.config.timesteps == tuple(grid) and per_query.query_noise is None


@pytest.mark.parametrize("argv, message", [
    (["--timesteps", "ten"], "argument --timesteps: 'ten' is neither a count"),
    (["--timesteps", "5,5"], "--timesteps: timesteps [5] appear more than once"),
    (["--timesteps", "3,1000"], "--timesteps: timesteps must be a non-empty list in [0, 1000)"),
    (["--timesteps", "0"], "--timesteps: timesteps must be >= 1"),
    (["--projection", "0"], "--projection: projection must be None, a positive int k"),
    (["--projection", "k"], "argument --projection: invalid int value"),
    (["--loss", "huber"], "argument --loss: invalid choice: 'huber'"),
    (["--engine", "jax"], "argument --engine: invalid choice: 'jax'"),
    (["--n-noise", "0"], "--n-noise: n_noise must be >= 1"),
    (["--noise-per-query", "--query-noise", "x.npy"],
     "argument --query-noise: not allowed with argument --noise-per-query"),
    (["--query-noise", "missing.npy"], "--query-noise: missing.npy: no such query_noise file"),
    (["--timesteps", "4", "--query-noise", "NOISE"],
     "--query-noise: query_noise has shape (3, 2, 1, 8, 8); expected [K, 1, 8, 8] or "
     "[4 timesteps, K, 1, 8, 8]"),
])
def test_bad_cli_options_are_named_before_computing(argv, message, saved, tmp_path, capsys,
                                                    monkeypatch):
    _, _, tmp = saved
    save_file({"query_noise": torch.zeros(3, 2, 1, 8, 8)}, str(tmp_path / "noise.safetensors"))
    argv = [str(tmp_path / "noise.safetensors") if a == "NOISE" else a for a in argv]
    monkeypatch.setattr(rl.distributed, "attribute", lambda *a, **kw: pytest.fail("computed"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out",
              str(tmp_path / "scores"), *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "scores").exists()


def test_dry_run_prints_the_cost_and_computes_nothing(saved, tmp_path, capsys, monkeypatch):
    run, queries, tmp = saved
    monkeypatch.setattr(rl.distributed, "attribute", lambda *a, **kw: pytest.fail("computed"))
    out = tmp_path / "scores"
    assert main([str(tmp / "run"), str(tmp / "queries.safetensors"), "--out", str(out),
                 "--dry-run", *CLI_OPTIONS]) == 0
    printed = capsys.readouterr().out
    # 2 checkpoints x 3 queries x 3 timesteps x 2 draws; 2 checkpoints x 10 training samples
    assert "query side: 36 gradient draws; measured" in printed
    assert "training side: 20 per-sample gradients; measured" in printed
    assert "estimated total:" in printed and "peak memory:" in printed and not out.exists()
    cost = rl.attribution.estimate(run, queries, "tracin", train_side="timestep_average",
                                   checkpoints=[0], **OPTIONS)
    assert (cost.query_draws, cost.training_gradients) == (1 * 3 * 3 * 2, 1 * 10 * 3)
    assert cost.measured_training_gradients == 4 * 3 and cost.seconds_per_query_draw > 0
    assert cost.seconds >= cost.query_seconds + cost.training_seconds > 0
    assert cost.peak_memory_bytes is None or cost.peak_memory_bytes > 2 ** 20
