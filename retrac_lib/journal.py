"""A recording on disk while training runs: what ``rl.Recorder(..., folder=...)`` has flushed
(``notebooks/08_your_own_model.ipynb``, "A run that survives a crash").

A recording folder holds::

    recording.json                 the journal: every file below with its steps and SHA-256
    config.json, data.safetensors  the model, scheduler and loss; the training images
    init.safetensors               the initial weights
    steps-<a>-<b>.safetensors      optimizer steps a..b-1: indices, timesteps, noise, sizes,
                                   losses, lrs
    checkpoint-<c>.safetensors     checkpoint c's weights (and its EMA weights, ``ema.*``)

Each file is written under a temporary name and renamed, and the journal is replaced after the
files it lists, so it lists only complete files: a crash loses at most the steps since the last
flush, and a file a killed flush left behind is not listed (``truncate`` removes it). ``finish``
writes the run's own files (``runs.RECORD_FILES``), then its manifest, from which moment
the folder is a complete run, then removes the journal and the shards.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import cache
from .runs import RECORD_FILES, Checkpoint, write_run_header, write_run_records

JOURNAL = "recording.json"
INIT_FILE = "init.safetensors"
STEP_FIELDS = ("indices", "timesteps", "noise", "sizes", "losses", "lrs")


class IncompleteRunError(cache.CacheError):
    """A recording that was never closed (its training stopped, or still runs) is not a run."""


def is_recording(folder: Path) -> bool:
    """True for a recording that was never finished (a journal and no manifest)."""
    folder = Path(folder)
    return (folder / JOURNAL).exists() and not (folder / cache.MANIFEST).exists()


def create(folder: Path, config, data, initial: dict) -> dict:
    """Start the recording ``folder`` (which must not exist); return its journal."""
    with cache.atomic_folder(folder, exist_ok=False, manifest=False) as tmp:
        header = write_run_header(config, data, tmp, with_data=True)
        cache.save_tensors(tmp / INIT_FILE, initial)
        journal = {"format": 1, "files": {n: cache.sha256(tmp / n) for n in header + [INIT_FILE]},
                   "shards": [], "checkpoints": []}
        _write_journal(tmp, journal)
    return journal


def add_steps(folder: Path, journal: dict, first: int, steps: dict) -> None:
    """Write steps ``first``.. (``STEP_FIELDS``) as one shard and list it in the journal."""
    stop = first + len(steps["sizes"])
    name = f"steps-{first:08d}-{stop:08d}.safetensors"
    _write(folder / name, steps)
    journal["shards"].append({"file": name, "first": first, "stop": stop,
                              "sha256": cache.sha256(folder / name)})
    _write_journal(folder, journal)


def add_checkpoint(folder: Path, journal: dict, ckpt: Checkpoint) -> None:
    """Write checkpoint ``ckpt``'s weights (and EMA weights) and list it in the journal."""
    name = f"checkpoint-{ckpt.index:04d}.safetensors"
    tensors = {f"params.{k}": v for k, v in ckpt.params.items()}
    tensors.update({f"ema.{k}": v for k, v in (ckpt.ema or {}).items()})
    _write(folder / name, tensors)
    journal["checkpoints"].append({**ckpt.meta(), "file": name,
                                   "sha256": cache.sha256(folder / name)})
    _write_journal(folder, journal)


def read(folder: Path) -> dict:
    """The journal of the recording ``folder``, every file it lists verified."""
    folder = Path(folder)
    journal = cache.read_json(folder / JOURNAL)
    listed = dict(journal["files"])
    listed.update({e["file"]: e["sha256"] for e in journal["shards"] + journal["checkpoints"]})
    for name, digest in listed.items():
        if not (folder / name).is_file() or cache.sha256(folder / name) != digest:
            raise cache.CacheError(f"The recording {folder} is damaged: {name} is missing or "
                                   f"differs from its journal. {cache.hint(folder)}")
    return journal


def flushed_steps(journal: dict) -> int:
    return journal["shards"][-1]["stop"] if journal["shards"] else 0


def load_steps(folder: Path, journal: dict) -> dict[str, torch.Tensor]:
    """The flushed steps' ``STEP_FIELDS``, concatenated in step order."""
    shards = [cache.load_tensors(Path(folder) / e["file"]) for e in journal["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in STEP_FIELDS} if shards else {}


def load_checkpoint(folder: Path, entry: dict) -> Checkpoint:
    tensors = cache.load_tensors(Path(folder) / entry["file"])
    part = {p: {k[len(p) + 1:]: v for k, v in tensors.items() if k.startswith(p + ".")}
            for p in ("params", "ema")}
    return Checkpoint(**{k: entry[k] for k in Checkpoint.META}, params=part["params"],
                      ema=part["ema"] or None)


def load_initial(folder: Path) -> dict[str, torch.Tensor]:
    return cache.load_tensors(Path(folder) / INIT_FILE)


def truncate(folder: Path, journal: dict, step: int) -> dict:
    """Keep the first ``step`` steps and the checkpoints up to it; remove every other file."""
    folder = Path(folder)
    kept = [e for e in journal["shards"] if e["stop"] <= step]
    cut = [e for e in journal["shards"] if e["first"] < step < e["stop"]]
    journal = {**journal, "shards": kept,
               "checkpoints": [e for e in journal["checkpoints"] if e["step"] <= step]}
    if cut:
        (entry,) = cut
        steps = cache.load_tensors(folder / entry["file"])
        n = step - entry["first"]
        visits = int(steps["sizes"][:n].sum())
        add_steps(folder, journal, entry["first"], {
            k: v[:visits] if k in ("indices", "timesteps", "noise") else v[:n]
            for k, v in steps.items()})
    _write_journal(folder, journal)
    _remove_unlisted(folder, journal)
    return journal


def finish(folder: Path, run) -> None:
    """Turn the recording ``folder`` into the complete run ``run`` (see the module docstring)."""
    folder = Path(folder)
    header = list(cache.read_json(folder / JOURNAL)["files"])
    write_run_records(run, folder)
    cache.write_manifest(folder, [n for n in header if n != INIT_FILE] + list(RECORD_FILES))
    (folder / JOURNAL).unlink()
    for path in folder.iterdir():
        if path.name == INIT_FILE or path.name.startswith(("steps-", "checkpoint-")):
            path.unlink()
    cache.restrict(folder)


def _remove_unlisted(folder: Path, journal: dict) -> None:
    listed = {e["file"] for e in journal["shards"] + journal["checkpoints"]}
    for path in folder.iterdir():
        if path.name.startswith(("steps-", "checkpoint-", cache.TMP_PREFIX)) and \
                path.name not in listed:
            with contextlib.suppress(OSError):
                path.unlink()


def _write(path: Path, tensors: dict) -> None:
    cache.replace_atomically(path, lambda tmp: cache.save_tensors(tmp, tensors))


def _write_journal(folder: Path, journal: dict) -> None:
    cache.replace_atomically(Path(folder) / JOURNAL, lambda tmp: cache.write_json(tmp, journal))
