"""``fxattn::dia_se``: one shared-SE site (pool, MLP, sigmoid, channel multiply) as one op.

``out = x * s`` with ``a = sigmoid(Linear(ReLU(Linear(mean over positions of x))))`` and
``s = a`` (or ``1 + gate * (a - 1)`` with an identity-init gate). Like :mod:`.dia_lstm`, the
backward is one operator that reads ``g`` and ``x`` once for ``sum(g * x)`` and ``mean(x)``
and writes ``dx`` once. The MLP runs in fp32 (fp64 for a float64 check), the multiply in the
activation dtype.

Not ``from __future__ import annotations``: ``torch.library`` reads the annotations.
"""



import torch
from torch import Tensor

from ._common import TORCH_BACKEND, Backend, compute_dtype, no_autocast, positions
from .dia_lstm import _mlp, _mlp_backward, site_scale


def se_forward(
    backend: Backend, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    gate: Tensor | None, channel_dim: int,
) -> Tensor:
    """The forward of one SE site with ``backend`` doing the passes over ``x``."""
    dtype = compute_dtype(x, w1)
    with no_autocast(x.device):
        desc = backend.pool(x, channel_dim, dtype)
        _, _, logits = _mlp(desc, w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype))
        scale = site_scale(torch.sigmoid(logits), None if gate is None else gate.to(dtype))
        return backend.scale(x, channel_dim, scale, torch.empty_like(x))


def se_backward(
    backend: Backend, grad_out: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
    b2: Tensor, gate: Tensor | None, channel_dim: int,
) -> tuple[Tensor, ...]:
    """``(dx, dgate, dw1, db1, dw2, db2)``; no gate -> a 0-element ``dgate``."""
    dtype = compute_dtype(x, w1)
    with no_autocast(x.device):
        g_x, desc = backend.reduce_grad(grad_out, x, channel_dim, dtype)
        w1c, w2c = w1.to(dtype), w2.to(dtype)
        a, z, logits = _mlp(desc, w1c, b1.to(dtype), w2c, b2.to(dtype))
        attention = torch.sigmoid(logits)
        if gate is None:
            scale, d_att = attention, g_x
            dgate = torch.empty(0, dtype=w1.dtype, device=x.device)
        else:
            gate_c = gate.to(dtype)
            scale, d_att = site_scale(attention, gate_c), g_x * gate_c
            dgate = (g_x * (attention - 1)).sum(0).to(gate.dtype)
        d_logits = d_att * attention * (1 - attention)
        ddesc, dw1, db1, dw2, db2 = _mlp_backward(desc, a, z, w1c, w2c, d_logits)
        dx = backend.input_grad(grad_out, channel_dim, scale, ddesc / positions(x, channel_dim),
                                torch.empty_like(x))
        grads = [g.to(t.dtype) for g, t in zip((dw1, db1, dw2, db2), (w1, b1, w2, b2),
                                                strict=True)]
        return (dx, dgate, *grads)


@torch.library.custom_op("fxattn::dia_se", mutates_args=())
def dia_se(
    x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    gate: Tensor | None, channel_dim: int,
) -> Tensor:
    """One shared-SE site: ``x * s``; see the module docstring."""
    return se_forward(TORCH_BACKEND, x, w1, b1, w2, b2, gate, channel_dim)


@dia_se.register_fake
def _(x, w1, b1, w2, b2, gate, channel_dim):
    return torch.empty_like(x)


@torch.library.custom_op("fxattn::dia_se_backward", mutates_args=())
def dia_se_backward(
    grad_out: Tensor, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    gate: Tensor | None, channel_dim: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused backward of :func:`dia_se`: ``(dx, dgate, dw1, db1, dw2, db2)``."""
    return se_backward(TORCH_BACKEND, grad_out, x, w1, b1, w2, b2, gate, channel_dim)


@dia_se_backward.register_fake
def _(grad_out, x, w1, b1, w2, b2, gate, channel_dim):
    dgate = x.new_empty(0, dtype=w1.dtype) if gate is None else torch.empty_like(gate)
    return (torch.empty_like(x), dgate, *(torch.empty_like(t) for t in (w1, b1, w2, b2)))


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2, gate, channel_dim = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, gate)
    ctx.channel_dim = channel_dim


def _backward(ctx, grad_out: Tensor) -> tuple:
    x, w1, b1, w2, b2, gate = ctx.saved_tensors
    dx, dgate, *dweights = dia_se_backward(grad_out, x, w1, b1, w2, b2, gate, ctx.channel_dim)
    return (dx, *dweights, None if gate is None else dgate, None)


dia_se.register_autograd(_backward, setup_context=_setup_context)
