"""Attribution without per-sample gradient rows: "ghost" dot products and norms (chapter 7).

A linear layer ``y_p = W a_p + b`` applied at positions ``p`` (one position for a vector input;
every output pixel of a convolution, once its input is unfolded into patches) has, for one
sample, the weight gradient ``dW = sum_p b_p a_p^T`` with ``b_p = dl/dy_p``: a sum of outer
products of the layer's input activations and output gradients. One ordinary batched backward
pass yields both factors for every sample at once (forward hooks keep ``a``; ``b`` is the
gradient of the summed loss with respect to the layer's output, and samples do not interact).
That is all that TracIn's ``<g_i, v>`` and ReTrac's ``|g_i|`` need. Per layer the engine takes
the cheaper of two exact routes (``route``):

* "materialize": form the layer's per-group block ``dW`` with one batched matmul (the FLOPs of the
  ordinary weight gradient), then dot and square it. Only one layer's blocks exist at a time,
  never a row of all P parameters.
* "factor": never form ``dW``: ``|dW|^2 = sum_{p,q} <a_p, a_q><b_p, b_q>`` (Gram matrices over
  positions) and ``<dW, V> = sum_p b_p^T V a_p``. Cheaper when a group has few positions.

GroupNorm's per-channel scale and shift gradients (``sum_p b_p * xhat_p`` and ``sum_p b_p``)
are small and always materialized; biases likewise. For the book's UNet every convolution takes
the materialize route and its time-embedding layers (one position per sample) the factor route;
the MLP's layers all take the factor route on the training side (``plan`` prints the choice).

Draws come in groups (``x`` is [G, M, *sample]); each group's gradient is that of its mean loss,
as in ``grads.grouped_grads``, which stays the readable reference (``engine="func"``). Covered
layers: ``nn.Linear``, ``nn.Conv2d`` (groups=1, numeric zero padding) and ``nn.GroupNorm``; a
model with any other trainable layer raises ``NotImplementedError`` naming it
(``rl.attribute(engine="auto")`` then falls back to ``torch.func``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .grads import check_batch, grouped_grads
from .losses import add_noise, check_loss, error_loss

SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def _own_trainable(module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


def unsupported_layers(model) -> list[str]:
    """``"name (Type)"`` of every module with trainable parameters that the engine cannot split."""
    bad = []
    for name, m in model.named_modules():
        if not _own_trainable(m):
            continue
        conv_ok = type(m) is not nn.Conv2d or (
            m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str))
        if type(m) not in SUPPORTED or not conv_ok:
            bad.append(f"{name or '<model>'} ({type(m).__name__})")
    return bad


def check_supported(model) -> None:
    """Raise ``NotImplementedError`` naming the layers the ghost engine does not cover."""
    bad = unsupported_layers(model)
    if bad:
        raise NotImplementedError(
            f"The ghost engine cannot take apart {', '.join(bad)}: it covers nn.Linear, nn.Conv2d "
            "(groups=1, numeric zero padding) and nn.GroupNorm. Use engine='func' (torch.func) "
            "for this model.")


def route(positions: int, d_in: int, d_out: int, n_vectors: int) -> str:
    """"factor" or "materialize": the cheaper exact route for one layer (multiply-adds per group).

    ``positions`` counts a group's positions (draws x pixels), ``n_vectors`` the vectors each
    group gradient is dotted with, plus one for a weighted sum (the query side).
    Materialize: the block (positions x d_in x d_out), then its norm and dots (per vector
    d_in x d_out). Factor: two Gram matrices (positions^2 x (d_in + d_out)) and, per vector,
    ``sum_p b_p^T V a_p`` (positions x d_in x d_out).
    """
    dense = positions * d_in * d_out + (n_vectors + 1) * d_in * d_out
    factor = positions ** 2 * (d_in + d_out + 1) + n_vectors * positions * d_in * d_out
    return "factor" if factor < dense else "materialize"


class _Layer:
    """One parametrized layer's factors for a chunk of draws: input ``a`` and output gradient ``b``."""

    def __init__(self, name, module):
        self.name, self.module, self.params = name, module, _own_trainable(module)
        self.a = self.b = self.out = None

    def hook(self, module, args, out):
        if self.out is not None:
            raise NotImplementedError(
                f"Layer {self.name} ran twice in one forward pass (shared weights); the ghost "
                "engine needs one call per layer. Use engine='func'.")
        a = args[0].detach()
        if isinstance(module, nn.GroupNorm):  # keep the normalized input xhat, not x
            a = F.group_norm(a, module.num_groups, eps=module.eps)
        self.a, self.out, self.version = a, out, out._version

    def positions(self, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A [G, positions, d_in] and B [G, positions, d_out] of a weight layer, per group."""
        m, n = self.module, len(self.a)
        if isinstance(m, nn.Conv2d):
            a = F.unfold(self.a, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
            b = self.b.flatten(2).transpose(1, 2)
        else:
            a, b = self.a.reshape(n, -1, self.a.shape[-1]), self.b.reshape(n, -1, self.b.shape[-1])
        return _by_group(a, groups), _by_group(b, groups)


def _by_group(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[M * G, L, d] in draw-major order -> [G, M * L, d]: each group's positions together."""
    return x.reshape(-1, groups, *x.shape[1:]).transpose(0, 1).reshape(groups, -1, x.shape[-1])


def capture(model, x_t, t, noise, loss: str, scale: float) -> list[_Layer]:
    """Run one batched forward and backward pass of ``sum_d scale_d * l_d``; return every
    parametrized layer with its input ``a`` and output gradient ``b`` for the batch.

    The engine orders a chunk's draws draw-major (draw ``m`` of group ``g`` at ``m * G + g``), so
    that a group's convolution gradients need no copy (``_conv_group_grads``).

    The model runs with its parameters detached (``functional_call``) and every layer input
    made to require a gradient, so autograd computes only the gradients with respect to layer
    inputs and outputs, never the ordinary weight gradients; the engine forms what it needs
    from the factors instead.
    """
    check_supported(model)
    layers = [_Layer(name, m) for name, m in model.named_modules() if _own_trainable(m)]
    handles = [layer.module.register_forward_hook(layer.hook) for layer in layers]
    handles += [layer.module.register_forward_pre_hook(_input_requires_grad) for layer in layers]
    detached = {k: v.detach() for k, v in model.named_parameters()}
    try:
        with torch.enable_grad():
            pred = functional_call(model, detached, (x_t, t)).sample
            total = (error_loss(pred, noise, loss) * scale).sum()
            used = [layer for layer in layers if layer.out is not None and layer.out.requires_grad]
            outs = torch.autograd.grad(total, [layer.out for layer in used], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for layer, b in zip(used, outs):
        if layer.out._version != layer.version:
            raise RuntimeError(f"The output of layer {layer.name} was modified in place; the ghost "
                               "engine cannot read its gradient. Use engine='func'.")
        layer.b = torch.zeros_like(layer.out) if b is None else b
        layer.out = None
    return [layer for layer in used]


def _input_requires_grad(module, args):
    """Forward pre-hook: a layer's input that needs no gradient gets one (a detached leaf), so
    that the layer's output has a gradient with the parameters detached."""
    if not args[0].requires_grad:
        return (args[0].detach().requires_grad_(), *args[1:])


def _split(vectors: torch.Tensor | None, model) -> dict[str, torch.Tensor]:
    """Rows [Q, P] of flattened parameter vectors as {name: [Q, *shape]} views."""
    if vectors is None:
        return {}
    out, a = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = vectors[:, a:a + p.numel()].view(len(vectors), *p.shape)
            a += p.numel()
    if a != vectors.shape[1]:
        raise ValueError(f"vectors have {vectors.shape[1]} columns but the model has {a} trainable "
                         "parameters.")
    return out


def _conv_group_grads(layer: _Layer, groups: int) -> torch.Tensor:
    """Per-group weight gradients [G * d_out, d_in, kh, kw] of a convolution: the draws of a group
    become the batch and the groups the channel groups of one grouped convolution backward pass
    (the FLOPs of the ordinary weight gradient; no unfolded copy of the input)."""
    m, a, b = layer.module, layer.a, layer.b
    draws = len(a) // groups
    a, b = a.reshape(draws, -1, *a.shape[2:]), b.reshape(draws, -1, *b.shape[2:])
    shape = (groups * m.out_channels, m.in_channels, *m.kernel_size)
    return torch.ops.aten.convolution_backward(
        b, a, a.new_empty(shape), None, m.stride, m.padding, m.dilation, False, [0, 0], groups,
        [False, True, False])[1]


class _Terms:
    """A layer's per-group squared norms [G], dot products [G, Q] and a weighted-sum closure."""

    def __init__(self, layer: _Layer, prefix: str, groups: int, vectors: dict, weighted: bool):
        self.sq, self.dots, self.blocks, self.layer = 0.0, 0.0, {}, layer
        m, q = layer.module, next(iter(vectors.values())).shape[0] if vectors else 0
        names = {k: prefix + k for k in layer.params}
        if isinstance(m, nn.GroupNorm):
            b = layer.b.reshape(-1, groups, m.num_channels, layer.b[0, 0].numel())
            blocks = {"weight": (b * layer.a.reshape(b.shape)).sum((0, 3)),
                      "bias": b.sum((0, 3))}
            for k in layer.params:
                self._dense(names[k], blocks[k], vectors)
            return
        n, d_out, d_in = len(layer.b), m.weight.shape[0], m.weight[0].numel()
        conv = isinstance(m, nn.Conv2d)
        if "bias" in layer.params:
            per_draw = layer.b.flatten(2).sum(2) if conv else layer.b.reshape(n, -1, d_out).sum(1)
            self._dense(names["bias"], per_draw.view(-1, groups, d_out).sum(0), vectors)
        if "weight" not in layer.params:
            return
        self.route = route(layer.b[0].numel() // d_out * n // groups, d_in, d_out, q + weighted)
        if self.route == "materialize":
            if conv:
                block = _conv_group_grads(layer, groups)
            else:
                a, b = layer.positions(groups)
                block = torch.bmm(b.transpose(1, 2), a)
            self._dense(names["weight"], block.view(groups, *m.weight.shape), vectors)
            return
        self.a, self.b = a, b = layer.positions(groups)
        shape = m.weight.shape
        self.sq = self.sq + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(b, b.transpose(1, 2))).sum((1, 2))
        if q:
            v = vectors[names["weight"]].reshape(q * shape[0], -1)    # [Q * d_out, d_in]
            av = (a @ v.T).view(*b.shape[:2], q, shape[0])              # [G, pos, Q, d_out]
            self.dots = self.dots + torch.einsum("gpqo,gpo->gq", av, b)
        self.factor_weight = prefix + "weight"

    def _dense(self, full_name, block, vectors):
        flat = block.flatten(1)
        self.sq = self.sq + flat.square().sum(1)
        if vectors:
            self.dots = self.dots + flat @ vectors[full_name].flatten(1).T
        self.blocks[full_name] = block

    def weighted_sum(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_g w_g grad_g`` for each of the layer's parameters."""
        out = {name: torch.tensordot(w, block, dims=1) for name, block in self.blocks.items()}
        if hasattr(self, "factor_weight"):
            b = self.b * w[:, None, None]
            out[self.factor_weight] = (b.flatten(0, 1).T @ self.a.flatten(0, 1)).view(
                self.layer.module.weight.shape)
        return out


def _layer_terms(model, layers, groups, vectors, weighted):
    prefixes = {m: name + "." if name else "" for name, m in model.named_modules()}
    return [_Terms(layer, prefixes[layer.module], groups, vectors, weighted) for layer in layers]


def _noised(model, scheduler, x, t, noise):
    check_batch(model, scheduler, x.flatten(0, 1), t.flatten(), noise.flatten(0, 1))
    device = next(model.parameters()).device
    x, t, noise = x.to(device), t.to(device), noise.to(device)
    with torch.no_grad():
        x_t = add_noise(scheduler, x.flatten(0, 1), t.flatten(), noise.flatten(0, 1))
    return x_t, t.flatten(), noise.flatten(0, 1)


def _draw_major(groups: int, *tensors):
    """Reorder group-major draws [G * M, ...] to draw-major [M * G, ...]."""
    return [x.view(groups, -1, *x.shape[1:]).transpose(0, 1).flatten(0, 1) for x in tensors]


def _check_groups(x, t, noise):
    if x.ndim < 2 or t.shape != x.shape[:2] or noise.shape != x.shape:
        raise ValueError(
            f"x {tuple(x.shape)}, t {tuple(t.shape)} and noise {tuple(noise.shape)} must describe "
            "the same groups: x and noise are [G, M, *sample] and t is [G, M].")


def _chunk_terms(model, scheduler, x, t, noise, loss, chunk_size, vectors, weighted):
    """Yield each chunk's ``_Terms`` (one per layer): whole groups of at most ``chunk_size`` draws."""
    n_groups, draws = t.shape
    x_t, tt, eps = _noised(model, scheduler, x, t, noise)
    vecs = _split(None if vectors is None else vectors.to(x_t), model)
    step = chunk_size // draws
    for a in range(0, n_groups, step):
        b = min(a + step, n_groups)
        s = slice(a * draws, b * draws)
        layers = capture(model, *_draw_major(b - a, x_t[s], tt[s], eps[s]), loss, 1 / draws)
        yield _layer_terms(model, layers, b - a, vecs, weighted)


def group_terms(model, scheduler, x, t, noise, loss: str = "mse", vectors=None,
                chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Squared norms [G] of each group's gradient and its dot products [G, Q] with ``vectors``.

    Same groups and gradients as ``grads.grouped_grads`` (``x`` [G, M, *sample]), whose rows
    ``g`` would give ``g.square().sum(1)`` and ``g @ vectors.T``; no row is formed. Chunks hold
    whole groups of at most ``chunk_size`` draws; a group larger than half a chunk takes one
    plain backward pass per group (``grouped_grads``), as there is nothing left to save.
    """
    check_loss(loss)
    _check_groups(x, t, noise)
    if 2 * t.shape[1] > chunk_size:
        rows = grouped_grads(model, scheduler, x, t, noise, loss, chunk_size)
        return rows.square().sum(1), None if vectors is None else rows @ vectors.T.to(rows)
    sq, dots = [], []
    for terms in _chunk_terms(model, scheduler, x, t, noise, loss, chunk_size, vectors, False):
        sq.append(sum(term.sq for term in terms))
        dots.append(sum(term.dots for term in terms))
    return torch.cat(sq), None if vectors is None else torch.cat(dots)


def weighted_sum(model, scheduler, x, t, noise, weights_of, loss: str = "mse",
                 chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_g w_g m_g`` as a flat [P] vector with ``w = weights_of(norms)``, and the norms [G].

    ``m_g`` is group ``g``'s gradient as in ``group_terms``. The norms of a chunk's groups come
    from its factors; the weighted sum then reuses the same factors (a materialized block is
    scaled, a factor layer's ``(w * B)^T A`` is one matmul), so each chunk's forward and
    backward pass run once. With ``w = 1 / |m_g|`` this is ReTrac's query vector, the gradient
    of the re-weighted loss ``sum_g l_g / |m_g|``.
    """
    check_loss(loss)
    _check_groups(x, t, noise)
    if 2 * t.shape[1] > chunk_size:
        rows = grouped_grads(model, scheduler, x, t, noise, loss, chunk_size)
        norms = rows.norm(dim=1)
        return weights_of(norms) @ rows, norms
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters() if p.requires_grad}
    norms = []
    for terms in _chunk_terms(model, scheduler, x, t, noise, loss, chunk_size, None, True):
        norms.append(sum(term.sq for term in terms).clamp_min(0).sqrt())
        w = weights_of(norms[-1])
        for term in terms:
            for name, g in term.weighted_sum(w).items():
                total[name] += g
    return torch.cat([g.flatten() for g in total.values()]), torch.cat(norms)


def plan(model, sample: torch.Tensor, timestep: int = 0, draws: int = 1,
         n_vectors: int = 0) -> list[dict]:
    """The route each weight layer takes for groups of ``draws`` draws of ``sample`` dotted with
    ``n_vectors`` vectors: rows of layer name, type, positions per group, d_in, d_out, route."""
    layers = []
    handles = [m.register_forward_hook(lambda m, args, out, n=n: layers.append((n, m, args[0].shape, out.shape)))
               for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) and _own_trainable(m)]
    try:
        with torch.no_grad():
            model(sample[None], torch.tensor([timestep]))
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, m, shape_in, shape_out in layers:
        if isinstance(m, nn.Conv2d):
            pos, d_in = shape_out[2:].numel(), m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        else:
            pos, d_in = shape_in[1:-1].numel(), m.in_features
        d_out = m.weight.shape[0]
        rows.append({"layer": name, "type": type(m).__name__, "positions": pos * draws,
                     "d_in": d_in, "d_out": d_out, "route": route(pos * draws, d_in, d_out, n_vectors)})
    return rows
