"""Atomic, verified storage for runs and results, keyed by a hash of their full configuration.

A folder is written under a temporary name and renamed into place only when complete; a manifest
records the SHA-256 of every file, so a partial, corrupted or foreign entry is refused, never
reused silently. Temporary folders left by a killed save are removed by the next call, once their
writer is gone, and only those: a temporary folder carries a marker file naming its writer, and a
folder without one (a user's own ``.tmp-*``) or owned by another user is never touched. Files and
folders are never writable by others: owner-writable (the umask may restrict them further), or with
``RETRAC_CACHE_SHARED=1`` group-writable too, for a cache a course shares. A cache that cannot be
written to costs the caching, never the computed result (``CacheWarning``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Part of every key: bump it whenever stored files or the numbers behind them (training loop,
# optimizer, model definitions, gradient or scoring code) change, so old entries are not reused.
# A new stored field that old entries load without, the numbers unchanged, needs no bump
# (AttributionResult.query_noise: None on load, filled in from the key by load_or_attribute).
# Random draws have a version of their own, seeding.DRAWS_VERSION: only the keys of what its
# streams draw (attribution results, study rungs' result hashes) include it, so a change of
# those draws recomputes them and keeps every trained run and retrain-loss ledger entry.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
TMP_MARKER = ".retrac-tmp.json"  # inside every temporary folder this library writes
SHARED_ENV = "RETRAC_CACHE_SHARED"
ENTRY_NAME = re.compile(r"^[0-9a-f]{20}$")  # a cache entry: runs/<key> or attributions/<key>
CACHE_KINDS = ("runs", "attributions")
ORPHAN_AGE = 3600  # seconds after which another machine's unfinished temporary folder is an orphan


class CacheError(RuntimeError):
    """A cache entry exists but cannot be trusted for the requested configuration."""


class CacheWarning(UserWarning):
    """A result was computed but could not be cached (the cache folder is not writable)."""


def recomputable(folder: Path) -> bool:
    """True for an entry of the cache (``<root>/runs/<key>``, ``<root>/attributions/<key>``),
    which the library recomputes when it is deleted; False for any other folder."""
    folder = Path(folder)
    return folder.parent.name in CACHE_KINDS and bool(ENTRY_NAME.match(folder.name))


def _kind(folder: Path, of: str = "entry") -> str:
    """How messages name ``folder`` (or, ``of="file"``, a file in it)."""
    if recomputable(folder):
        return f"Cache {of}"
    return "File" if of == "file" else "Saved folder"


def hint(folder: Path) -> str:
    """What a user can do about a bad folder: delete a cache entry (it is recomputed), or, in a
    cache they cannot write to, ask its owner or use a cache of their own. Any other folder (a
    recorded run, saved scores) cannot be recomputed: restore or rewrite it."""
    folder = Path(folder)
    if not recomputable(folder):
        return (f"{folder} is not a cache entry the library can recompute: restore it from where "
                "it came from, or write it again (rl.Recorder(..., folder=...), rl.save_run, "
                "AttributionResult.save).")
    if os.access(folder.parent, os.W_OK):
        return f"Delete {folder} to recompute it."
    return (f"It lies in a cache folder you cannot write to ({folder.parent}): ask its owner to "
            f"delete {folder.name}, or set RETRAC_CACHE to a folder of your own to recompute there.")


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def modes() -> tuple[int, int]:
    """(folder mode, file mode) of everything this library writes: never writable by others;
    group-writable only with ``RETRAC_CACHE_SHARED=1``; the umask may restrict further."""
    shared = os.environ.get(SHARED_ENV, "0")
    if shared not in ("0", "1"):
        raise ValueError(f"{SHARED_ENV} must be 1 (a cache shared by a group) or 0, got "
                         f"{shared!r}.")
    folder, file = (0o775, 0o664) if shared == "1" else (0o755, 0o644)
    mask = _umask()
    return folder & ~mask, file & ~mask


def make_folders(folder: Path) -> None:
    """``mkdir -p folder``, giving every folder it creates the mode of ``modes``."""
    folder, missing = Path(folder), []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        os.chmod(path, modes()[0])


def _make_tmp(parent: Path, name: str) -> Path:
    """A new folder ``.tmp-<name>-<host>-<pid>-<random>``, only its owner's, holding the marker
    ``TMP_MARKER`` that tells ``clean_orphans`` it is this library's and which process writes it."""
    while True:
        tmp = parent / f"{TMP_PREFIX}{name}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o700)
        except FileExistsError:
            continue
        try:
            (tmp / TMP_MARKER).write_text(json.dumps(
                {"writer": "retrac_lib", "host": socket.gethostname(), "pid": os.getpid()}))
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp


def _writer_gone(path: Path, now: float) -> bool:
    """True when ``path`` is this library's temporary folder, owned by this user, and its writer
    has died (same machine) or it was last touched more than ``ORPHAN_AGE`` seconds ago (another
    machine). A folder without the marker, or another user's, is never an orphan."""
    try:
        if hasattr(os, "getuid") and path.stat().st_uid != os.getuid():
            return False
        marker = json.loads((path / TMP_MARKER).read_text())
        mtime = path.stat().st_mtime
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("writer") != "retrac_lib":
        return False
    pid = marker.get("pid")
    if marker.get("host") == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass  # alive, owned by another user
        else:
            return False
    return now - mtime > ORPHAN_AGE


def clean_orphans(parent: Path) -> list[Path]:
    """Remove the temporary folders that killed saves of this library left in ``parent``; return
    them. Only folders whose writer is gone are removed (``_writer_gone``); failures to remove
    (a read-only shared cache) are ignored.
    """
    removed, now = [], time.time()
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        try:
            if path.is_dir() and _writer_gone(path, now):
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            pass
    return removed


def writable(folder: Path) -> str | None:
    """None when entries can be created in ``folder`` (made if missing), else the reason why not.

    Tried for real (a folder is made and removed), since permission bits alone do not tell.
    """
    try:
        make_folders(folder)
        shutil.rmtree(_make_tmp(Path(folder), "probe"))
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    return None


def prepare(folder: Path) -> bool:
    """Before computing the entry ``folder``: True when it can be saved; otherwise warn at once
    (``CacheWarning``) that the result will be returned but not cached, and return False."""
    reason = writable(Path(folder).parent)
    if reason:
        warnings.warn(f"The cache folder {Path(folder).parent} cannot be written to ({reason}): "
                      "the result will be computed and returned but not cached. Set RETRAC_CACHE "
                      "to a writable folder to keep results.", CacheWarning, stacklevel=3)
    return reason is None


def try_save(save, folder: Path) -> bool:
    """Run ``save()``; when it fails with an ``OSError`` (disk full, permissions changed), warn
    that ``folder`` was not cached instead of losing the finished result. True when saved."""
    try:
        save()
        return True
    except OSError as err:
        warnings.warn(f"Could not cache the result in {folder} ({type(err).__name__}: {err}); it "
                      "is returned but will be recomputed next time.", CacheWarning, stacklevel=3)
        return False


def restrict(folder: Path) -> None:
    """Give ``folder`` and its files the modes of ``modes`` (safetensors writes 0600)."""
    folder_mode, file_mode = modes()
    for path in folder.iterdir():
        os.chmod(path, file_mode)
    os.chmod(folder, folder_mode)


@contextlib.contextmanager
def atomic_folder(final: Path, *, exist_ok: bool = True, manifest: bool = True):
    """Yield a temporary folder; on success move it to ``final`` in one rename.

    ``exist_ok=True`` (the cache) keeps an entry that a concurrent writer of the same payload
    finished first. ``exist_ok=False`` creates ``final`` exclusively: a path that exists (a
    folder, or a file) is refused with ``FileExistsError`` before anything is written, and so is
    the second of two writers racing for it, so no save ever reports success it did not have.
    Orphans of earlier killed saves in the same parent folder are removed first.
    ``manifest=False`` leaves the manifest out: a folder still being written (a recording).
    """
    final = Path(final)
    if not exist_ok:
        _refuse_existing(final)
    make_folders(final.parent)
    clean_orphans(final.parent)
    tmp = _make_tmp(final.parent, final.name)
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        restrict(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
            if not exist_ok:
                _refuse_existing(final)
            # another process finished the same entry first: keep its copy
        else:
            with contextlib.suppress(OSError):   # not in the manifest; only marks a tmp folder
                (final / TMP_MARKER).unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _refuse_existing(final: Path) -> None:
    if final.exists():
        kind = "a folder" if final.is_dir() else "a file"
        raise FileExistsError(f"{final} exists already ({kind}, which may hold other results) and "
                              "is never overwritten: nothing was saved. Save to a new path, or "
                              "delete it first.")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, sort_keys=True))


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file renamed into place, so a
    reader never sees half a file; the file gets the library's file mode (``modes``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.chmod(tmp, modes()[1])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path):
    """A JSON file of a cache entry; ``CacheError`` (with what to do) when it is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{_kind(Path(path).parent, 'file')} {path} cannot be read "
                         f"({type(err).__name__}: {err}). {hint(Path(path).parent)}") from err


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def replace_atomically(path: Path, write) -> None:
    """``write(tmp_path)``, then rename it to ``path`` in one step: a reader (or a crash) sees
    the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.chmod(tmp, modes()[1])
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def write_manifest(folder: Path, names=None) -> None:
    """The SHA-256 of ``names`` (default: every file in ``folder``), written atomically."""
    folder = Path(folder)
    if names is None:
        names = [p.name for p in folder.iterdir() if p.name not in (MANIFEST, TMP_MARKER)]
    manifest = {f: sha256(folder / f) for f in sorted(names)}
    replace_atomically(folder / MANIFEST, lambda tmp: write_json(tmp, manifest))


def verify_folder(folder: Path) -> None:
    """Raise ``CacheError`` unless every file in the manifest is present and unchanged."""
    folder = Path(folder)
    kind = _kind(folder)
    if not (folder / MANIFEST).is_file():
        raise CacheError(f"{kind} {folder} has no manifest (a partial or foreign folder). "
                         f"{hint(folder)}")
    manifest = read_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        raise CacheError(f"{kind} {folder} has a damaged manifest. {hint(folder)}")
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CacheError(f"{kind} {folder} is missing {name}. {hint(folder)}")
        if sha256(path) != digest:
            raise CacheError(f"{_kind(folder, 'file')} {path} is corrupted (checksum differs). "
                             f"{hint(folder)}")
