"""Counterfactual truth for attribution scores: what retraining actually does (chapter 5).

An attribution claims that some training samples lowered a query's loss. At toy scale the claim
can be tested by retraining, with the same configuration, on a changed training set, each
training set with several training seeds whose query losses are averaged (``seed_mean_loss``):

* **Removal test** (``removal_test``): for each query, drop a method's top-``k`` proponents,
  retrain, and measure how much the query's loss rose, against dropping ``k`` random samples.
* **Linear datamodeling score** (``random_subsets``, ``subset_losses``, ``lds``): retrain on
  ``M`` random subsets of half the data; for each query, the Spearman correlation between the
  subset's summed scores and the retrained model's *negative* query loss. A proponent lowers the
  loss when it is present, so a perfect additive attribution scores +1, a random one about 0.
* **Paired comparisons** (``paired_difference``): two methods measured on the same queries are
  compared by their per-query differences, with a seeded bootstrap confidence interval.

Every retrain goes through ``rl.load_or_train`` (``retrain_on``), so it is cached by its exact
configuration and kept samples: rerunning a chapter, or two methods asking for the same
training set, costs nothing. The query loss (``query_loss``) is the DDPM loss averaged over a
fixed timestep grid and fixed seeded noise, the same draws for every retrained model, so loss
differences come from the weights alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable

try:
    import fcntl
except ImportError:   # not POSIX: the ledger's lock is a no-op there
    fcntl = None

import diffusers
import torch
from tqdm.auto import tqdm

from .. import cache, dtrak, machine, seeding, validation
from ..attribution import METHODS, load_or_self_scores, self_scores
from ..config import TrainConfig
from ..data import Dataset
from ..ensemble import full_float32, train_many
from ..losses import diffusion_loss
from ..models import check_samples
from ..ranking import spearman
from ..runs import Run
from ..timesteps import parse_timesteps, query_noise_draws
from ..training import load_or_train, train
from .baselines import NEIGHBOURS, attribute_any
from .metrics import text_table

__all__ = ["query_loss", "run_query_loss", "retrain_on", "kept_without", "RemovalResult",
           "LossLedger", "kept_subset", "seed_mean_loss", "random_removals", "removal_test",
           "top_k_sets", "removal_losses", "pin_removal_sets", "pinned_removal_sets",
           "PairedDifference",
           "paired_difference", "random_subsets", "subset_losses", "LDSResult", "lds",
           "self_influence", "outlier_auc", "outlier_auc_interval", "outliers_in_top",
           "run_self_influence", "chapter_table", "format_table"]


# ---------------------------------------------------------------------------------------------
# the quantity retraining changes


@torch.no_grad()
def query_loss(model, scheduler, queries: torch.Tensor, timesteps=100, n_noise: int = 16,
               seed: int = 0, loss: str = "mse", chunk_size: int = 4096) -> torch.Tensor:
    """Each query's DDPM loss [Q] (float64), averaged over a fixed grid and fixed noise.

    ``timesteps`` is a number of evenly spaced timesteps in [1, T-1] (or a list); at each, the
    same ``n_noise`` seeded draws are used for every query and every model.
    """
    n_noise, chunk_size = validation.n_noise(n_noise), validation.chunk_size(chunk_size)
    validation.integer(seed, "seed", 0)
    check_samples(model, validation.tensor(queries, "queries"), "queries")
    validation.float_samples(queries, "queries", next(model.parameters()).dtype)
    n_train_t = scheduler.config.num_train_timesteps
    grid = parse_timesteps(timesteps, n_train_t)
    shape = tuple(queries.shape[1:])
    noise = query_noise_draws(shape, len(grid), n_noise, seed).flatten(0, 1)   # [T'K, *s]
    t = grid.repeat_interleave(n_noise)                                          # [T'K]
    device = next(model.parameters()).device
    model = model.eval()
    out = torch.empty(len(queries), dtype=torch.float64)
    per_query = len(t)
    step = max(1, chunk_size // per_query)
    for a in range(0, len(queries), step):
        z = queries[a:a + step]
        x = z[:, None].expand(-1, per_query, *shape).flatten(0, 1)
        tt, ee = t.repeat(len(z)), noise.repeat(len(z), *([1] * len(shape)))
        values = diffusion_loss(model, scheduler, x.to(device), tt.to(device), ee.to(device), loss)
        out[a:a + len(z)] = values.view(len(z), per_query).double().mean(1).cpu()
    return out


def run_query_loss(run: Run, queries: torch.Tensor, checkpoint: int = -1, **options) -> torch.Tensor:
    """``query_loss`` of ``run``'s model at ``checkpoint`` (default the last), with its loss."""
    options.setdefault("loss", run.config.loss)
    return query_loss(run.model_at(checkpoint), run.scheduler, queries, **options)


# ---------------------------------------------------------------------------------------------
# retraining on chosen samples


def _kept_indices(kept, n: int) -> torch.Tensor:
    if isinstance(kept, torch.Tensor) and kept.dtype == torch.bool:   # a mask over the training set
        if kept.shape != (n,):
            raise ValueError(f"A kept mask must have shape [{n}]; got {tuple(kept.shape)}.")
        kept = kept.nonzero()
    kept = validation.indices(kept, n, "kept")
    if len(kept) == 0:
        raise ValueError("Nothing to train on: the kept set is empty.")
    kept = kept.sort().values
    if (kept[1:] == kept[:-1]).any():
        raise ValueError("Kept indices contain duplicates; each training sample can be kept once.")
    return kept


def kept_without(n: int, removed) -> torch.Tensor:
    """The indices 0..n-1 that are not in ``removed``, in increasing order."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[validation.indices(removed, n, "removed")] = False
    return mask.nonzero().flatten()


def kept_subset(data: Dataset, kept) -> Dataset:
    """The samples ``kept`` (indices or a boolean mask [N]) of ``data``, in index order."""
    idx = _kept_indices(kept, len(data))
    return data.subset(idx, name=f"{data.name}[{len(idx)} kept]")


def retrain_on(config: TrainConfig, data: Dataset, kept, progress: bool = False,
               root: Path | None = None) -> Run:
    """Train ``config`` (same seed) on exactly the samples ``kept`` of ``data``, in index order.

    ``kept`` holds indices (or a boolean mask [N]); the run's data is ``data.subset(sorted kept)``.
    Cached by ``rl.load_or_train``: the same kept set is never trained twice.
    """
    return load_or_train(config, kept_subset(data, kept), progress=progress, root=root)


# ---------------------------------------------------------------------------------------------
# removal test


@dataclasses.dataclass
class RemovalResult:
    """Query losses after removing each method's top-``k`` proponents of each query.

    Every loss is the mean over the training ``seeds``: ``base_loss`` [Q] of the models trained
    on all data, ``loss[m]`` [Q] of the models retrained without ``removed[m]`` [Q, k]. The
    "random" reference removes ``k`` random samples ``draws`` times per query: ``removed["random"]``
    is [Q, draws, k], ``draw_loss`` [Q, draws] the seed-mean loss of each draw and
    ``loss["random"]`` their mean. ``n_retrains`` counts the distinct (removed set, seed)
    retrains, not the models trained on all data behind ``base_loss`` (one per seed).
    ``chosen_by`` says what chose the removed sets (``removal_test``'s ``chosen_by``, of the run
    that pinned them in a ledger), ``own_overlap[m]`` the mean share of the sets that the scores
    passed to this test choose too (1 when they chose them).
    """

    k: int
    base_loss: torch.Tensor
    loss: dict[str, torch.Tensor]
    removed: dict[str, torch.Tensor]
    n_retrains: int
    seeds: tuple[int, ...]
    draw_loss: torch.Tensor | None = None
    chosen_by: dict | None = None
    own_overlap: dict[str, float] | None = None

    @property
    def methods(self) -> list[str]:
        return list(self.loss)

    def increase(self, method: str) -> torch.Tensor:
        """Loss increase [Q] caused by removing ``method``'s top-k proponents."""
        return self.loss[method] - self.base_loss

    def relative_increase(self, method: str) -> torch.Tensor:
        """Loss increase [Q] as a fraction of the query's loss on the full-data model."""
        return self.increase(method) / self.base_loss


def _seeds(config: TrainConfig, seeds) -> tuple[int, ...]:
    seeds = (config.seed,) if seeds is None else tuple(validation.integer(s, "seeds entry") for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct training seeds; got {seeds}.")
    return seeds


class LossLedger:
    """Query losses of retrained models in a small JSON file, keyed by what produced them.

    A retraining protocol longer than one sitting (the scale ladder of ``study``) passes a
    ledger to ``subset_losses`` and ``removal_test``: each retrain's query losses and training
    seconds are written as soon as they are measured, with the machine that trained them
    (``machine.device_name``; entries from before it was recorded lack it), so a killed run, or
    a later one on another machine with the file committed, resumes where it stopped. The
    retrained weights are not kept. An entry's key hashes the configuration with its seed, the
    kept samples' values, the queries, the loss options, the diffusers version and
    ``cache.FORMAT_VERSION``, so an entry is only ever reused for exactly the retrain that made
    it. ``owner`` names what the file belongs
    to (e.g. a study rung's configuration hash); a file of another owner is refused.

    Missing entries are trained by ``rl.train`` on the CPU (``trainer`` "single", the default;
    with ``workers`` > 1 that many at a time, each in a spawned process of its own with one
    thread, so a script that uses them needs the ``if __name__ == "__main__":`` guard),
    or, with ``ensemble_size`` > 1 or a ``device`` other than the CPU, by
    ``ensemble.train_many`` in ensembles of at most ``ensemble_size`` members on ``device``
    (``trainer`` "ensemble", in full float32 on a GPU: ``ensemble.full_float32``). The two
    agree to float32 rounding only, so an entry's key also
    names its trainer and device type (except "single" on the CPU, whose keys predate them):
    entries of one are never read as the other's.

    Several processes may share one file (two processes splitting a protocol, on one machine or
    a shared disk): before each retrain the ledger reads the entries others have written since,
    and each write merges under a lock file (``fcntl``; POSIX only), so nobody's entries are
    lost and a stored number is never replaced. A second process made with ``from_end=True``
    trains the missing retrains last to first, so two processes meet in the middle instead of
    training the same ones. A write that fails (a full or read-only disk) warns once and the run
    goes on with its losses in memory.

    A ledger also keeps choices that decide which retrains a protocol asks for (``pin``): the
    removal test's sets are the top proponents of a trained model, which another CPU trains
    slightly differently, so the first run of a protocol stores its sets and every later run
    removes those (``removal_test`` with ``chosen_by``), and the retrains stored for them stay
    valid anywhere. A file with pins is written as ``PINNED_FORMAT``, which code from before
    pins refuses instead of rewriting the file without them; files without stay ``FORMAT``.
    """

    FORMAT, PINNED_FORMAT = 1, 2
    TRAINERS = ("single", "ensemble")

    def __init__(self, path, owner: str, *, device="cpu", ensemble_size: int = 1,
                 from_end: bool = False, workers: int = 1):
        self.path, self.owner = Path(path), str(owner)
        self.from_end = validation.flag(from_end, "from_end")
        self.device = validation.device(device)
        self.ensemble_size = validation.integer(ensemble_size, "ensemble_size", 1)
        self.workers = validation.integer(workers, "workers", 1)
        single = self.ensemble_size == 1 and self.device.type == "cpu"
        self.trainer = "single" if single else "ensemble"
        if self.workers > 1 and not single:
            raise ValueError(f"workers={workers} trains single retrains in parallel CPU "
                             "processes; an ensemble (ensemble_size > 1 or a GPU device) "
                             "already trains many at once in one process: pass workers=1.")
        self.entries: dict[str, dict] = {}
        self.pins: dict[str, dict] = {}
        self._write_failed = False
        self._read_stored()

    def _read_stored(self) -> None:
        """Take in the file's entries (another process may have written some since); where
        both hold a key, the stored entry wins."""
        if not self.path.exists():
            return
        doc = cache.read_json(self.path)
        if not isinstance(doc, dict) or doc.get("format") not in (self.FORMAT,
                                                                  self.PINNED_FORMAT):
            raise ValueError(f"{self.path}: not a loss ledger of format {self.FORMAT} or "
                             f"{self.PINNED_FORMAT}; move it away to start a new one.")
        if doc.get("owner") != self.owner:
            raise ValueError(f"{self.path} belongs to {doc.get('owner')!r}, not to "
                             f"{self.owner!r}: its retrains were made for another protocol. "
                             "Move it away or pass the ledger of this protocol.")
        self.entries = {**self.entries, **doc["entries"]}
        self.pins = {**self.pins, **doc.get("pins", {})}

    @contextlib.contextmanager
    def _locked(self):
        """Hold the ledger's lock file (``.NAME.lock`` beside it) while the block runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / f".{self.path.name}.lock", "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _refresh(self) -> None:
        """Read what other processes have stored since (under the lock)."""
        try:
            with self._locked():
                self._read_stored()
        except OSError as err:
            self._warn_once(err)

    def _save(self) -> None:
        """Merge this ledger's entries into the file under the lock; a stored entry is kept
        as stored. A failed write warns once; the entries stay in memory."""
        try:
            with self._locked():
                self._read_stored()
                self._write()
        except OSError as err:
            self._warn_once(err)

    def _write(self) -> None:
        doc = {"format": self.PINNED_FORMAT if self.pins else self.FORMAT, "owner": self.owner,
               "entries": self.entries}
        cache.write_json_atomic(self.path, {**doc, **({"pins": self.pins} if self.pins else {})})

    def pin(self, key: str, value, made_by: dict) -> dict:
        """The choice stored under ``key``: ``{"value": ..., "made_by": ...}`` as the first
        run that pinned it stored it, or ``value`` (JSON-ready) with ``made_by`` (what made the
        choice, e.g. a trained model's fingerprint), stored now. Read and written under the
        lock, so of two processes pinning at once, both get the first one's choice."""
        try:
            with self._locked():
                self._read_stored()
                if key not in self.pins:
                    self.pins[key] = {"value": value, "made_by": dict(made_by)}
                    self._write()
        except OSError as err:
            self.pins.setdefault(key, {"value": value, "made_by": dict(made_by)})
            warnings.warn(f"the loss ledger {self.path} cannot be read or written "
                          f"({type(err).__name__}: {err}), so this run's choice is not pinned "
                          "there: a later run may choose otherwise and retrain for it.",
                          stacklevel=2)
        return self.pins[key]

    def pinned(self, key: str) -> dict | None:
        """The choice stored under ``key`` (``pin``), read from the file now, or None."""
        self._refresh()
        return self.pins.get(key)

    def _warn_once(self, err: OSError) -> None:
        if not self._write_failed:
            warnings.warn(f"the loss ledger {self.path} cannot be read or written "
                          f"({type(err).__name__}: {err}); retrains go on and their losses are "
                          "returned, but a later run will train them again.", stacklevel=3)
        self._write_failed = True

    def __len__(self) -> int:
        return len(self.entries)

    @classmethod
    def key(cls, config: TrainConfig, subset: Dataset, queries: torch.Tensor,
            loss_options: dict, trainer: str = "single", device="cpu") -> str:
        """The entry key of ``config`` trained on ``subset`` by ``trainer`` on ``device``."""
        validation.choice(trainer, "trainer", cls.TRAINERS)
        payload = {"kind": "retrain-loss", "config": config.to_dict(),
                   "data": subset.fingerprint(), "queries": cache.tensor_fingerprint(queries),
                   "loss_options": loss_options, "diffusers": diffusers.__version__}
        device = torch.device(device).type   # a key, so the device need not be present
        if (trainer, device) != ("single", "cpu"):   # the keys of the first ledgers stay valid
            payload.update(trainer=trainer, device=device)
        return cache.key_for(payload)

    def seconds(self) -> float:
        """Training seconds of every entry, however many sittings wrote them."""
        return float(sum(e["seconds"] for e in self.entries.values()))

    def loss(self, config: TrainConfig, subset: Dataset, queries: torch.Tensor,
             loss_options: dict) -> torch.Tensor:
        """Query losses [Q] of ``config`` trained on ``subset``: stored, or trained, measured
        and stored now (the file is rewritten atomically after every new entry)."""
        return self.loss_many([(config, subset, queries)], loss_options)[0]

    def _train(self, jobs, loss_options: dict) -> None:
        """Train ``jobs`` [(key, config, subset, queries)] (one, or one ensemble) and hold
        their entries."""
        if self.trainer == "single":
            (k, c, s, q), = jobs
            self.entries[k] = _retrain_entry(c, s, q, loss_options)
            return
        ens = train_many([c for _, c, _, _ in jobs], [s for _, _, s, _ in jobs], self.device)
        for m, (k, c, _, q) in enumerate(jobs):
            with full_float32():   # as trained: no TF32 on a GPU
                losses = query_loss(ens.model(m), ens.scheduler, q,
                                    **{"loss": c.loss, **loss_options})
            self.entries[k] = {"losses": losses.tolist(),
                               "seconds": round(ens.train_seconds / len(jobs), 3),
                               "trainer": self.trainer, "device": self.device.type,
                               "ensemble": len(jobs),
                               "machine": machine.device_name(self.device)}

    def loss_many(self, jobs, loss_options: dict, progress: bool = False) -> list[torch.Tensor]:
        """Query losses [Q_j] of every job ``(config, subset, queries)``, training the missing
        ones with this ledger's trainer: one by one (``workers`` at once), or in ensembles of at
        most ``ensemble_size`` jobs that share their configuration but the seed and their
        subset's size. The file is merged and rewritten after every training."""
        keys = [self.key(c, s, q, loss_options, self.trainer, self.device) for c, s, q in jobs]
        missing = {k: job for k, job in zip(keys, jobs) if k not in self.entries}
        groups: dict[tuple, list] = {}
        for k, (c, s, q) in missing.items():
            group = k if self.trainer == "single" else (c.replace(seed=0), len(s), s.sample_shape)
            groups.setdefault(group, []).append((k, c, s, q))
        chunks = [g[a:a + self.ensemble_size] for g in groups.values()
                  for a in range(0, len(g), self.ensemble_size)]
        if self.from_end:
            chunks.reverse()
        with tqdm(total=len(missing), desc="retrains", disable=not progress) as bar:
            if self.workers > 1 and len(chunks) > 1:   # single retrains: one job a chunk
                self._train_in_processes([job for job, in chunks], loss_options, bar)
            else:
                for chunk in chunks:
                    self._refresh()
                    todo = [job for job in chunk if job[0] not in self.entries]   # or elsewhere
                    if todo:
                        self._train(todo, loss_options)
                        self._save()
                    bar.update(len(chunk))
        return [torch.tensor(self.entries[k]["losses"], dtype=torch.float64) for k in keys]

    def _train_in_processes(self, jobs, loss_options: dict, bar) -> None:
        """Train the single retrains ``jobs`` [(key, config, subset, queries)] in ``workers``
        processes, storing each entry as it arrives; jobs another process has stored by the
        time a worker is free are skipped (ones it is still training may be trained twice).
        When a retrain fails, the others still running finish and are stored before the error
        is raised; an interrupt stores those finished and leaves the rest."""
        todo, running = iter(jobs), {}
        context = multiprocessing.get_context("spawn")   # a fresh interpreter: no forked threads
        pool = ProcessPoolExecutor(self.workers, mp_context=context,
                                   initializer=torch.set_num_threads, initargs=(1,))

        def submit_next():
            self._refresh()
            for job in todo:
                if job[0] not in self.entries:
                    running[pool.submit(_retrain_entry, *job[1:], loss_options)] = job[0]
                    return
                bar.update(1)

        try:
            for _ in range(self.workers):
                submit_next()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    key = running.pop(future)
                    self.entries[key] = future.result()
                    self._save()
                    bar.update(1)
                    submit_next()
        except BaseException as err:
            if isinstance(err, Exception):
                wait(running)
            for future, key in running.items():
                if future.done() and not future.cancelled() and future.exception() is None:
                    self.entries[key] = future.result()
            self._save()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _retrain_entry(config: TrainConfig, subset: Dataset, queries: torch.Tensor,
                   loss_options: dict) -> dict:
    """A single retrain's ledger entry: ``config`` trained on ``subset`` by ``rl.train``, its
    query losses, training seconds and the machine that trained it (run in a worker process by
    ``workers`` > 1)."""
    run = train(config, subset, progress=False)
    return {"losses": run_query_loss(run, queries, **loss_options).tolist(),
            "seconds": round(run.train_seconds, 3), "machine": machine.device_name("cpu")}


def seed_mean_loss(config: TrainConfig, data: Dataset, kept, queries: torch.Tensor,
                   seeds, loss_options: dict, root: Path | None = None,
                   ledger: LossLedger | None = None) -> torch.Tensor:
    """Query loss [Q] of ``config`` retrained on ``kept`` with each training seed, averaged
    (through ``ledger`` when given: retrains recorded there, none cached as runs)."""
    if ledger is not None:
        return torch.stack(ledger.loss_many(_ledger_jobs(config, data, [(kept, queries)], seeds),
                                            loss_options)).mean(0)
    runs = [retrain_on(config.replace(seed=s), data, kept, root=root) for s in seeds]
    return torch.stack([run_query_loss(r, queries, **loss_options) for r in runs]).mean(0)


def _ledger_jobs(config: TrainConfig, data: Dataset, sets, seeds) -> list[tuple]:
    """``LossLedger.loss_many`` jobs: every ``(kept, queries)`` of ``sets`` with every seed."""
    jobs = []
    for kept, queries in sets:
        subset = kept_subset(data, kept)
        jobs += [(config.replace(seed=s), subset, queries) for s in seeds]
    return jobs


def random_removals(n: int, n_queries: int, draws: int, k: int, seed: int = 0) -> torch.Tensor:
    """``draws`` seeded random sets of ``k`` of ``n`` samples per query: [Q, draws, k], sorted."""
    gen = seeding.generator(seed)
    return torch.stack([torch.stack([torch.randperm(n, generator=gen)[:k].sort().values
                                     for _ in range(draws)]) for _ in range(n_queries)])


def removal_test(config: TrainConfig, data: Dataset, queries: torch.Tensor,
                 scores: dict[str, torch.Tensor], k: int, *, seeds=None, random_draws: int = 0,
                 random_seed: int = 0, loss_options: dict | None = None, progress: bool = True,
                 root: Path | None = None, ledger: LossLedger | None = None,
                 chosen_by: dict | None = None) -> RemovalResult:
    """Retrain without each method's top-``k`` proponents of each query; measure the query loss.

    ``scores`` maps a method name to its score matrix [Q, N] (``AttributionResult.scores``) for
    ``queries``. ``random_draws`` > 0 adds the "random" reference: that many seeded random sets
    of ``k`` per query (then ``scores`` must not hold "random"). Every training set is trained
    with each of ``seeds`` (default ``config.seed``, all else of ``config`` unchanged) and the
    query losses (``query_loss(**loss_options)``) are averaged over the seeds. With a
    ``ledger`` the retrains go through it (``LossLedger``) instead of the run cache. With a
    ledger and ``chosen_by`` (what produced ``scores``, e.g. the trained model's fingerprint)
    the removal sets are pinned there: the first run stores its top-``k`` sets with
    ``chosen_by`` and every later run with that ledger removes the stored sets, so its stored
    retrains count on a machine that trains a slightly different model
    (``RemovalResult.chosen_by`` and ``own_overlap`` say so). Pin only where every run should
    test the same sets: scores from a changed attribution method would not be tested.
    """
    seeds = _seeds(config, seeds)
    n = len(data)
    if not 1 <= k < n:
        raise ValueError(f"k={k} must lie in [1, {n - 1}] (the training set has {n} samples).")
    random_draws = validation.integer(random_draws, "random_draws", 0)
    if random_draws and "random" in scores:
        raise ValueError("Pass either random_draws or a 'random' score matrix, not both.")
    for name, s in scores.items():
        if tuple(s.shape) != (len(queries), n):
            raise ValueError(f"scores[{name!r}] has shape {tuple(s.shape)}; expected "
                             f"[{len(queries)} queries, {n} training samples].")
    if chosen_by is not None and ledger is None:
        raise ValueError("chosen_by pins the removal sets in a ledger: pass the ledger too, or "
                         "leave chosen_by out.")
    own = top_k_sets(scores, k)
    removed = dict(own)
    if chosen_by is not None and own:
        pinned, chosen_by = pin_removal_sets(ledger, config, queries, n, own, chosen_by)
        removed = {m: pinned[m] for m in own}                  # in the order of scores
    overlap = {m: float(torch.stack([torch.isin(own[m][q], removed[m][q]).double().mean()
                                     for q in range(len(queries))]).mean()) for m in own}
    if random_draws:
        removed["random"] = random_removals(n, len(queries), random_draws, k, random_seed)
    base_loss, losses, n_retrains = removal_losses(config, data, queries, removed, seeds=seeds,
                                                   loss_options=loss_options,
                                                   progress=progress, root=root, ledger=ledger)
    draw_loss = losses["random"] if random_draws else None
    return RemovalResult(k, base_loss, {m: v.mean(1) for m, v in losses.items()}, removed,
                         n_retrains, seeds, draw_loss, chosen_by, overlap)


def top_k_sets(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Each score matrix's top-``k`` training samples of each query: [Q, k], sorted."""
    return {m: torch.as_tensor(s).topk(k, dim=1).indices.sort(dim=1).values
            for m, s in scores.items()}


def removal_losses(config: TrainConfig, data: Dataset, queries: torch.Tensor,
                   removed: dict[str, torch.Tensor], *, seeds=None,
                   loss_options: dict | None = None, progress: bool = True,
                   root: Path | None = None, ledger: LossLedger | None = None):
    """``(base_loss [Q], losses {m: [Q, draws]}, n_retrains)``: the seed-mean query loss of
    the models trained on all of ``data`` and on ``data`` without each set of ``removed[m]``
    ([Q, k], or [Q, draws, k] for several sets per query; query ``q``'s loss after removing its
    sets). The measuring half of ``removal_test``, which says what the arguments mean; with a
    ``ledger`` every missing retrain is trained first, in ensembles when the ledger says so."""
    loss_options = dict(loss_options or {})
    loss_options.setdefault("loss", config.loss)
    seeds, n = _seeds(config, seeds), len(data)
    sets = {}                                                             # [Q, draws, k]
    for m, r in removed.items():
        r = torch.as_tensor(r)
        sets[m] = r[:, None] if r.ndim == 2 else r
        if sets[m].ndim != 3 or len(r) != len(queries):
            raise ValueError(f"removed[{m!r}] has shape {tuple(r.shape)}; expected "
                             f"[{len(queries)} queries, k] or [{len(queries)}, draws, k].")
    if ledger is not None:
        ledger.loss_many(_ledger_jobs(config, data, [(torch.arange(n), queries)] + [
            (kept_without(n, r[q, d]), queries[q:q + 1]) for r in sets.values()
            for q in range(len(queries)) for d in range(r.shape[1])], seeds), loss_options,
            progress)
    base_loss = seed_mean_loss(config, data, torch.arange(n), queries, seeds, loss_options, root,
                               ledger)
    losses = {m: torch.empty(r.shape[:2], dtype=torch.float64) for m, r in sets.items()}
    trained = set()
    bar = tqdm(total=sum(r.shape[0] * r.shape[1] for r in sets.values()), desc="removal retrains",
               disable=not progress)
    for m, r in sets.items():
        for q in range(len(queries)):
            for d in range(r.shape[1]):
                losses[m][q, d] = seed_mean_loss(config, data, kept_without(n, r[q, d]),
                                                 queries[q:q + 1], seeds, loss_options, root,
                                                 ledger)[0]
                trained.add(tuple(r[q, d].tolist()))
                bar.update()
    bar.close()
    return base_loss, losses, len(trained) * len(seeds)


def _removal_pin_key(config: TrainConfig, queries: torch.Tensor, n: int, k: int, methods) -> str:
    return cache.key_for({"kind": "removal-sets", "config": config.to_dict(), "n": n, "k": k,
                          "methods": sorted(methods), "draws": seeding.DRAWS_VERSION,
                          "queries": cache.tensor_fingerprint(queries)})


def pin_removal_sets(ledger: LossLedger, config: TrainConfig, queries: torch.Tensor, n: int,
                     sets: dict[str, torch.Tensor], chosen_by: dict):
    """``(sets, chosen_by)`` of the removal test of ``config`` on ``n`` samples for
    ``queries``, as the first run with ``ledger`` pinned them: stored there now, with
    ``chosen_by``, when none are (``sets``: ``top_k_sets``, [Q, k] per method)."""
    if not sets:
        raise ValueError("sets is empty: pin the removal sets of at least one method.")
    k = next(iter(sets.values())).shape[1]
    key = _removal_pin_key(config, queries, n, k, sets)
    entry = ledger.pin(key, {m: [" ".join(map(str, row)) for row in r.tolist()]
                             for m, r in sets.items()}, chosen_by)
    return _read_pin(ledger, key, entry, sorted(sets), len(queries), k, n)


def pinned_removal_sets(ledger: LossLedger, config: TrainConfig, queries: torch.Tensor, n: int,
                        methods, k: int):
    """``(sets, chosen_by)`` that a run pinned in ``ledger`` (``pin_removal_sets``) for these
    ``methods``' top-``k`` sets, or None when no run has yet."""
    key = _removal_pin_key(config, queries, n, k, methods)
    entry = ledger.pinned(key)
    return None if entry is None else _read_pin(ledger, key, entry, sorted(methods),
                                                len(queries), k, n)


def _read_pin(ledger: LossLedger, key: str, entry: dict, methods: list, n_queries: int, k: int,
              n: int):
    """A pinned entry's ``(sets, chosen_by)``, checked against what the test needs."""
    try:
        sets = {m: torch.tensor([[int(i) for i in row.split()] for row in rows])
                for m, rows in entry["value"].items()}
        valid = sorted(sets) == methods and isinstance(entry["made_by"], dict) and all(
            r.shape == (n_queries, k) and 0 <= int(r.min()) and int(r.max()) < n
            for r in sets.values())
    except (AttributeError, KeyError, TypeError, ValueError, RuntimeError):
        valid = False
    if not valid:
        raise ValueError(f"{ledger.path}: the removal sets pinned under {key!r} are not "
                         f"{n_queries} sets of {k} indices below {n} for each of {methods}; "
                         "the file was edited or damaged: restore it from git.")
    return sets, entry["made_by"]


# ---------------------------------------------------------------------------------------------
# paired comparisons with bootstrap intervals


@dataclasses.dataclass
class PairedDifference:
    """Per-query differences ``a - b`` [Q] with their mean and a percentile bootstrap interval."""

    per_query: torch.Tensor
    mean: float
    low: float
    high: float
    level: float

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return self.low > 0 or self.high < 0

    def pick(self, above: str, below: str, includes_zero: str) -> str:
        """The wording that is true: ``above`` when the interval lies above 0, ``below`` when
        it lies below 0, else ``includes_zero``."""
        return above if self.low > 0 else below if self.high < 0 else includes_zero

    def text(self, fmt: str = "+.3f", unit: str = "") -> str:
        """``"+0.123 (95 % CI +0.045 to +0.201)"``."""
        return (f"{self.mean:{fmt}}{unit} ({100 * self.level:.0f} % CI {self.low:{fmt}}{unit} to "
                f"{self.high:{fmt}}{unit})")


def paired_difference(a: torch.Tensor, b: torch.Tensor, *, n_boot: int = 10000,
                      level: float = 0.95, seed: int = 0) -> PairedDifference:
    """Mean of the per-query differences ``a - b`` with a seeded percentile bootstrap interval:
    the queries are resampled with replacement ``n_boot`` times, the interval holds the central
    ``level`` of the resampled means."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"a and b must be per-query values of the same length >= 2; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}.")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}.")
    n_boot = validation.integer(n_boot, "n_boot", 1)
    diff = a - b
    gen = seeding.generator(seed)
    idx = torch.randint(0, len(diff), (n_boot, len(diff)), generator=gen)
    low, high = _central_interval(diff[idx].mean(1), level)
    return PairedDifference(diff, float(diff.mean()), low, high, level)


def _central_interval(samples: torch.Tensor, level: float) -> tuple[float, float]:
    """The percentiles that hold the central ``level`` of bootstrap ``samples``."""
    tail = (1 - level) / 2
    low, high = torch.quantile(samples.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return float(low), float(high)


# ---------------------------------------------------------------------------------------------
# linear datamodeling score


def random_subsets(n: int, m: int, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``m`` seeded random subsets of ``round(fraction * n)`` samples each, as a mask [m, n]."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}.")
    n, m = validation.integer(n, "n", 1), validation.integer(m, "m", 1)
    size = max(1, round(fraction * n))
    gen = seeding.generator(seed)
    masks = torch.zeros(m, n, dtype=torch.bool)
    for j in range(m):
        masks[j, torch.randperm(n, generator=gen)[:size]] = True
    return masks


def subset_losses(config: TrainConfig, data: Dataset, masks: torch.Tensor, queries: torch.Tensor,
                  *, seeds=None, loss_options: dict | None = None, progress: bool = True,
                  root: Path | None = None, ledger: LossLedger | None = None) -> torch.Tensor:
    """Retrain ``config`` on each subset ``masks[j]`` with each training seed (default
    ``config.seed``) and return the seed-mean query losses [M, Q] (retrains through ``ledger``
    when given, as ``removal_test``)."""
    loss_options = dict(loss_options or {})
    loss_options.setdefault("loss", config.loss)
    seeds = _seeds(config, seeds)
    if masks.ndim != 2 or masks.shape[1] != len(data) or masks.dtype != torch.bool:
        raise ValueError(f"masks must be a boolean [M, {len(data)}] tensor; got "
                         f"{masks.dtype} {tuple(masks.shape)}.")
    if ledger is not None:   # every missing retrain first, in ensembles when the ledger says so
        ledger.loss_many(_ledger_jobs(config, data, [(mask, queries) for mask in masks], seeds),
                         loss_options, progress)
    out = torch.empty(len(masks), len(queries), dtype=torch.float64)
    for j in tqdm(range(len(masks)), desc="subset retrains", disable=not progress):
        out[j] = seed_mean_loss(config, data, masks[j], queries, seeds, loss_options, root,
                                ledger)
    return out


@dataclasses.dataclass
class LDSResult:
    """Per-query linear datamodeling scores and the predictions behind them.

    ``per_query`` [Q]: Spearman correlation, over the ``M`` subsets, between ``predicted[:, q]``
    (the subset's summed scores) and ``-losses[:, q]`` (the retrained query loss, negated).
    """

    per_query: torch.Tensor
    predicted: torch.Tensor
    losses: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.per_query.mean())

    @property
    def std(self) -> float:
        """Spread over queries (sample standard deviation)."""
        return float(self.per_query.std()) if len(self.per_query) > 1 else 0.0

    @property
    def sem(self) -> float:
        """Standard error of the mean over queries."""
        return self.std / max(1, len(self.per_query)) ** 0.5


def lds(scores: torch.Tensor, masks: torch.Tensor,
        losses: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]) -> LDSResult:
    """Linear datamodeling score of ``scores`` [Q, N] on subsets ``masks`` [M, N].

    ``losses`` is the retrained query loss, either a matrix [M, Q] (``subset_losses``) or a
    function from one mask [N] to the losses [Q] (handy for synthetic tests). The attribution
    predicts that subset ``S`` lowers query ``q``'s loss by ``sum_{i in S} scores[q, i]``; the
    score is the rank correlation of that prediction with ``-loss``, so +1 is perfect.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    masks = torch.as_tensor(masks)
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[1]:
        raise ValueError(f"scores [Q, N] and masks [M, N] must share N; got {tuple(scores.shape)} "
                         f"and {tuple(masks.shape)}.")
    if callable(losses):
        losses = torch.stack([torch.as_tensor(losses(mk), dtype=torch.float64) for mk in masks])
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if tuple(losses.shape) != (masks.shape[0], scores.shape[0]):
        raise ValueError(f"losses must be [M={masks.shape[0]}, Q={scores.shape[0]}]; got "
                         f"{tuple(losses.shape)}.")
    for name, values in (("scores", scores), ("losses", losses)):
        bad = (~torch.isfinite(values)).nonzero()
        if len(bad):
            where = "query %d, training sample %d" if name == "scores" else "subset %d, query %d"
            raise ValueError(f"{name} contains NaN or infinite values (first at {where % tuple(bad[0].tolist())}): "
                             "a diverged retrain or attribution cannot be ranked; fix or drop it "
                             "instead of letting it count as LDS 0.")
    predicted = masks.double() @ scores.T                                       # [M, Q]
    per_query = spearman(predicted.T, -losses.T.double())   # 0 where either side is constant
    return LDSResult(per_query, predicted, losses)


# ---------------------------------------------------------------------------------------------
# planted outliers


def self_influence(scores: torch.Tensor, method: str = "") -> torch.Tensor:
    """Self-influence [N] from a score matrix [N, N] whose queries are the training samples.

    For attribution scores it is the diagonal, the influence of each sample on itself. Pixel
    and feature scores (``baselines.NEIGHBOURS``) have a trivial diagonal (each image is its own
    nearest neighbour), so for them it is the dissimilarity to the nearest *other* training
    sample: the neighbour analogue, large for a sample nothing else explains.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"Self-influence needs an [N, N] matrix (queries = training samples); "
                         f"got {tuple(scores.shape)}.")
    if method in NEIGHBOURS:
        others = scores.clone().fill_diagonal_(-float("inf"))
        return -others.max(dim=1).values
    return scores.diagonal().clone()


def run_self_influence(run: Run, method: str, *, cached: bool = True, **options) -> torch.Tensor:
    """Self-influence [N] of every training sample of ``run`` under ``method`` (any method of
    ``baselines.attribute_any``), with every training image as a query; ``options`` go to the
    attribution (negative checkpoint indices count from the end). The gradient methods of
    ``rl.attribute`` compute the diagonal alone (``attribution.self_scores``: N, not N^2,
    scores); the others score the whole matrix. With ``cached`` the gradient methods' values
    come from the cache (D-TRAK's diagonal alone, ``dtrak.load_or_self_scores``)."""
    if method in METHODS:
        return (load_or_self_scores if cached else self_scores)(run, method, **options)
    if method == "dtrak" and cached:
        return dtrak.load_or_self_scores(run, **options)
    result = attribute_any(run, run.data.images, method, cached=cached, **options)
    return self_influence(result.scores, method)


def outlier_auc(values: torch.Tensor, is_outlier: torch.Tensor) -> float:
    """Probability that a random outlier has a larger ``value`` than a random inlier (ties 1/2):
    the area under the ROC curve of ranking by ``values``; 0.5 is chance, 1 perfect."""
    values, is_outlier = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(is_outlier)
    a, b = values[is_outlier], values[~is_outlier]
    if not len(a) or not len(b):
        raise ValueError("Need at least one outlier and one inlier.")
    return _auc(a, b)


def _auc(outliers: torch.Tensor, inliers: torch.Tensor) -> float:
    diff = outliers[:, None] - inliers[None, :]
    return float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean())


def outlier_auc_interval(values: torch.Tensor, is_outlier: torch.Tensor, *, n_boot: int = 2000,
                         level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """A seeded percentile bootstrap interval for ``outlier_auc``: outliers and inliers are
    resampled separately, with replacement, ``n_boot`` times."""
    values, is_outlier = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(is_outlier)
    a, b = values[is_outlier], values[~is_outlier]
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Need at least two outliers and two inliers for an interval.")
    gen = seeding.generator(seed)
    aucs = [_auc(a[torch.randint(0, len(a), (len(a),), generator=gen)],
                 b[torch.randint(0, len(b), (len(b),), generator=gen)])
            for _ in range(validation.integer(n_boot, "n_boot", 1))]
    return _central_interval(torch.tensor(aucs, dtype=torch.float64), level)


def outliers_in_top(values: torch.Tensor, is_outlier: torch.Tensor, k: int | None = None) -> int:
    """How many of the ``k`` highest ``values`` (default: as many as there are outliers) are outliers."""
    is_outlier = torch.as_tensor(is_outlier)
    k = int(is_outlier.sum()) if k is None else k
    return int(is_outlier[torch.as_tensor(values).topk(k).indices].sum())


# ---------------------------------------------------------------------------------------------
# the chapter's table


def chapter_table(removal: RemovalResult, lds_results: dict[str, LDSResult],
                  labels: dict[str, str] | None = None) -> str:
    """Chapter 5's table: per method, the mean query-loss increase of the removal test (percent
    of the full-data loss, with its standard error over queries) and the mean LDS (with its
    standard deviation over queries)."""
    labels = labels or {}
    rows = {}
    for m in removal.methods:
        inc = 100 * removal.relative_increase(m)
        sem = float(inc.std()) / len(inc) ** 0.5 if len(inc) > 1 else 0.0
        res = lds_results[m]
        rows[labels.get(m, m)] = {
            "removal: loss increase (%)": f"{float(inc.mean()):+.1f} ± {sem:.1f}",
            "queries with increase": f"{int((inc > 0).sum())}/{len(inc)}",
            "LDS (mean ± s.d.)": f"{res.mean:+.3f} ± {res.std:.3f}",
        }
    return format_table(rows)


def format_table(rows: dict[str, dict[str, str | float]], first: str = "method") -> str:
    """An aligned text table: ``rows`` maps a row name to {column: value} (floats to 3 places)."""
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    fmt = lambda v: f"{v:+.3f}" if isinstance(v, float) else str(v)
    return text_table([first, *columns],
                      [[name] + [fmt(r.get(c, "")) for c in columns] for name, r in rows.items()])
