"""Attribution across processes with ``torch.distributed``, launched by ``torchrun``.

Every process (rank) scores one shard and the partial score matrices are summed:

* ``shard="train"`` (default): rank r scores a contiguous slice of the training set
  (``attribute(..., train_slice=...)``); every rank computes the query side in full. Slices start
  at multiples of ``chunk_size``, so each rank computes exactly the chunks one process would;
  where that leaves a rank without samples (N <= (p - 1) x ``chunk_size``), slices split the
  training set sample by sample instead (``train_shards``).
* ``shard="queries"``: rank r attributes a contiguous slice of the queries against the whole
  training set (every rank computes all training gradients).

A rank leaves the columns (or rows) outside its shard at zero and ``all_reduce`` sums them; adding
zeros is exact, so aligned training shards give one process's scores bit for bit (shards split
sample by sample, and query shards, change the shapes of batched products, which may round
differently: equal to float32 rounding). Per checkpoint one process computes ``Q x |T'| x K``
query draws and ``N`` training gradients; ``p`` processes sharding the training set compute
``Q x |T'| x K`` draws and ``N / p`` gradients each. gloo runs on CPUs, NCCL on GPUs (one GPU
per rank: ``device="cuda:<LOCAL_RANK>"``).

    torchrun --standalone --nproc_per_node 2 -m retrac_lib attribute RUN QUERIES --out SCORES
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from . import attribution, cache, validation
from .attribution import AttributionResult

SHARDS = ("train", "queries")


def init(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); False when alone.

    The backend defaults to NCCL when CUDA is available, gloo otherwise.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":  # NCCL's collectives run on the current device: this rank's GPU
        torch.cuda.set_device(validation.default_device())
    dist.init_process_group(backend)
    return True


def shard_ranges(n: int, world: int, align: int = 1) -> list[range]:
    """``world`` contiguous ranges covering ``range(n)`` in order, as even as blocks of ``align``
    allow: every range starts at a multiple of ``align`` (trailing ranges may be empty)."""
    if world < 1 or align < 1:
        raise ValueError(f"world and align must be >= 1; got {world} and {align}.")
    blocks = -(-n // align)
    bounds = [min(n, align * (blocks * r // world)) for r in range(world + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def train_shards(n: int, world: int, chunk_size: int = 64) -> list[range]:
    """Each rank's training slice: aligned to ``chunk_size`` when every rank then gets samples,
    otherwise split sample by sample; warns when there are fewer samples than ranks."""
    ranges = shard_ranges(n, world, validation.chunk_size(chunk_size))
    if any(len(r) == 0 for r in ranges):
        ranges = shard_ranges(n, world)
    if n < world:
        warnings.warn(f"{n} training samples for {world} processes: {world - n} process(es) "
                      f"score nothing; run with at most {max(n, 1)} processes.", stacklevel=3)
    return ranges


PER_RANK_OPTIONS = ("device", "progress")   # may differ between ranks by design


def _describe(value) -> str:
    """A value as ranks compare it: tensors by digest (a repr elides most of their values)."""
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} digest {cache.tensor_fingerprint(value)[:12]}"
    return repr(value)


def require_same_inputs(run, queries: torch.Tensor, **options) -> None:
    """Refuse, on every rank and before computing, processes that hold different runs, queries
    or options (``PER_RANK_OPTIONS`` excepted): their digests are gathered and compared."""
    mine = {"run": f"digest {run.fingerprint()[:12]}",
            "queries": f"{len(queries)} queries, digest "
                       f"{cache.tensor_fingerprint(torch.as_tensor(queries))[:12]}",
            "options": repr(sorted((k, _describe(v)) for k, v in options.items()
                                   if k not in PER_RANK_OPTIONS))}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone[1:], start=1):
        differ = [k for k in mine if theirs[k] != everyone[0][k]]
        if differ:
            details = "; ".join(f"{k}: rank 0 {everyone[0][k]}, rank {rank} {theirs[k]}"
                                for k in differ)
            raise ValueError(f"The {len(everyone)} processes were given different inputs "
                             f"({details}). Every process must read the same run, queries and "
                             "options; nothing was computed.")


def attribute(run, queries: torch.Tensor, method: str = "retrac", *, shard: str = "train",
              **options) -> AttributionResult:
    """``rl.attribute`` split over the processes of the initialized group (alone: one process).

    Every rank gets the whole result: scores [Q, N] in training-set order, equal to one process's.
    ``options`` are those of ``rl.attribute`` (``projection`` excepted).
    """
    validation.choice(shard, "shard", SHARDS)
    if options.get("train_slice") is not None:
        raise ValueError("distributed.attribute chooses each rank's train_slice itself.")
    if shard == "queries" and options.get("noise_per_query"):
        raise ValueError("noise_per_query draws each query's noise from its position in the "
                         "query batch, so query shards would not match one process; use "
                         "shard='train'.")
    if not dist.is_initialized():
        return attribution.attribute(run, queries, method, **options)
    require_same_inputs(run, queries, method=method, shard=shard, **options)
    rank, world = dist.get_rank(), dist.get_world_size()
    if shard == "train":
        part = train_shards(len(run.data), world, options.get("chunk_size", 64))[rank]
        res = attribution.attribute(run, queries, method, train_slice=part, **options)
        scores, norms = res.scores, res.train_grad_norms
    else:
        if len(queries) < world:
            raise ValueError(f"shard='queries' needs at least one query per process: {len(queries)} "
                             f"queries for {world} processes. Use shard='train'.")
        part = shard_ranges(len(queries), world)[rank]
        res = attribution.attribute(run, queries[part.start:part.stop], method, **options)
        scores = torch.zeros(len(queries), len(run.data), dtype=res.scores.dtype)
        scores[part.start:part.stop] = res.scores
        norms = torch.zeros_like(res.train_grad_norms) if rank else res.train_grad_norms
    on = "cuda" if dist.get_backend() == "nccl" else "cpu"
    scores, norms = scores.to(on), norms.to(on)
    seconds = torch.tensor([res.seconds], dtype=torch.float64, device=on)
    dist.all_reduce(scores)
    dist.all_reduce(norms)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return AttributionResult(scores.cpu(), res.config, res.checkpoint_weights, norms.cpu(),
                             float(seconds), res.query_noise)
