"""Checks for the exercises: compare an answer with a reference and say what is off.

The code exercises call them as self-checks, and the autograder's public and hidden tests (written
in each chapter's test cells, see the instructors' page) call them on inputs the student did not
see. A check prints one line when the answer is right and raises ``AssertionError`` with a
diagnosis when it is not: wrong shape (transposed, summed over the batch, a dict instead of flat
rows), wrong sign, off by a constant factor (the ratio is printed), the wrong loss, a clean instead
of a noised input, rows in the wrong order.

    from retrac_lib.book import checks
    checks.check_per_sample_grads(my_per_sample_grads)        # per-sample gradients
    checks.check_scores(my_scores, res.scores)                 # attribution scores, chapters 3-5
    checks.check_unit_rows(my_normalize)                       # ReTrac's normalization, chapter 4
    checks.check_alphas_bar(my_alphas_bar, 1e-4, 0.02, 1000)   # the noise schedule, chapter 1
    checks.check_tensor("name", my_tensor, reference_tensor)   # anything else
    checks.refuse_calls(my_function, "attribute")              # "by hand" means without rl.attribute
"""
from __future__ import annotations

import math

import torch

from .. import seeding
from ..config import TrainConfig
from ..grads import per_sample_grads
from ..losses import add_noise, error_loss
from ..models import build_model, build_scheduler
from ..ranking import spearman, top_k_overlap


def _fail(name: str, *lines: str) -> None:
    raise AssertionError(f"{name}: " + "\n  ".join(lines))


def _ok(name: str, what: str) -> None:
    print(f"\N{CHECK MARK} {name}: {what}")


def _as_tensor(name: str, value, what: str = "your answer") -> torch.Tensor:
    if isinstance(value, dict):
        _fail(name, f"{what} is a dict; expected one tensor.",
              "Flatten per-parameter gradients into rows: "
              "torch.cat([g.flatten(1) for g in grads.values()], dim=1).")
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        _fail(name, f"{what} is a {type(value).__name__} of {len(value)} tensors; expected one "
              "tensor. Stack the rows: torch.stack(rows).")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        hint = " Did you replace the `...` and return the result?" if value is None else ""
        _fail(name, f"{what} is a {type(value).__name__}, not a tensor or array.{hint}")
    return tensor.detach().to("cpu", torch.float64)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = a.norm() * b.norm()
    return float((a.flatten() @ b.flatten()) / denom) if denom > 0 else float("nan")


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    """Least-squares factor r with a ~ r * b."""
    denom = float(b.flatten() @ b.flatten())
    return float(a.flatten() @ b.flatten()) / denom if denom > 0 else float("nan")


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=atol + rtol * scale))


def check_tensor(name: str, answer, expected, rtol: float = 1e-4, atol: float = 1e-8,
                 alternatives: dict | None = None) -> None:
    """Compare ``answer`` with ``expected``; raise ``AssertionError`` saying what is off.

    ``alternatives`` maps a diagnosis ("you used the L1 loss") to the tensor a typical mistake
    produces; a match names the mistake. Otherwise the message reports shape, sign, a constant
    factor or the largest difference.
    """
    expected = _as_tensor(name, expected, "the reference")
    answer = _as_tensor(name, answer)
    if answer.shape != expected.shape:
        hints = [f"shape {tuple(answer.shape)}, expected {tuple(expected.shape)}."]
        if answer.ndim == 2 and answer.shape == expected.shape[::-1]:
            hints.append("It looks transposed: swap the two dimensions.")
        elif answer.numel() == expected.numel():
            hints.append("Same number of entries: reshape or transpose, do not change the values.")
        elif expected.ndim == 2 and answer.ndim == 1 and len(answer) == expected.shape[1]:
            hints.append(f"One row for the whole batch: expected one row per item "
                         f"({expected.shape[0]} rows). Did you sum or average over the batch?")
        _fail(name, *hints)
    if not torch.isfinite(answer).all():
        bad = int((~torch.isfinite(answer)).sum())
        _fail(name, f"{bad} of {answer.numel()} entries are NaN or infinite "
              "(a division by a zero norm?).")
    if _close(answer, expected, rtol, atol):
        return
    for diagnosis, wrong in (alternatives or {}).items():
        wrong = _as_tensor(name, wrong, "the alternative")
        if wrong.shape == answer.shape and _close(answer, wrong, max(rtol, 1e-3), atol):
            _fail(name, f"values differ from the reference: {diagnosis}")
    cos = _cosine(answer, expected)
    ratio = _ratio(answer, expected)
    err = float((answer - expected).abs().max())
    if cos < -0.9999:
        _fail(name, f"wrong sign: your answer is {ratio:.4g} times the reference "
              "(a minus sign, or a - b instead of b - a?).")
    if cos > 0.9999:
        _fail(name, f"right direction, off by a factor of {ratio:.4g} "
              "(a missing or extra constant: a mean instead of a sum, a learning rate, a 2?).")
    if answer.ndim >= 2 and len(answer) > 1:
        rows = [int(torch.cdist(answer[i].flatten()[None], expected.flatten(1)).argmin())
                for i in range(len(answer))]
        if sorted(rows) == list(range(len(answer))) and rows != list(range(len(answer))):
            _fail(name, f"the rows are right but in the wrong order: your row i matches "
                  f"reference row {rows}.")
    _fail(name, f"values differ: largest difference {err:.3g} (reference values up to "
          f"{float(expected.abs().max()):.3g}); cosine with the reference {cos:.4f}, "
          f"best-fitting factor {ratio:.4g}.")


def _names_used(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_used(const)
    return names


def refuse_calls(fn, *names: str) -> None:
    """Fail when function ``fn`` refers to any of ``names`` (a global or an attribute, in its own
    body or a nested function's): an exercise that asks for a computation by hand must not call
    the library function that does it."""
    if not callable(fn) or not hasattr(fn, "__code__"):
        _fail("refuse_calls", f"expected a function written in the notebook; got "
              f"{type(fn).__name__}.")
    used = sorted(_names_used(fn.__code__) & set(names))
    if used:
        _fail(fn.__name__, f"it calls {', '.join(used)}, which computes the answer; this exercise "
              "asks you to compute it yourself from the pieces the exercise names.")


def check_alphas_bar(fn, beta_start: float = 1e-4, beta_end: float = 0.02, T: int = 1000) -> None:
    """Check ``fn(beta_start, beta_end, T)``, the cumulative products of ``1 - beta`` of a linear
    schedule, against diffusers' ``DDPMScheduler(...).alphas_cumprod`` (chapter 1)."""
    from diffusers import DDPMScheduler

    name = "check_alphas_bar"
    expected = DDPMScheduler(num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule="linear").alphas_cumprod
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    check_tensor(name, fn(beta_start, beta_end, T), expected, rtol=1e-5, alternatives={
        "you took the cumulative product of beta; alpha_bar is the product of 1 - beta.":
            torch.cumprod(betas, 0),
        "you summed the betas (1 - cumsum(beta)); alpha_bar is a product, torch.cumprod(1 - beta).":
            1 - torch.cumsum(betas, 0),
        "the betas miss their last value: torch.linspace includes both ends, with T values.":
            torch.cumprod(1 - torch.linspace(beta_start, beta_end, T + 1, dtype=torch.float64)[:-1], 0),
        "you returned 1 - beta without the cumulative product.": 1 - betas,
    })
    _ok(name, f"matches DDPMScheduler's alphas_cumprod (beta {beta_start:g} to {beta_end:g}, "
        f"T = {T}).")


def tiny_batch(model: str = "unet", n: int = 4, seed: int = 0):
    """A small seeded model, scheduler and batch ``(x, t, noise)`` for checks and exercises."""
    from ..data import digits, moons

    if model == "unet":
        config = TrainConfig(block_out_channels=(8, 16), norm_num_groups=8, seed=seed)
        x = digits("train").images[:n]
    else:
        config = TrainConfig(model="mlp", clip_sample=False, mlp_hidden=16, mlp_layers=2, seed=seed)
        x = moons(n=max(n, 8)).images[:n]
    net = build_model(config, tuple(x.shape[1:]))
    gen = seeding.generator(seed)
    t = torch.linspace(5, config.num_train_timesteps - 5, n).long()
    noise = torch.randn(x.shape, generator=gen)
    return net, build_scheduler(config), x, t, noise


def _grads_of(model, scheduler, x_in, t, target, loss, reduce=None):
    """Per-sample gradients of a (possibly wrong) loss: the typical mistakes, made on purpose."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x_in)):
        err = model(x_in[i:i + 1], t[i:i + 1]).sample - target[i:i + 1]
        err = err.square() if loss == "mse" else err.abs()
        value = err.sum() if reduce == "sum" else err.mean()
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(value, params)]))
    return torch.stack(rows)


def check_per_sample_grads(fn, loss: str = "mse", model: str = "unet", seed: int = 0) -> None:
    """Check a per-sample gradient function against ``rl.per_sample_grads``.

    ``fn(model, scheduler, x, t, noise)`` (called with ``loss=...`` when ``loss`` is not "mse")
    must return the [B, P] matrix whose row i is the gradient of sample i's DDPM loss
    ``mean |eps_theta(x_t, t) - eps|^p`` at its own timestep and noise; ``model`` ("unet" or "mlp")
    and ``seed`` choose the tiny seeded network and batch.
    """
    name = "check_per_sample_grads"
    net, scheduler, x, t, noise = tiny_batch(model, seed=seed)
    expected = per_sample_grads(net, scheduler, x, t, noise, loss=loss)
    answer = fn(net, scheduler, x, t, noise) if loss == "mse" else fn(
        net, scheduler, x, t, noise, loss=loss)
    x_t = add_noise(scheduler, x, t, noise)
    other = "l1" if loss == "mse" else "mse"
    n_el = x[0].numel()
    batch_grad = torch.autograd.grad(
        error_loss(net(x_t, t).sample, noise, loss).mean(),
        [p for p in net.parameters() if p.requires_grad])
    batch_row = torch.cat([g.flatten() for g in batch_grad])
    alternatives = {
        f"you used the {other.upper()} loss; this run's loss is {loss.upper()}.":
            _grads_of(net, scheduler, x_t, t, noise, other),
        "the model got the clean sample x; noise it first: x_t = scheduler.add_noise(x, noise, t).":
            _grads_of(net, scheduler, x, t, noise, loss),
        "the target is the clean sample; the DDPM loss compares the prediction with the noise.":
            _grads_of(net, scheduler, x_t, t, x, loss),
        f"you summed the error over the {n_el} entries of a sample; the loss takes their mean.":
            _grads_of(net, scheduler, x_t, t, noise, loss, reduce="sum"),
        "every sample used the first sample's timestep; use each sample's own t[i].":
            _grads_of(net, scheduler, add_noise(scheduler, x, t[:1].expand(len(t)), noise),
                      t[:1].expand(len(t)), noise, loss),
        "every row is the gradient of the whole batch's mean loss; take one sample at a time.":
            batch_row.expand(len(x), -1),
        f"each row is divided by the batch size ({len(x)}): take the gradient of the sample's "
        "own loss, not of the batch mean.": expected / len(x),
    }
    check_tensor(name, answer, expected, rtol=1e-3, atol=1e-7, alternatives=alternatives)
    _ok(name, f"matches rl.per_sample_grads on a {len(x)}-sample batch "
        f"({expected.shape[1]:,} parameters, timesteps {t.tolist()}).")


def check_scores(answer, reference, k: int = 10, rtol: float = 1e-3,
                 min_rank_correlation: float = 0.999, scale_matters: bool = True) -> None:
    """Check attribution scores [Q, N] (queries x training samples) against a reference.

    Passes when the values agree (``scale_matters``) or, with ``scale_matters=False``, when every
    query ranks the training samples the same way. Otherwise the message says whether the scores
    are transposed, flipped in sign, off by a factor (with the ratio) or ranked differently (rank
    correlation and top-k overlap per query).
    """
    name = "check_scores"
    ref = _as_tensor(name, reference, "the reference")
    ans = _as_tensor(name, answer)
    if ref.ndim == 1:
        ref, ans = ref[None], ans[None] if ans.ndim == 1 else ans
    if ans.shape != ref.shape:
        q, n = ref.shape
        hint = (" It looks transposed: scores are [queries, training samples]."
                if ans.shape == ref.shape[::-1] else "")
        _fail(name, f"shape {tuple(ans.shape)}, expected {tuple(ref.shape)} "
              f"({q} queries x {n} training samples).{hint}")
    if not torch.isfinite(ans).all():
        _fail(name, f"{int((~torch.isfinite(ans)).sum())} scores are NaN or infinite "
              "(a division by a zero gradient norm?).")
    if scale_matters and _close(ans, ref, rtol, 1e-12):
        _ok(name, f"scores match the reference ({ref.shape[0]} queries x {ref.shape[1]} samples).")
        return
    rho = spearman(ans, ref)
    overlap = top_k_overlap(ans, ref, k)
    if bool((rho >= min_rank_correlation).all()):
        ratio = _ratio(ans, ref)
        if not scale_matters:
            _ok(name, f"every query ranks the training samples like the reference "
                f"(rank correlation >= {float(rho.min()):.4f}).")
            return
        ratios = [_ratio(a, r) for a, r in zip(ans, ref)]
        per_query = max(ratios) - min(ratios) > 1e-3 * max(abs(r) for r in ratios)
        _fail(name, "the ranking is right but the values are off by a factor of "
              f"{ratio:.4g}" + (" (different per query: "
              f"{', '.join(f'{r:.3g}' for r in ratios[:5])}{', ...' if len(ratios) > 5 else ''})"
              if per_query else "") + ". A missing checkpoint weight (learning rate), a missing "
              "1/|T'| average, or a norm that should (not) be there?")
    if bool((rho <= -min_rank_correlation).all()):
        _fail(name, "the ranking is reversed (rank correlation "
              f"{float(rho.mean()):.4f}): a sign error, or ascending instead of descending order.")
    worst = int(rho.argmin())
    _fail(name, f"the ranking differs from the reference: rank correlation per query "
          f"{float(rho.mean()):.3f} on average (worst {float(rho[worst]):.3f}, query {worst}); "
          f"top-{k} overlap {float(overlap.mean()):.0%} on average.")


def check_unit_rows(fn) -> None:
    """Check a function that scales every row of a [N, P] matrix to unit length (chapter 4).

    ``fn(G)`` must return ``G[i] / |G[i]|`` for each row, leaving all-zero rows at zero (no NaN).
    """
    name = "check_unit_rows"
    gen = seeding.generator(0)
    g = torch.randn(5, 7, generator=gen, dtype=torch.float64) * torch.tensor(
        [[0.01], [1.0], [30.0], [2.0], [0.5]], dtype=torch.float64)
    g_zero = torch.cat([g, torch.zeros(1, 7, dtype=torch.float64)])
    expected = g / g.norm(dim=1, keepdim=True)
    answer = fn(g.clone())
    check_tensor(name, answer, expected, rtol=1e-6, alternatives={
        "you normalized the columns; normalize each row (dim=1).": g / g.norm(dim=0, keepdim=True),
        "you divided by the squared norm; divide by the norm itself.":
            g / g.square().sum(1, keepdim=True),
        "you divided every row by the norm of the whole matrix; use each row's own norm.":
            g / g.norm(),
    })
    zero = _as_tensor(name, fn(g_zero.clone()))
    if not torch.isfinite(zero).all():
        _fail(name, "an all-zero row became NaN: guard the division, e.g. "
              "G / G.norm(dim=1, keepdim=True).clamp_min(1e-12).")
    if not math.isclose(float(zero[-1].abs().sum()), 0.0, abs_tol=1e-12):
        _fail(name, "an all-zero row must stay zero.")
    _ok(name, "every row has unit length, zero rows stay zero.")
