"""One validation layer for the options the public functions share.

``rl.attribute``, ``rl.per_sample_grads`` / ``grouped_grads``, ``sketch_training``, the
diagnostics and the counterfactual functions all take some of the same arguments: a chunk size,
a timestep grid, sample and checkpoint indices, a number of noise draws, query images and noise, a device.
Each is checked here, once, so bad input gets the same clear error everywhere: a ``TypeError``
when the argument has the wrong type (``n_noise=1.5``, a numpy array, integer images) and a
``ValueError`` when its value is out of range (``chunk_size=-1``, duplicate timesteps), each
naming the argument and saying what to pass instead. Nothing is silently coerced: ``2.5``
timesteps is an error, not 2.

A leaf module: it imports nothing from ``retrac_lib``.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings

import torch


def integer(value, name: str, minimum: int | None = None, why: str = "") -> int:
    """``value`` as an ``int``; ``TypeError`` unless it is an integer (bool and 2.0 are not),
    ``ValueError`` when it is below ``minimum``; ``why`` ends that message."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.dtype.is_floating_point \
            and value.dtype not in (torch.bool, torch.complex64, torch.complex128):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}. {why}".rstrip())
    return value


def chunk_size(value, name: str = "chunk_size") -> int:
    """A positive batch size for chunked gradient and loss computations."""
    return integer(value, name, 1, why=f"It counts the samples in one batched call, so {name} "
                                        "must be at least 1; lower it to save memory.")


def n_noise(value, name: str = "n_noise") -> int:
    """A positive number of noise draws per timestep."""
    return integer(value, name, 1, why="It counts the noise draws averaged per timestep.")


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def grid_memory(n_timesteps: int, n_noise: int, sample_shape, n_queries: int = 1,
                available: int | None = None) -> int:
    """The bytes of a query grid's float32 noise [Q, T', K, *sample]; refuse a grid that needs
    more than half of ``available`` (default: this machine's memory), naming its sizes."""
    need = 4 * n_queries * n_timesteps * n_noise * math.prod(sample_shape)
    available = memory_bytes() if available is None else available
    if available and need > available // 2:
        per = f"{n_queries} queries x " if n_queries > 1 else ""
        raise ValueError(
            f"The query grid of {per}{n_timesteps} timesteps x {n_noise} noise draws needs "
            f"{need / 2**30:.1f} GiB for its noise alone ({per}{n_timesteps} x {n_noise} x "
            f"{'x'.join(map(str, sample_shape))} float32), more than half of this machine's "
            f"{available / 2**30:.1f} GiB. Use fewer timesteps or a smaller n_noise (the book "
            "uses 100 x 16 at most).")
    return need


def real(value, name: str, positive: bool = False) -> float:
    """A finite real number (``TypeError`` for strings, bools, tensors of several values)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}.")
    if positive and not value > 0:
        raise ValueError(f"{name} must be positive, got {value}.")
    return value


def flag(value, name: str) -> bool:
    """A bool; strings such as ``"no"`` are refused rather than read as True."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def choice(value, name: str, choices) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def tensor(value, name: str) -> torch.Tensor:
    """``value`` itself when it is a ``torch.Tensor``; a ``TypeError`` saying how to convert otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}; "
                        f"convert it with torch.as_tensor({name}, dtype=torch.float32).")
    return value


def tensors(**named) -> None:
    """``tensor`` for several named arguments at once."""
    for name, value in named.items():
        tensor(value, name)


def float_samples(x, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images or points as a floating-point tensor (of ``dtype`` when given).

    Integer images are refused: diffusers' ``add_noise`` casts the noise schedule to the sample
    dtype, so an integer batch would be replaced by pure noise without any error.
    """
    x = tensor(x, name)
    verb = "have" if name.endswith("s") else "has"
    if not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} {verb} dtype {x.dtype}, but images and points must be floating point in the "
            f"data's range ([-1, 1] for images): convert them first, e.g. {name}.float() / 127.5 - 1 "
            f"for 0..255 pixels (an integer batch would be noised into pure noise)."
        )
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} {verb} dtype {x.dtype} but the model computes in {dtype}; "
                         f"pass {name}.to({dtype}).")
    return x


def finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse NaN or infinite values."""
    if x.numel() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; pass finite numbers.")
    return x


RANGE_TOLERANCE = 0.05  # of the data's range: diffusers' samplers clip to it, so these pass


class OutOfRangeWarning(UserWarning):
    """Queries lie outside the training data's range and were scored anyway, as asked."""


def data_range(x: torch.Tensor, data: torch.Tensor, name: str = "queries", allow: bool = False,
               opt_out: str = "allow_out_of_range=True") -> None:
    """Refuse ``x`` on another scale than the training ``data``: values beyond the data's
    [min, max] by more than ``RANGE_TOLERANCE`` of its range (pixels in 0..255 on a [-1, 1]
    run), or images none of whose values lie in the lower half of it ([0, 1] images on a
    [-1, 1] run). Generated samples that diffusers clips to [-1, 1] pass; NaN and inf are left
    to the callers that name the sample. ``allow`` (the caller's ``opt_out``) warns instead."""
    x, data = x.detach(), data.detach()
    x = x[torch.isfinite(x)]
    if not x.numel() or not data.numel():
        return
    lo, hi, q_lo, q_hi = (float(v) for v in (data.min(), data.max(), x.min(), x.max()))
    tol = RANGE_TOLERANCE * (hi - lo)
    beyond = q_lo < lo - tol or q_hi > hi + tol
    raised = data.ndim > 2 and q_lo > (lo + hi) / 2 - tol   # images: data.ndim counts the batch
    if not (beyond or raised):
        return
    found = (f"{name} lie in [{q_lo:.3g}, {q_hi:.3g}] but the run was trained on data in "
             f"[{lo:.3g}, {hi:.3g}]")
    fix = (f"scale {name} like the training data (on a [-1, 1] run, {name} * 2 - 1 for [0, 1] "
           f"images, {name} / 127.5 - 1 for 0..255 pixels)")
    if not allow:
        raise ValueError(f"{found}: {fix}, or pass {opt_out} to score them as they are.")
    warnings.warn(f"{found}; scoring them as they are ({opt_out}). To compare like with like, "
                  f"{fix}.", OutOfRangeWarning, stacklevel=5)


def timesteps(value, num_train_timesteps: int) -> int | list[int]:
    """A timestep grid spec: a count of evenly spaced timesteps (an ``int``) or a list of
    distinct integer timesteps in ``[0, T)``."""
    top = num_train_timesteps
    if isinstance(value, numbers.Number) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        count = integer(value, "timesteps", 1, why="Pass a positive number of grid points or a list.")
        if count > top - 1:
            raise ValueError(f"timesteps={count} evenly spaced points do not fit in [1, {top - 1}] "
                             f"without repeats; pass at most {top - 1} or an explicit list.")
        return count
    if isinstance(value, (str, bytes)):
        raise TypeError(f"timesteps must be a number of grid points (an int) or a list of integer "
                        f"timesteps, got {value!r}.")
    try:
        grid = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"timesteps must be an int or a list of integer timesteps; got {value!r} ({err}).") from err
    if grid.dtype.is_floating_point or grid.dtype.is_complex or grid.dtype == torch.bool:
        shown = value if isinstance(value, (list, tuple)) else grid.tolist()
        raise TypeError(f"timesteps must be integers (they index the noise schedule); got "
                        f"{shown}. Round them yourself if that is what you mean.")
    if grid.ndim != 1 or len(grid) == 0 or grid.min() < 0 or grid.max() >= top:
        raise ValueError(f"timesteps must be a non-empty list in [0, {top}) (or a count); got "
                         f"{grid.tolist()}.")
    values = grid.tolist()
    repeated = sorted({t for t in values if values.count(t) > 1})
    if repeated:
        raise ValueError(f"timesteps {repeated} appear more than once; each grid timestep is "
                         "averaged once, so list each only once.")
    return values


def indices(value, n: int | None, name: str = "indices") -> torch.Tensor:
    """Sample indices in [0, n) (``n=None``: any index >= 0) as a long tensor [k]; a single int
    counts as one index.

    Floats, boolean masks and indices outside [0, n) are refused, never cast or wrapped."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be integer sample indices, got {value!r}.")
    try:
        idx = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be integer sample indices (a list, range or integer "
                        f"tensor), got {type(value).__name__} ({err}).") from err
    if idx.numel() == 0:                    # [] is float32 to torch: no indices, not floats
        return idx.reshape(0).long()
    if idx.dtype == torch.bool:
        raise TypeError(f"{name} is a boolean mask; pass the indices it selects, "
                        f"mask.nonzero().flatten().")
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise TypeError(f"{name} must be integers, got {idx.dtype} values; indices are never "
                        "rounded, so convert them yourself if they are whole numbers.")
    idx = idx.reshape(-1).long()
    outside = idx[(idx < 0) | (idx >= n)] if n is not None else idx[idx < 0]
    if len(outside):
        size = f"[0, {n}): there are {n} samples" if n is not None else "the samples (>= 0)"
        raise ValueError(f"{name} {outside[:5].tolist()} lie outside {size} (negative indices "
                         "are not counted from the end here).")
    return idx


def checkpoints(value, n_checkpoints: int) -> tuple[int, ...]:
    """Distinct checkpoint indices (negative from the end) as non-negative ints; None = all."""
    if value is None:
        return tuple(range(n_checkpoints))
    if isinstance(value, (str, bytes, numbers.Number)) or (isinstance(value, torch.Tensor) and value.ndim == 0):
        raise TypeError(f"checkpoints must be a list of checkpoint indices (e.g. [{value!r}]) or "
                        f"None for all; got {value!r}.")
    items = [integer(c, "checkpoints entry") for c in value]
    missing = [c for c in items if not -n_checkpoints <= c < n_checkpoints]
    if missing or not items:
        raise ValueError(f"Checkpoints {missing or '[]'} do not exist: the run has checkpoints "
                         f"0..{n_checkpoints - 1} (or negative from the end).")
    resolved = [c % n_checkpoints for c in items]
    repeated = sorted({c for c in resolved if resolved.count(c) > 1})
    if repeated:
        raise ValueError(f"checkpoints {items} name checkpoint(s) {repeated} more than once; "
                         "each checkpoint is summed once, so list each only once.")
    return tuple(resolved)


def default_device() -> str:
    """Where to compute when nobody says: ``cuda:<LOCAL_RANK>`` with a GPU (``cuda:0`` outside
    ``torchrun``; a Colab GPU runtime), else the CPU. The chapters' attribution and
    ``python -m retrac_lib`` use it; training stays on the CPU, so a run is the same run on
    either, and scores agree with the CPU's to float32 tolerance."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def device(value) -> torch.device:
    """A device that can hold data and is present on this machine (None = the CPU)."""
    if value is None:
        return torch.device("cpu")
    try:
        dev = torch.device(value)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"device={value!r} is not a device; pass 'cpu' or 'cuda' ({err}).") from err
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data, so nothing can be computed there; "
                         "pass 'cpu' or 'cuda'.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={value!r}: no CUDA GPU is available here; pass 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={value!r}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s).")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={value!r}: MPS is not available here; pass 'cpu'.")
    return dev


def query_noise(noise, n_timesteps: int, sample_shape, dtype: torch.dtype) -> torch.Tensor:
    """Explicit query noise [K, *sample] or [T', K, *sample] with K >= 1, as [T', K, *sample]."""
    noise = float_samples(noise, "query_noise", dtype)
    shape, sample = tuple(noise.shape), tuple(sample_shape)
    dims = ", ".join(map(str, sample))
    if shape[1:] == sample:
        noise = noise.expand(n_timesteps, *shape)
    elif not (len(shape) == len(sample) + 2 and shape[0] == n_timesteps and shape[2:] == sample):
        raise ValueError(f"query_noise has shape {shape}; expected [K, {dims}] or "
                         f"[{n_timesteps} timesteps, K, {dims}].")
    if noise.shape[1] == 0:
        raise ValueError(f"query_noise has shape {shape}: K = 0 noise draws. Pass at least one "
                         f"draw, [K, {dims}] with K >= 1.")
    return finite(noise, "query_noise")
