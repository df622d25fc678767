"""The command line: attribute a saved run against a file of query images, for cluster jobs.

    python -m retrac_lib attribute RUN QUERIES --out SCORES [--method retrac] [--timesteps 100] ...
    python -m retrac_lib attribute RUN QUERIES --out SCORES --timesteps 10,500,990 --dry-run
    torchrun --standalone --nproc_per_node 4 -m retrac_lib attribute RUN QUERIES --out SCORES

The options are ``rl.attribute``'s: ``--method``, ``--timesteps`` (a count of evenly spaced
timesteps or a comma-separated list), ``--n-noise``, ``--noise-seed``, ``--noise-per-query`` or
``--query-noise FILE`` (a tensor file like ``QUERIES``, [K, *sample] or [T', K, *sample]),
``--loss`` (default the run's), ``--checkpoints``, ``--train-side``, ``--normalization``,
``--projection K`` and ``--projection-seed``, ``--engine``, ``--chunk-size`` and ``--device``.
Each is checked against the run before anything is computed, and a bad value is an error that
names its option. ``--dry-run`` prints what the call would cost (gradient evaluations on the
query and training side, seconds measured on one chunk of each and extrapolated, peak memory)
and exits 0 without computing or writing the scores (``rl.attribution.estimate``; for one
process: under ``torchrun`` the training side splits between the processes).

``RUN`` is a folder written by ``rl.Recorder(..., folder=...)`` (or ``rl.save_run(run, folder,
with_data=True)``). ``QUERIES`` holds one float32 tensor [Q, *sample] in [-1, 1]: a
``.safetensors`` file (its only tensor, or the one named "queries"), a ``.npy`` array or a
``.pt`` tensor (read with ``weights_only=True``). ``SCORES`` is a new folder that
``rl.AttributionResult.load`` reads: ``scores.safetensors`` ([Q, N] scores, checkpoint weights,
training-gradient norms, the query noise used) and ``config.json``. Under ``torchrun`` the
processes share the work (``retrac_lib.distributed``) and rank 0 writes the result. A ``SCORES``
that exists already, or lies in a folder that cannot be written to, is refused before anything
is computed, as are
queries on another scale than the training images (``--allow-out-of-range`` scores them anyway).
Should ``SCORES`` still be taken while the scores are computed (another process), they are saved
next to it and the command says where and exits 1; under ``torchrun`` the processes first check
that they hold the same run, queries and options.

    python -m retrac_lib study [RUNG ...] [--budget-minutes 60] [--device cpu|cuda]
                               [--ensemble-size M] [--out retrac_lib/results/v1]
                               [--estimate-only] [--workers N] [--from-end]
                               [--retrains-only]

runs the scale ladder of ``retrac_lib.evaluation.study`` (the one place the core loads
``evaluation``, inside this command only): it measures each rung's unit costs with a short
probe, prints every rung's estimated time, runs the named rungs (default all) that fit the budget,
cheapest first, writes ``<rung>.json`` per finished rung to ``--out`` and says which did not run
and how long each would take. ``--device cuda`` also trains the LDS and removal retrains there,
32 at once (``--ensemble-size``); on the CPU ``--workers N`` trains N retrains at once, each in
a process of its own. A second process started with ``--from-end`` shares the
rung's ledger with a first one and trains the missing retrains from the other end, so the two
meet in the middle. ``--retrains-only`` trains only the named rungs' retrains that need no
trained model into their ledgers (``study.train_retrains``), with no probe and no budget, so
a fresh machine retrains from its first minute. ``RETRAC_SMOKE=1`` runs the tiny smoke rungs
instead.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import attribution, cache, distributed, recorder, validation
from . import config as rl_config
from .attribution.sketch import projection_size
from .cache import CacheError
from .losses import LOSSES
from .runs import WEIGHTS
from .timesteps import parse_timesteps

QUERY_SUFFIXES = (".safetensors", ".npy", ".pt")


def load_queries(path, sample_shape) -> torch.Tensor:
    """The query tensor in ``path``, validated against the run's ``sample_shape``."""
    path = Path(path)
    queries = load_tensor(path, "queries", "[Q, *sample]")
    expected = f"[Q, {', '.join(map(str, sample_shape))}]"
    if queries.dtype != torch.float32:
        raise ValueError(f"{path}: queries have dtype {queries.dtype}; save float32 images scaled "
                         f"like the training images (e.g. [-1, 1]), shape {expected}.")
    if queries.ndim != len(sample_shape) + 1 or tuple(queries.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"{path}: queries have shape {tuple(queries.shape)}; this run takes "
                         f"{expected}.")
    if len(queries) == 0 or not torch.isfinite(queries).all():
        raise ValueError(f"{path}: queries must be at least one image, with finite values.")
    return queries


def load_tensor(path, name: str = "queries", shape: str = "[Q, *sample]") -> torch.Tensor:
    """The one tensor in the file ``path`` (.safetensors: its only tensor or the one called
    ``name``; .npy; .pt read with ``weights_only=True``), with errors that name the file."""
    path = Path(path)
    if path.suffix not in QUERY_SUFFIXES:
        raise ValueError(f"{path}: {name} files must end in {', '.join(QUERY_SUFFIXES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such {name} file.")
    try:
        return _read_tensor(path, name, shape)
    except Exception as err:   # each reader raises its own kinds for an empty or foreign file
        if isinstance(err, ValueError) and str(path) in str(err):
            raise
        raise ValueError(f"{path} cannot be read as a {path.suffix} file ({type(err).__name__}: "
                         f"{err}). Save one float32 tensor {shape} there.") from err


def _read_tensor(path: Path, name: str, shape: str):
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if not tensors:
            raise ValueError(f"{path} holds no tensors; save the {name} as a tensor there.")
        if len(tensors) != 1 and name not in tensors:
            label = "query" if name == "queries" else name.replace("_", " ")
            raise ValueError(f"{path} holds tensors {sorted(tensors)}; name the {label} tensor "
                             f"'{name}' or store it alone.")
        return tensors.get(name, next(iter(tensors.values())))
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    value = torch.load(path, weights_only=True)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} holds a {type(value).__name__}; save one tensor {shape}.")
    return value


def save_or_rescue(result, out: Path, key: dict) -> Path:
    """Save ``result`` to ``out``; when that fails (another process took ``out`` while this one
    computed, or its folder stopped being writable), save it next to ``out``, in the working
    folder or in the temporary folder instead, warn where, and return where it went."""
    try:
        return result.save(out, key=key)
    except OSError as first:
        name = f"{out.name}.rescued-{os.getpid()}"
        for folder in (out.parent, Path.cwd(), Path(tempfile.gettempdir())):
            try:
                saved = result.save(folder / name, key=key)
            except OSError:
                continue
            print(f"warning: could not save to --out {out} ({first}); the scores were saved to "
                  f"{saved} instead.", file=sys.stderr)
            return saved
        raise OSError(f"Could not save the scores to --out {out} ({first}), nor to {name} next "
                      "to it, in the working folder or in the temporary folder.") from first


def timesteps_arg(text: str):
    """``--timesteps``: a count ("100") or a comma-separated list of timesteps ("10,500,990")."""
    items = [item.strip() for item in text.split(",")]
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a count of evenly spaced timesteps (e.g. 100) nor a "
            "comma-separated list of integer timesteps (e.g. 10,500,990)") from None
    return values[0] if len(items) == 1 else values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrac_lib",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("attribute", help="score every training sample of a run for each query")
    p.add_argument("run", type=Path, help="folder of a recorded run")
    p.add_argument("--weights", choices=WEIGHTS, default="trained",
                   help="the checkpoints' trained weights, or their EMA weights (recorded with "
                        "recorder.checkpoint(model, ema=...))")
    p.add_argument("queries", type=Path, help="query images: .safetensors, .npy or .pt")
    p.add_argument("--out", type=Path, required=True, help="new folder for the scores")
    p.add_argument("--method", choices=attribution.METHODS, default="retrac")
    p.add_argument("--timesteps", type=timesteps_arg, default=100,
                   help="query timesteps T': a count, evenly spaced in [1, T-1] (default 100), "
                        "or a comma-separated list such as 10,500,990")
    p.add_argument("--n-noise", type=int, default=16, help="noise draws K per timestep")
    p.add_argument("--noise-seed", type=int, default=0)
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--noise-per-query", action="store_true",
                       help="fresh seeded query noise for every query and checkpoint")
    noise.add_argument("--query-noise", type=Path, metavar="FILE",
                       help="the query noise, [K, *sample] or [T', K, *sample], in a tensor file "
                            "like QUERIES (.safetensors tensor 'query_noise' or alone)")
    p.add_argument("--loss", choices=LOSSES, default=None, help="default: the run's training loss")
    p.add_argument("--checkpoints", type=int, nargs="+", help="checkpoint indices (default all)")
    p.add_argument("--train-side", choices=attribution.TRAIN_SIDES, default="recorded")
    p.add_argument("--normalization", choices=attribution.QUERY_NORMALIZATIONS, default=None,
                   help="ReTrac's query-side placement (default per_timestep)")
    p.add_argument("--projection", type=int, metavar="K", default=None,
                   help="score in a K-dimensional CountSketch of the gradients (default exact)")
    p.add_argument("--projection-seed", type=int, default=0)
    p.add_argument("--engine", choices=attribution.ENGINES, default="auto",
                   help="gradient engine (default: ghost where the model's layers allow it)")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> with a GPU, else cpu")
    p.add_argument("--shard", choices=distributed.SHARDS, default="train",
                   help="what the processes split under torchrun")
    p.add_argument("--allow-out-of-range", action="store_true",
                   help="score queries on another scale than the training images, with a warning")
    p.add_argument("--dry-run", action="store_true",
                   help="print the cost estimate (gradient passes, seconds measured on a few of "
                        "them, peak memory) and exit without computing or writing the scores")
    s = commands.add_parser("study", help="run the scale ladder (retrac_lib.evaluation.study) "
                                          "in a budget")
    s.add_argument("rungs", nargs="*", metavar="RUNG", help="rungs to run (default: all)")
    s.add_argument("--budget-minutes", type=float, default=60.0,
                   help="run the cheapest rungs whose estimates fit in this many minutes")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where attribution and the retrains run (the rung's own run trains "
                        "on the CPU)")
    s.add_argument("--ensemble-size", type=int, default=None,
                   help="retrains trained at once on --device (default: 1 on cpu, which keeps "
                        "rl.train's retrains; 32 on cuda)")
    s.add_argument("--out", type=Path, default=None,
                   help="folder for the result files (default: the library's results/v1, "
                        "working folder, the repository root)")
    s.add_argument("--estimate-only", action="store_true",
                   help="print the probes and estimates, run nothing")
    s.add_argument("--workers", type=int, default=1,
                   help="retrains trained at once on the CPU, each in a process of its own "
                        "with one thread, at most one per core")
    s.add_argument("--from-end", action="store_true",
                   help="train the missing retrains last to first: a second process sharing "
                        "the ledger with a first one (on another machine, or started later)")
    s.add_argument("--retrains-only", action="store_true",
                   help="train only the named rungs' retrains that need no trained model (the "
                        "LDS, the removal test's random and full-set retrains and its pinned "
                        "sets) into their ledgers; no probe, no budget, no result file")
    return parser


def _options(parser, args, run, queries) -> dict:
    """``rl.attribute``'s keyword arguments from ``args``, each checked against the run with
    the library's own validation; a bad value is a parser error naming its option."""
    def check(flag, fn):
        try:
            return fn()
        except (OSError, TypeError, ValueError) as err:
            parser.error(f"{flag}: {err}")

    n_t = run.scheduler.config.num_train_timesteps
    grid = check("--timesteps", lambda: parse_timesteps(args.timesteps, n_t))
    check("--n-noise", lambda: validation.n_noise(args.n_noise))
    check("--checkpoints", lambda: validation.checkpoints(args.checkpoints,
                                                          len(run.checkpoints)))
    check("--chunk-size", lambda: validation.chunk_size(args.chunk_size))
    check("--projection", lambda: projection_size(args.projection, args.projection_seed))
    device = args.device or validation.default_device()
    check("--device", lambda: validation.device(device))
    options = dict(
        checkpoints=args.checkpoints, timesteps=args.timesteps, n_noise=args.n_noise,
        noise_seed=args.noise_seed, train_side=args.train_side, normalization=args.normalization,
        chunk_size=args.chunk_size, device=device, engine=args.engine,
        allow_out_of_range=args.allow_out_of_range)
    if args.loss is not None:
        options["loss"] = args.loss
    if args.noise_per_query:
        options["noise_per_query"] = True
    if args.projection is not None:
        options.update(projection=args.projection, projection_seed=args.projection_seed)
    if args.query_noise is not None:
        dtype = run.data.images.dtype
        options["query_noise"] = check("--query-noise", lambda: validation.query_noise(
            load_tensor(args.query_noise, "query_noise", "[K, *sample] or [T', K, *sample]"),
            len(grid), run.data.sample_shape, dtype))
    check("--engine", lambda: attribution.engine_name(args.engine, run.model_at(0)))
    return options


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "study":
        return study_command(parser, args)

    if args.out.exists():
        parser.error(f"--out {args.out} exists already; choose a new folder (a result is never "
                     "overwritten).")
    unwritable = cache.writable(args.out.parent)
    if unwritable:
        parser.error(f"--out {args.out}: its folder {args.out.parent} cannot be written to "
                     f"({unwritable}); choose a --out in a writable folder.")
    try:
        run = recorder.load(args.run)
    except (OSError, ValueError, CacheError) as err:
        parser.error(f"RUN: {err}")
    try:
        run = run.with_weights(args.weights)
    except ValueError as err:
        parser.error(f"--weights: {err}")
    try:
        queries = load_queries(args.queries, run.data.sample_shape)
        if not args.allow_out_of_range:
            validation.data_range(queries, run.data.images, "queries",
                                  opt_out="--allow-out-of-range")
    except (OSError, ValueError) as err:
        parser.error(f"QUERIES: {err}")
    options = _options(parser, args, run, queries)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.projection is not None and args.shard == "train":
        parser.error("--projection sketches the whole training set, so it cannot be split with "
                     "--shard train: run one process or pass --shard queries.")
    if world > 1 and args.noise_per_query and args.shard == "queries":
        parser.error("--noise-per-query draws each query's noise from its position in the "
                     "query batch, so it needs --shard train under torchrun.")
    if args.dry_run:
        estimate = attribution.estimate(run, queries, args.method, **options)
        print(f"dry run: {len(queries)} queries x {len(run.data)} training samples; nothing "
              "computed or written")
        print(estimate.describe())
        if world > 1:
            print(f"under torchrun each of the {world} processes computes the query side and "
                  f"~1/{world} of the training side (--shard train)")
        return 0
    is_distributed = distributed.init()
    rank = torch.distributed.get_rank() if is_distributed else 0
    result = distributed.attribute(run, queries, args.method, shard=args.shard,
                                   progress=rank == 0, **options)
    status = 0
    if rank == 0:
        saved = save_or_rescue(result, args.out,
                               {"run": str(args.run), "queries": str(args.queries),
                                "weights": args.weights})
        status = 0 if saved == args.out else 1
        print(f"{args.method} scores {tuple(result.scores.shape)} in {result.seconds:.1f} s "
              f"-> {saved}")
    if is_distributed:
        torch.distributed.destroy_process_group()
    return status


def study_command(parser, args) -> int:
    """``python -m retrac_lib study``: probe, estimate and plan every rung, then run the plan."""
    from .evaluation import study   # evaluation, imported only for this command

    ladder = study.ladder()
    names = [r.name for r in ladder]
    unknown = [n for n in args.rungs if n not in names]
    if unknown:
        parser.error(f"unknown rung {', '.join(map(repr, unknown))}; the ladder has "
                     f"{', '.join(names)}.")
    if not args.budget_minutes >= 0:
        parser.error(f"--budget-minutes must be >= 0, got {args.budget_minutes}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available here; use --device cpu.")
    if args.ensemble_size is not None and args.ensemble_size < 1:
        parser.error(f"--ensemble-size must be >= 1, got {args.ensemble_size}.")
    size = study.ensemble_size_for(args.device, args.ensemble_size)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}.")
    if args.workers > 1 and (args.device != "cpu" or size > 1):
        parser.error("--workers trains single retrains in parallel CPU processes; with "
                     "--device cuda or --ensemble-size > 1 the retrains train in ensembles "
                     "instead: leave --workers at 1.")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.workers > cores:
        parser.error(f"--workers {args.workers} exceeds the {cores} cores this process may "
                     "use: each worker needs a core of its own.")
    selected = [r for r in ladder if not args.rungs or r.name in args.rungs]
    out = args.out or study.RESULTS
    if args.retrains_only:
        if not args.rungs or args.estimate_only:
            parser.error("--retrains-only trains the retrains of the rungs named (e.g. "
                         "'study n3750 --retrains-only'); name them, without --estimate-only.")
        for r in selected:
            print(study.train_retrains(r, device=args.device, ledger=study.ledger_path(r, out),
                                       ensemble_size=size, from_end=args.from_end,
                                       workers=args.workers))
        return 0
    estimates, parts, probes = {}, {}, {}
    print(f"probes and estimates ({'smoke' if ladder[0].smoke else 'full'} protocol):")
    for r in ladder:
        probe = probes[r.name] = study.measure_cost(r, device=args.device, ensemble_size=size,
                                                    workers=args.workers)
        stored = study.stored_retrains(study.ledger_path(r, out), r, args.device, size)
        estimate = study.estimate_seconds(r, probe, stored)
        estimates[r.name], parts[r.name] = estimate["total"], estimate
        print("  " + study.describe_cost(r, probe, estimate, stored)
              + ("" if r in selected else "  [not selected]"))
    chosen, skipped = study.plan(selected, args.budget_minutes, estimates)
    verb = "would run" if args.estimate_only else "runs"
    print(f"budget {args.budget_minutes:g} min: {verb} "
          f"{', '.join(r.name for r in chosen) or 'nothing'}")
    cache_root = rl_config.cache_dir()
    free = shutil.disk_usage(_existing_parent(cache_root)).free
    need = sum(study.estimate_cache_bytes(r, probes[r.name]) for r in chosen)
    if need > free:
        print(f"warning: the chosen rungs may need up to {need / 2 ** 30:.1f} GiB of cache in "
              f"{cache_root}, which has {free / 2 ** 30:.1f} GiB free; set RETRAC_CACHE to a "
              "larger disk.")
    if not args.estimate_only:
        for r in chosen:
            estimate = {k: round(v, 1) for k, v in parts[r.name].items()}
            write = lambda part: study.write_result({**part, "estimate_seconds": estimate}, out)
            path = write(study.run_rung(r, device=args.device, ledger=study.ledger_path(r, out),
                                        on_part=write, ensemble_size=size,
                                        from_end=args.from_end, workers=args.workers))
            print(f"{r.label}: written to {path}")
    for r in skipped:
        print(f"{r.label}: not run (estimated {study.format_seconds(estimates[r.name])}, "
              f"over the budget)")
    return 0


def _existing_parent(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path
