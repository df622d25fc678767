"""A score matrix with everything that produced it, and the on-disk cache format of score
matrices and of self-influence scores."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import cache, ranking, seeding
from ..config import cache_dir
from ..runs import run_identity
from .options import AttributionConfig, config_from_dict


@dataclasses.dataclass
class AttributionResult:
    """Scores [Q, N] of every training sample for every query, with what produced them.

    ``train_grad_norms`` [C, N] holds ``|g_c(x_i)|`` for each used checkpoint, the quantity the
    timestep bias lives in. ``query_noise`` [T', K, *sample] holds the query noise the scores
    used, the same for every query and checkpoint (drawn from ``noise_seed`` or passed as
    ``query_noise``, which a [K, *sample] tensor is expanded from), so that
    ``attribute(run, queries, query_noise=result.query_noise, ...)`` reproduces the scores from
    the result's own folder. It is None for ``noise_per_query=True`` (fresh draws for each query
    and checkpoint, Q x C times as many: ``timesteps.per_query_noise_draws`` redraws them from
    ``noise_seed``), for baselines without a query grid and for results saved before it was
    stored.
    """

    scores: torch.Tensor
    # an AttributionConfig, or a baseline's own (options.DTrakConfig, baselines.BaselineConfig):
    # each has ``method`` and ``to_dict()``
    config: object
    checkpoint_weights: torch.Tensor
    train_grad_norms: torch.Tensor
    seconds: float = 0.0
    query_noise: torch.Tensor | None = None

    def top_k(self, k: int, largest: bool = True) -> torch.Tensor:
        """Indices [Q, k] of the ``k`` highest (or lowest) scoring training samples per query."""
        return ranking.top_k(self.scores, k, largest)

    def proponents(self, k: int) -> torch.Tensor:
        """The ``k`` training samples whose training step most reduced each query's loss."""
        return self.top_k(k, largest=True)

    def opponents(self, k: int) -> torch.Tensor:
        """The ``k`` training samples whose training step most increased each query's loss."""
        return self.top_k(k, largest=False)

    def recorded_timesteps(self, run) -> torch.Tensor:
        """[C, N] recorded timesteps of every training sample before each checkpoint used."""
        if not isinstance(self.config, AttributionConfig):
            raise ValueError(f"The {self.config.method!r} scores read no recorded timesteps "
                             "(only rl.attribute's do), so they have none to return.")
        return torch.stack([run.recorded(c)[0] for c in self.config.checkpoints])

    def save(self, folder: Path, key: dict | None = None, *, exist_ok: bool = False) -> Path:
        """Write the result atomically (safetensors + JSON) to the new folder ``folder``; ``key``
        describes what produced it.

        An existing ``folder`` (a result, any folder or a file) is never overwritten: it raises
        ``FileExistsError``, as does the second of two processes saving to the same path.
        ``exist_ok=True`` (the cache, where a concurrent writer of the same entry may finish
        first) keeps the existing folder instead.
        """
        if not hasattr(type(self.config), "from_dict"):
            raise TypeError(f"Only rl.attribute and D-TRAK results are saved; the "
                            f"{self.config.method!r} baseline is cheap to recompute "
                            "(rl.evaluation.baselines).")
        tensors = {"scores": self.scores, "checkpoint_weights": self.checkpoint_weights,
                   "train_grad_norms": self.train_grad_norms}
        if self.query_noise is not None:
            tensors["query_noise"] = self.query_noise.contiguous()
        with cache.atomic_folder(Path(folder), exist_ok=exist_ok) as tmp:
            cache.save_tensors(tmp / "scores.safetensors", tensors)
            cache.write_json(tmp / "config.json", {"config": self.config.to_dict(),
                                                   "seconds": self.seconds, "key": key})
        return Path(folder)

    @classmethod
    def load(cls, folder: Path) -> "AttributionResult":
        """Read a result written by ``save`` (``rl.attribute``'s or D-TRAK's), refusing a
        corrupted or partial folder; one saved before results held their query noise loads with
        ``query_noise=None``."""
        cache.verify_folder(folder)
        tensors = cache.load_tensors(Path(folder) / "scores.safetensors")
        meta = cache.read_json(Path(folder) / "config.json")
        return cls(config=config_from_dict(meta["config"]), seconds=meta["seconds"], **tensors)


def cache_key(run, queries: torch.Tensor, noise: torch.Tensor, config: AttributionConfig) -> dict:
    """What a cached score matrix depends on: the run's configuration and data, the query and
    query-noise values, the resolved config and ``seeding.DRAWS_VERSION`` (the streams that
    draw training-side and per-query noise and CountSketch hashes).

    The run enters through ``run_identity`` (recorded runs also by the digest of their weights
    and log).
    """
    return {"kind": "attribution", **run_identity(run),
            "queries": cache.tensor_fingerprint(queries),
            "noise": cache.tensor_fingerprint(noise), "config": config.to_dict(),
            "draws": seeding.DRAWS_VERSION}


def cached(payload: dict, root: Path | None = None, load=None) -> tuple[Path, object]:
    """The cache folder for ``payload`` and what is saved there, read by ``load`` (default
    ``AttributionResult.load``; None when there is nothing); a folder written for another
    payload raises ``cache.CacheError``."""
    folder = Path(root or cache_dir()) / "attributions" / cache.key_for(payload)
    cache.clean_orphans(folder.parent)
    if not folder.exists():
        return folder, None
    cache.verify_folder(folder)
    if cache.read_json(folder / "config.json").get("key") != payload:
        raise cache.CacheError(f"The cached scores in {folder} were computed for another "
                               f"run, queries or options. {cache.hint(folder)}")
    return folder, (load or AttributionResult.load)(folder)


def load_or_compute(payload: dict, root: Path | None, load, compute, save):
    """What the cache holds for ``payload`` (``cached`` with ``load``), or else ``compute()``,
    saved with ``save(result, folder)`` when the cache can be written (``cache.try_save``:
    a failed save warns and the result is still returned)."""
    folder, found = cached(payload, root, load)
    if found is not None:
        return found
    can_save = cache.prepare(folder)
    result = compute()
    if can_save:
        cache.try_save(lambda: save(result, folder), folder)
    return result


def save_self_scores(values: torch.Tensor, folder: Path, key: dict) -> None:
    """Write self-influence scores [N] (``scoring.load_or_self_scores``) and their cache
    ``key`` atomically to ``folder``, keeping a folder a concurrent writer finished first."""
    with cache.atomic_folder(Path(folder), exist_ok=True) as tmp:
        cache.save_tensors(tmp / "scores.safetensors", {"self_scores": values})
        cache.write_json(tmp / "config.json", {"key": key})


def load_self_scores(folder: Path) -> torch.Tensor:
    """The self-influence scores [N] that ``save_self_scores`` wrote to ``folder`` (which
    ``cached`` has verified against its manifest)."""
    return cache.load_tensors(Path(folder) / "scores.safetensors")["self_scores"]
