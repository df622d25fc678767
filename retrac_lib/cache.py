"""Atomic, verified storage for runs and results, keyed by a hash of their full configuration.

A folder is written under a temporary name and renamed into place only when complete; a manifest
records the SHA-256 of every file, so a partial, corrupted or foreign entry is refused, never
reused silently.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Part of every key: bump it whenever stored files or the numbers behind them (training loop,
# optimizer, model definitions, gradient or scoring code) change, so old entries are not reused.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """A cache entry exists but cannot be trusted for the requested configuration."""


def key_for(payload: dict) -> str:
    """A short stable hash of a JSON-serialisable description."""
    blob = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    """SHA-256 of exact tensor values, dtypes and shapes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temporary folder; on success move it to ``final`` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        write_manifest(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # another process finished the same entry first: keep its copy
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    files = sorted(p.name for p in Path(folder).iterdir() if p.name != MANIFEST)
    write_json(Path(folder) / MANIFEST, {f: _sha256(Path(folder) / f) for f in files})


def verify_folder(folder: Path) -> None:
    """Raise ``CacheError`` unless every file in the manifest is present and unchanged."""
    folder = Path(folder)
    hint = f"Delete {folder} to recompute it."
    try:
        manifest = read_json(folder / MANIFEST)
    except (OSError, ValueError) as err:
        raise CacheError(f"Cache entry {folder} has no readable manifest ({err}). {hint}") from err
    for name, digest in manifest.items():
        path = folder / name
        if not path.exists():
            raise CacheError(f"Cache entry {folder} is missing {name}. {hint}")
        if _sha256(path) != digest:
            raise CacheError(f"Cache file {path} is corrupted (checksum differs). {hint}")
