"""No finished computation is lost and no damaged state is trusted: diverged runs, unwritable
or shared caches, damaged attribution entries, orphans of killed saves, and processes killed
(SIGKILL) at random points of a training or an attribution."""
import dataclasses
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

import retrac_lib as rl
from retrac_lib.cache import CacheError, CacheWarning
from retrac_lib.runs import TrainingDiverged

pytestmark = pytest.mark.version_independent   # not run again against the wheel (conftest.py)

ROOT = Path(__file__).resolve().parents[1]
ATTR = dict(timesteps=3, n_noise=2, progress=False)


@pytest.fixture(scope="module")
def queries():
    return rl.data.digits("test").images[:2]


def _tmp_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-")) if folder.exists() else []


def _same_run(a, b) -> bool:
    return all(torch.equal(ca.params[k], cb.params[k])
               for ca, cb in zip(a.checkpoints, b.checkpoints, strict=True) for k in ca.params)


# 4. A diverged run raises and is never cached.

def test_diverged_training_raises_and_is_not_cached(tiny_config, tiny_digits, tmp_path):
    config = tiny_config.replace(lr=1e6)
    with pytest.raises(TrainingDiverged, match=r"Training diverged: the batch loss is nan.*lr=1000000.0.*"
                                               r"Nothing was cached; lower TrainConfig.lr"):
        rl.load_or_train(config, tiny_digits, progress=False, root=tmp_path)
    assert not list((tmp_path / "runs").iterdir())
    with pytest.raises(TrainingDiverged):  # the next call does not load a diverged run either
        rl.load_or_train(config, tiny_digits, progress=False, root=tmp_path)


def test_non_finite_weights_at_a_checkpoint_raise(tiny_config, tiny_digits, monkeypatch):
    step = torch.optim.Adam.step

    def poisoned(self, *args, **kwargs):  # the last update of the run makes one weight infinite
        out = step(self, *args, **kwargs)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 9:
            self.param_groups[0]["params"][0].data[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(TrainingDiverged, match=r"weights \[.*\] are NaN or infinite"):
        rl.train(tiny_config, tiny_digits, progress=False)


# 6. An unwritable cache costs the caching, never the result, and says so before computing.

def test_unwritable_cache_warns_before_computing_and_returns_the_result(
        tiny_config, tiny_digits, tiny_run, queries, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    root = blocker / "cache"                      # cannot be created, even by root
    seen = []
    train = rl.training.train

    def spy_train(*args, **kwargs):
        seen.append([str(w.message) for w in caught])
        return train(*args, **kwargs)

    monkeypatch.setattr(rl.training, "train", spy_train)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = rl.load_or_train(tiny_config, tiny_digits, progress=False, root=root)
    assert len(seen) == 1 and any("cannot be written to" in m and "not cached" in m for m in seen[0])
    assert [w.category for w in caught].count(CacheWarning) == 1
    assert run.path is None and _same_run(run, tiny_run)

    with pytest.warns(CacheWarning, match="computed and returned but not cached"):
        res = rl.load_or_attribute(tiny_run, queries, "retrac", root=root, **ATTR)
    assert torch.equal(res.scores, rl.attribute(tiny_run, queries, "retrac", **ATTR).scores)
    cheap = dict(ATTR, timesteps=2, n_noise=1, checkpoints=[-1])   # all 40 digits: 4x cheaper
    with pytest.warns(CacheWarning, match="computed and returned but not cached"):
        own = rl.attribution.load_or_self_scores(tiny_run, "retrac", root=root, **cheap)
    assert torch.equal(own, rl.attribution.self_scores(tiny_run, "retrac", **cheap))


def test_a_failing_save_returns_the_result_with_a_warning(tiny_config, tiny_digits, tiny_run,
                                                          tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rl.training, "save_run", disk_full)
    with pytest.warns(CacheWarning, match="No space left on device.*will be recomputed next time"):
        run = rl.load_or_train(tiny_config, tiny_digits, progress=False, root=tmp_path)
    assert _same_run(run, tiny_run) and run.path is None


# 7. A damaged attribution entry gives the same clear CacheError as a damaged run.

@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_text("{not json"), r"config.json is corrupted"),
    (lambda f: (f / "config.json").unlink(), r"is missing config.json"),
    (lambda f: (f / "scores.safetensors").unlink(), r"is missing scores.safetensors"),
    (lambda f: (f / "manifest.json").unlink(), r"has no manifest"),
    (lambda f: (f / "manifest.json").write_text("[1"), r"manifest.json cannot be read"),
])
def test_damaged_attribution_cache_names_the_folder(damage, message, tiny_run, queries, tmp_path):
    rl.load_or_attribute(tiny_run, queries, "retrac", root=tmp_path, **ATTR)
    (folder,) = (tmp_path / "attributions").iterdir()
    damage(folder)
    with pytest.raises(CacheError, match=message) as err:
        rl.load_or_attribute(tiny_run, queries, "retrac", root=tmp_path, **ATTR)
    assert str(folder) in str(err.value) and f"Delete {folder} to recompute it." in str(err.value)


def test_errors_in_a_cache_the_user_cannot_write_say_what_they_can_do(tmp_path, monkeypatch):
    monkeypatch.setattr(rl.cache.os, "access", lambda path, mode: False)
    message = rl.cache.hint(tmp_path / "runs" / ("ab" * 10))
    assert "cannot write to" in message and "ask its owner" in message and "RETRAC_CACHE" in message
    assert "Delete" not in message


@pytest.mark.parametrize("folder", ["my-run", "runs/not-a-key", "attributions/" + "ab" * 11,
                                    "scores/" + "ab" * 10])
def test_delete_is_advised_only_for_entries_the_library_recomputes(folder, tmp_path):
    message = rl.cache.hint(tmp_path / folder)
    assert "not a cache entry the library can recompute" in message and "Delete" not in message
    (tmp_path / "runs").mkdir()
    assert rl.cache.hint(tmp_path / "runs" / ("ab" * 10)).startswith("Delete ")


def test_a_damaged_recorded_run_is_not_to_be_deleted(tiny_run, tmp_path):
    folder = rl.save_run(tiny_run, tmp_path / "my-run", with_data=True)
    (folder / "log.safetensors").write_bytes(b"changed")
    with pytest.raises(CacheError, match="is corrupted") as err:
        rl.recorder.load(folder)
    message = str(err.value)
    assert message.startswith(f"File {folder / 'log.safetensors'} is corrupted")
    assert "not a cache entry the library can recompute" in message and "Delete" not in message
    with pytest.raises(CacheError, match="Pass the config and data it was trained with"):
        rl.load_run(rl.save_run(tiny_run, tmp_path / "other"), tiny_run.config.replace(lr=1.0),
                    tiny_run.data)


# A result is saved to a new path or not at all: never reported saved over an old one.

def test_a_result_is_never_saved_over_an_existing_path(tiny_run, queries, tmp_path, monkeypatch):
    res = rl.attribute(tiny_run, queries, "retrac", **ATTR)
    old = dataclasses.replace(res, scores=torch.zeros_like(res.scores))
    folder = old.save(tmp_path / "scores")
    with pytest.raises(FileExistsError, match=re.escape(str(folder)) + r" exists already \(a folder"
                       r".*nothing was saved. Save to a new path, or delete it first"):
        res.save(folder)
    assert torch.equal(rl.AttributionResult.load(folder).scores, old.scores)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a result")
    with pytest.raises(FileExistsError, match=re.escape(f"{blocker} exists already (a file")):
        res.save(blocker)
    assert blocker.read_text() == "not a result"

    save_tensors = rl.cache.save_tensors

    def another_writer_finishes_first(path, tensors):
        monkeypatch.setattr(rl.cache, "save_tensors", save_tensors)
        old.save(tmp_path / "race")
        save_tensors(path, tensors)

    monkeypatch.setattr(rl.cache, "save_tensors", another_writer_finishes_first)
    with pytest.raises(FileExistsError, match="race exists already"):
        res.save(tmp_path / "race")             # the second writer fails, the first one's stays
    assert torch.equal(rl.AttributionResult.load(tmp_path / "race").scores, old.scores)
    assert _tmp_folders(tmp_path) == []


# 8. Orphans of killed saves are removed by the next call, but never a live writer's folder.

def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_tmp(parent: Path, name: str, marker: dict | None) -> Path:
    """A temporary folder as a killed save leaves it (``marker``: its TMP_MARKER, or none)."""
    (parent / name).mkdir()
    (parent / name / "weights.safetensors").write_bytes(b"partial")
    if marker is not None:
        (parent / name / rl.cache.TMP_MARKER).write_text(json.dumps(marker))
    return parent / name


def test_orphan_temporary_folders_are_cleaned_up(tiny_config, tiny_digits, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    host = socket.gethostname()
    ours = {"writer": "retrac_lib", "host": host}
    folders = {
        "dead": {**ours, "pid": _dead_pid()},           # its writer was killed
        "live": {**ours, "pid": os.getpid()},           # this process is still writing
        "old": {**ours, "host": "otherhost", "pid": 1},  # another machine, 2 hours old
        "fresh": {**ours, "host": "otherhost", "pid": 1},  # another machine, just now
        "users-own": None,                              # a user's .tmp-* folder, no marker
        "foreign": {"writer": "something-else", "host": host, "pid": _dead_pid()},
    }
    for name, marker in folders.items():
        _fake_tmp(runs, f".tmp-{name}", marker)
    two_hours_ago = time.time() - 7200
    for name in ("old", "users-own", "foreign"):
        os.utime(runs / f".tmp-{name}", (two_hours_ago, two_hours_ago))

    rl.load_or_train(tiny_config, tiny_digits, progress=False, root=tmp_path)
    assert _tmp_folders(runs) == [".tmp-foreign", ".tmp-fresh", ".tmp-live", ".tmp-users-own"]


def test_another_users_temporary_folder_is_never_removed(tmp_path, monkeypatch):
    _fake_tmp(tmp_path, ".tmp-theirs", {"writer": "retrac_lib", "host": socket.gethostname(),
                                        "pid": _dead_pid()})
    monkeypatch.setattr(rl.cache.os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    assert rl.cache.clean_orphans(tmp_path) == [] and _tmp_folders(tmp_path) == [".tmp-theirs"]
    monkeypatch.undo()
    assert rl.cache.clean_orphans(tmp_path) == [tmp_path / ".tmp-theirs"]


# 9. Cache files and folders are never writable by others: owner-writable, the umask restricting
# further; group-writable with RETRAC_CACHE_SHARED=1, for a course's shared cache.

@pytest.mark.parametrize("umask, shared, folder_mode, file_mode", [
    (0o022, None, 0o755, 0o644), (0o077, None, 0o700, 0o600), (0o000, None, 0o755, 0o644),
    (0o002, "1", 0o775, 0o664), (0o000, "1", 0o775, 0o664), (0o027, "1", 0o750, 0o640)])
def test_cache_entries_are_never_writable_by_others(umask, shared, folder_mode, file_mode,
                                                     tiny_run, queries, tmp_path, monkeypatch):
    if shared:
        monkeypatch.setenv(rl.cache.SHARED_ENV, shared)
    old = os.umask(umask)
    try:
        rl.save_run(tiny_run, tmp_path / "run")
        rl.load_or_attribute(tiny_run, queries, "tracin", root=tmp_path / "cache", **ATTR)
    finally:
        os.umask(old)
    (attr,) = (tmp_path / "cache" / "attributions").iterdir()
    for folder in (tmp_path / "run", attr, attr.parent, attr.parent.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == folder_mode, folder
    for folder in (tmp_path / "run", attr):
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {file_mode}, modes
        assert rl.cache.TMP_MARKER not in modes


def test_the_shared_cache_setting_is_checked(monkeypatch):
    monkeypatch.setenv(rl.cache.SHARED_ENV, "yes")
    with pytest.raises(ValueError, match="RETRAC_CACHE_SHARED must be 1 .* or 0, got 'yes'"):
        rl.cache.modes()


# Kills at random points (SIGKILL: no cleanup code runs), then the next call recovers.

CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    import retrac_lib as rl
    import retrac_lib.cache as cache

    mode, root, pause_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    writes = 0

    def pausing(write):
        def wrapper(*args, **kwargs):
            global writes
            writes += 1
            if writes == pause_at:  # stop inside the save, with some files written
                print("PAUSED", flush=True)
                time.sleep(600)
            return write(*args, **kwargs)
        return wrapper

    if pause_at:
        cache.save_tensors, cache.write_json = pausing(cache.save_tensors), pausing(cache.write_json)
    data = rl.data.digits("train").subset(range(40), name="tiny-digits")
    config = rl.TrainConfig(block_out_channels=(8, 16), epochs=3, batch_size=16, checkpoint_every=1)
    if mode == "train":
        rl.load_or_train(config, data, progress=False, root=root)
    else:
        run = rl.load_or_train(config, data, progress=False, root=root)
        queries = rl.data.digits("test").images[:2]
        rl.load_or_attribute(run, queries, "retrac", root=root, timesteps=3, n_noise=2, progress=False)
    print("DONE", flush=True)
""")


def _kill_child(mode: str, root: Path, pause_at: int, delay: float | None = None) -> str:
    """Run CHILD; kill it when it pauses inside a save (or after ``delay`` seconds); say how it ended."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(root), str(pause_at)],
                             stdout=subprocess.PIPE, text=True, env=env)
    if delay is None:
        assert child.stdout.readline().strip() == "PAUSED"
    else:
        time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return child.stdout.read()


def test_killed_training_and_attribution_recover(tiny_config, tiny_digits, tiny_run, queries, tmp_path):
    rng = random.Random(12)
    reference = rl.attribute(tiny_run, queries, "retrac", **ATTR).scores

    # Training killed inside its save, after a random number of its five files.
    _kill_child("train", tmp_path, pause_at=rng.randint(1, 5))
    runs = tmp_path / "runs"
    assert len(_tmp_folders(runs)) == 1 and not [p for p in runs.iterdir() if not p.name.startswith(".")]
    run = rl.load_or_train(tiny_config, tiny_digits, progress=False, root=tmp_path)
    assert _same_run(run, tiny_run) and run.path.parent == runs and _tmp_folders(runs) == []

    # Attribution killed inside its save (the run loads from the cache): the next call recomputes.
    _kill_child("attribute", tmp_path, pause_at=rng.randint(1, 3))
    attributions = tmp_path / "attributions"
    assert len(_tmp_folders(attributions)) == 1
    again = rl.load_or_attribute(run, queries, "retrac", root=tmp_path, **ATTR)
    assert torch.equal(again.scores, reference) and _tmp_folders(attributions) == []

    # Killed at a random moment of a whole fresh call: whatever was left, the next call is right.
    fresh = tmp_path / "fresh"
    out = _kill_child("attribute", fresh, pause_at=0, delay=rng.uniform(2.0, 6.0))
    run = rl.load_or_train(tiny_config, tiny_digits, progress=False, root=fresh)
    assert _same_run(run, tiny_run)
    result = rl.load_or_attribute(run, queries, "retrac", root=fresh, **ATTR)
    assert torch.equal(result.scores, reference), out
    for folder in (fresh / "runs", fresh / "attributions"):
        assert _tmp_folders(folder) == []
