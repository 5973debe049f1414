"""SSIA operators: a tap's attention map, and the loss of one pair of taps.

* ``fxattn::ssia_map(F) = mean over channels of |F|^p`` in fp32, positions from
  ``skip_tokens`` on, reshaped to ``shape`` (a token sequence to its square grid) - the
  decomposed path's cast, ``abs``, ``pow``, ``mean``, slice and reshape in one op; its backward
  ``p * sign(F) |F|^(p-1) * g / C`` one op too.
* ``fxattn::ssia_pair_loss(low, high, total) = total + scale * mean_b || n(low) - n(r(high)) ||^2``
  with ``n`` the L2 normalisation over positions and ``r`` the (bi/tri)linear resize of the
  higher tap's map to the lower tap's grid (``resize_to``; empty: no resize). ``high`` gets no
  gradient (the teacher); the running ``total`` lets a whole SSIA loss be one op per pair.

Composite implementations only (the tensors are small maps, or one read of the tap); not
``from __future__ import annotations``: ``torch.library`` reads the annotations.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

_RESIZE_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_EPS = 1e-12  # F.normalize's


def _magnitude(feature: Tensor, p: float) -> Tensor:
    magnitude = feature.float().abs()
    return magnitude.square() if p == 2.0 else magnitude.pow(p)


@torch.library.custom_op("fxattn::ssia_map", mutates_args=())
def ssia_map(feature: Tensor, channel_dim: int, p: float, skip_tokens: int,
             shape: list[int]) -> Tensor:
    """SSIA's attention map of one tap (``shape``: ``(B, *grid)`` to reshape to, or empty)."""
    m = _magnitude(feature, p).mean(dim=channel_dim)
    if skip_tokens:
        m = m[:, skip_tokens:]
    return m.reshape(shape).clone() if shape else m.contiguous().clone()


@ssia_map.register_fake
def _(feature, channel_dim, p, skip_tokens, shape):
    if shape:
        return feature.new_empty(shape, dtype=torch.float32)
    sizes = [s for d, s in enumerate(feature.shape) if d != channel_dim % feature.dim()]
    sizes[1] -= skip_tokens
    return feature.new_empty(sizes, dtype=torch.float32)


@torch.library.custom_op("fxattn::ssia_map_backward", mutates_args=())
def ssia_map_backward(grad: Tensor, feature: Tensor, channel_dim: int, p: float,
                      skip_tokens: int) -> Tensor:
    """``d map / d feature`` times ``grad``, in ``feature``'s dtype and layout."""
    axis = channel_dim % feature.dim()
    sizes = [s for d, s in enumerate(feature.shape) if d != axis]
    sizes[1] -= skip_tokens
    g = grad.reshape(sizes)
    if skip_tokens:
        g = F.pad(g.movedim(1, -1), (skip_tokens, 0)).movedim(-1, 1)
    g = g.unsqueeze(axis) * (p / feature.shape[axis])
    x = feature.float()
    slope = x if p == 2.0 else torch.sign(x) * x.abs().pow(p - 1)
    out = torch.empty_like(feature)
    return torch.mul(g, slope, out=out) if out.dtype == torch.float32 else out.copy_(g * slope)


@ssia_map_backward.register_fake
def _(grad, feature, channel_dim, p, skip_tokens):
    return torch.empty_like(feature)


def _map_setup(ctx, inputs, output) -> None:
    feature, channel_dim, p, skip_tokens, _ = inputs
    ctx.save_for_backward(feature)
    ctx.args = (channel_dim, p, skip_tokens)


def _map_backward(ctx, grad: Tensor) -> tuple:
    (feature,) = ctx.saved_tensors
    return ssia_map_backward(grad, feature, *ctx.args), None, None, None, None


ssia_map.register_autograd(_map_backward, setup_context=_map_setup)


def _teacher(high: Tensor, resize_to: list[int]) -> Tensor:
    if not resize_to:
        return high
    mode = _RESIZE_MODES[len(resize_to)]
    return F.interpolate(high.unsqueeze(1), size=resize_to, mode=mode,
                         align_corners=False).squeeze(1)


@torch.library.custom_op("fxattn::ssia_pair_loss", mutates_args=())
def ssia_pair_loss(low: Tensor, high: Tensor, total: Tensor | None, resize_to: list[int],
                   scale: float) -> Tensor:
    """``total + scale * mean_b || n(low) - n(resize(high)) ||^2`` (0-dim, ``low``'s dtype)."""
    diff = F.normalize(low.flatten(1), dim=1) - F.normalize(_teacher(high, resize_to).flatten(1),
                                                            dim=1)
    loss = (diff.square().sum(dim=1).mean() * scale).to(low.dtype)
    return loss if total is None else total + loss


@ssia_pair_loss.register_fake
def _(low, high, total, resize_to, scale):
    return low.new_empty(())


@torch.library.custom_op("fxattn::ssia_pair_loss_backward", mutates_args=())
def ssia_pair_loss_backward(grad: Tensor, low: Tensor, high: Tensor, resize_to: list[int],
                            scale: float) -> Tensor:
    """Gradient of :func:`ssia_pair_loss` for ``low`` (the teacher gets none)."""
    flat = low.flatten(1)
    norm = flat.norm(dim=1, keepdim=True)
    unit = flat / norm.clamp_min(_EPS)
    teacher = F.normalize(_teacher(high, resize_to).flatten(1), dim=1)
    d_unit = (unit - teacher) * (2 * scale / flat.shape[0]) * grad
    d_flat = torch.where(norm > _EPS,
                         d_unit - unit * (unit * d_unit).sum(dim=1, keepdim=True), d_unit)
    return (d_flat / norm.clamp_min(_EPS)).reshape(low.shape).to(low.dtype)


@ssia_pair_loss_backward.register_fake
def _(grad, low, high, resize_to, scale):
    return torch.empty_like(low)


def _pair_setup(ctx, inputs, output) -> None:
    low, high, total, resize_to, scale = inputs
    ctx.save_for_backward(low, high)
    ctx.args = (resize_to, scale)
    ctx.has_total = total is not None


def _pair_backward(ctx, grad: Tensor) -> tuple:
    low, high = ctx.saved_tensors
    d_low = ssia_pair_loss_backward(grad, low, high, *ctx.args)
    return d_low, None, grad if ctx.has_total else None, None, None


ssia_pair_loss.register_autograd(_pair_backward, setup_context=_pair_setup)
