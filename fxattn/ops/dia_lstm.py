"""``fxattn::dia_lstm``: one whole DIA-LSTM site as one operator, and its fused backward.

One call does what the decomposed :class:`fxattn.modules.dia.DIALSTMCell` does in ~25 ops::

    x_t   = mean over positions of A_t                      # (B, C)
    gates = MLP_in(x_t) + MLP_h(h_{t-1})                    # Linear -> ReLU -> Linear, 4C, i f g o
    c_t   = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t   = sigmoid(o) * sigmoid(c_t)
    out   = A_t * s_t,   s_t = h_t  (or 1 + gate * (h_t - 1) with an identity-init gate)

and returns ``(out, h_t, c_t)``. The multiply lives in the same operator as the cell (rather
than a separate channel-scale op) because then the backward is one pass too: it needs
``sum(g * A)`` for the scale and ``mean(A)`` for the recomputed descriptor (read together), and
writes ``dA = g * s + dx_t / positions`` once - split in two ops, autograd would add two
full-size gradients of ``A``. ``h`` / ``c`` absent (first site of a group) means zero state.

Precision: the ``(B, C)`` cell runs in fp32 (fp64 for a float64 check) whatever the
activations; the multiply reads and writes the activation dtype. The state is returned in
``promote(A.dtype, weight.dtype)`` - fp32 under autocast - and the backward recomputes the
small cell instead of saving it.

Not ``from __future__ import annotations``: ``torch.library`` reads the annotations.
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._common import (
    TORCH_BACKEND,
    Backend,
    compute_dtype,
    no_autocast,
    positions,
    state_dtype,
)


class Weights(NamedTuple):
    """The cell's parameters, in the order the operators take them."""

    w_in1: Tensor
    b_in1: Tensor
    w_in2: Tensor
    b_in2: Tensor
    w_h1: Tensor
    b_h1: Tensor
    w_h2: Tensor
    b_h2: Tensor


class _Cell(NamedTuple):
    """Forward intermediates of the cell (all ``compute_dtype``)."""

    a_in: Tensor  # pre-ReLU hidden of the input path
    z_in: Tensor
    hidden: Tensor  # h_{t-1} (zeros at the first site)
    a_h: Tensor
    z_h: Tensor
    si: Tensor
    sf: Tensor
    tg: Tensor
    so: Tensor
    sc: Tensor  # sigmoid(c_t)
    c_next: Tensor
    h_next: Tensor


def _mlp(v: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, ...]:
    a = torch.addmm(b1, v, w1.t())
    z = torch.relu(a)
    return a, z, torch.addmm(b2, z, w2.t())


def cell_forward(desc: Tensor, h: Tensor | None, c: Tensor | None, w: Weights) -> _Cell:
    """The LSTM cell on ``(B, C)`` tensors, in ``desc``'s dtype (weights cast to it)."""
    dtype = desc.dtype
    w = Weights(*(t.to(dtype) for t in w))
    a_in, z_in, gates = _mlp(desc, w.w_in1, w.b_in1, w.w_in2, w.b_in2)
    hidden = torch.zeros_like(desc) if h is None else h.to(dtype)
    a_h, z_h, gates_h = _mlp(hidden, w.w_h1, w.b_h1, w.w_h2, w.b_h2)
    i, f, g, o = (gates + gates_h).chunk(4, dim=1)
    si, sf, tg, so = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_next = si * tg if c is None else sf * c.to(dtype) + si * tg
    sc = torch.sigmoid(c_next)
    return _Cell(a_in, z_in, hidden, a_h, z_h, si, sf, tg, so, sc, c_next, so * sc)


def site_scale(h_next: Tensor, gate: Tensor | None) -> Tensor:
    """What multiplies the branch: ``h`` itself, or ``1 + gate * (h - 1)`` (identity init)."""
    return h_next if gate is None else torch.addcmul(torch.ones_like(h_next), gate, h_next - 1)


def lstm_forward(
    backend: Backend, x: Tensor, h: Tensor | None, c: Tensor | None, w: Weights,
    gate: Tensor | None, channel_dim: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of one site with ``backend`` doing the passes over ``x``."""
    dtype = compute_dtype(x, w.w_in1)
    with no_autocast(x.device):
        desc = backend.pool(x, channel_dim, dtype)
        cell = cell_forward(desc, h, c, w)
        scale = site_scale(cell.h_next, None if gate is None else gate.to(dtype))
        out = backend.scale(x, channel_dim, scale, torch.empty_like(x))
        state = state_dtype(x, w.w_in1)
        return out, cell.h_next.to(state), cell.c_next.to(state)


def _mlp_backward(
    v: Tensor, a: Tensor, z: Tensor, w1: Tensor, w2: Tensor, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``Linear -> ReLU -> Linear``: ``(dv, dw1, db1, dw2, db2)``."""
    dw2, db2 = dy.t() @ z, dy.sum(0)
    da = (dy @ w2) * (a > 0)
    return da @ w1, da.t() @ v, da.sum(0), dw2, db2


def lstm_backward(
    backend: Backend, grad_out: Tensor, grad_h: Tensor | None,
    grad_c: Tensor | None, x: Tensor,
    h: Tensor | None, c: Tensor | None, w: Weights, gate: Tensor | None,
    channel_dim: int,
) -> tuple[Tensor, ...]:
    """``(dx, dh, dc, dgate, *dweights)``; absent inputs get 0-element gradients."""
    dtype = compute_dtype(x, w.w_in1)
    with no_autocast(x.device):
        g_x, desc = backend.reduce_grad(grad_out, x, channel_dim, dtype)
        cell = cell_forward(desc, h, c, w)
        wc = Weights(*(t.to(dtype) for t in w))
        dh_next = g_x if grad_h is None else grad_h.to(dtype)
        if gate is None:
            scale = cell.h_next
            if grad_h is not None:
                dh_next = dh_next + g_x
            dgate = torch.empty(0, dtype=w.w_in1.dtype, device=x.device)
        else:
            gate_c = gate.to(dtype)
            scale = site_scale(cell.h_next, gate_c)
            dh_next = g_x * gate_c if grad_h is None else torch.addcmul(dh_next, g_x, gate_c)
            dgate = (g_x * (cell.h_next - 1)).sum(0).to(gate.dtype)
        so, sc, si, sf, tg = cell.so, cell.sc, cell.si, cell.sf, cell.tg
        dc_next = dh_next * so * sc * (1 - sc)
        if grad_c is not None:
            dc_next = dc_next + grad_c.to(dtype)
        d_o = dh_next * sc * so * (1 - so)
        d_i = dc_next * tg * si * (1 - si)
        d_g = dc_next * si * (1 - tg * tg)
        if c is None:
            d_f = torch.zeros_like(d_i)
            dc = torch.empty(0, dtype=x.dtype, device=x.device)
        else:
            c_prev = c.to(dtype)
            d_f = dc_next * c_prev * sf * (1 - sf)
            dc = (dc_next * sf).to(c.dtype)
        dgates = torch.cat([d_i, d_f, d_g, d_o], dim=1)
        ddesc, *grads_in = _mlp_backward(desc, cell.a_in, cell.z_in, wc.w_in1, wc.w_in2, dgates)
        dhidden, *grads_h = _mlp_backward(cell.hidden, cell.a_h, cell.z_h, wc.w_h1, wc.w_h2,
                                          dgates)
        dh = torch.empty(0, dtype=x.dtype, device=x.device) if h is None else dhidden.to(h.dtype)
        dx = backend.input_grad(grad_out, channel_dim, scale, ddesc / positions(x, channel_dim),
                                torch.empty_like(x))
        dweights = [g.to(t.dtype) for g, t in zip([*grads_in, *grads_h], w, strict=True)]
        return (dx, dh, dc, dgate, *dweights)


def as_weights(params: list[Tensor], channels: int) -> Weights:
    """The eight parameters, from the list the operators take: themselves, or one flat
    :func:`dia_pack` ``P`` holding them (views into ``P``).

    ``P``'s length fixes the hidden width: ``2 * (5 * C * hidden + hidden + 4 * C)``.
    """
    if len(params) == len(Weights._fields):
        return Weights(*params)
    (flat,) = params
    hidden = (flat.numel() // 2 - 4 * channels) // (5 * channels + 1)
    shapes = _shapes(channels, hidden)
    pieces = flat.split([math.prod(shape) for shape in shapes])
    return Weights(*(piece.view(shape) for piece, shape in zip(pieces, shapes, strict=True)))


def _shapes(channels: int, hidden: int) -> list[tuple[int, ...]]:
    path = [(hidden, channels), (hidden,), (4 * channels, hidden), (4 * channels,)]
    return path + path


# --- the operators -------------------------------------------------------------------------


@torch.library.custom_op("fxattn::dia_lstm", mutates_args=())
def dia_lstm(
    x: Tensor, h: Tensor | None, c: Tensor | None,
    params: list[Tensor], gate: Tensor | None, channel_dim: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DIA-LSTM site: ``(x * s_t, h_t, c_t)``; see the module docstring.

    ``params``: the eight tensors of :class:`Weights`, or one :func:`dia_pack` of them.
    """
    w = as_weights(params, x.shape[channel_dim])
    return lstm_forward(TORCH_BACKEND, x, h, c, w, gate, channel_dim)


@dia_lstm.register_fake
def _(x, h, c, params, gate, channel_dim):
    state = x.new_empty((x.shape[0], x.shape[channel_dim]), dtype=state_dtype(x, params[0]))
    return torch.empty_like(x), state, torch.empty_like(state)


@torch.library.custom_op("fxattn::dia_lstm_backward", mutates_args=())
def dia_lstm_backward(
    grad_out: Tensor, grad_h: Tensor | None, grad_c: Tensor | None,
    x: Tensor, h: Tensor | None, c: Tensor | None,
    params: list[Tensor], gate: Tensor | None, channel_dim: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
    """Fused backward of :func:`dia_lstm`: ``(dx, dh, dc, dgate, dparams)``.

    Absent ``grad_h`` / ``grad_c`` (the last site of a group) count as zero; absent inputs
    get 0-element gradients. ``dparams`` matches ``params`` (eight tensors, or one flat).
    """
    w = as_weights(params, x.shape[channel_dim])
    dx, dh, dc, dgate, *dweights = lstm_backward(
        TORCH_BACKEND, grad_out, grad_h, grad_c, x, h, c, w, gate, channel_dim)
    return dx, dh, dc, dgate, like_params(dweights, params)


def like_params(dweights: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    if len(params) == len(dweights):
        return dweights
    return [torch.cat([g.reshape(-1) for g in dweights])]


@dia_lstm_backward.register_fake
def _(grad_out, grad_h, grad_c, x, h, c, params, gate, channel_dim):
    def empty(t: Tensor | None, dtype: torch.dtype) -> Tensor:
        return x.new_empty(0, dtype=dtype) if t is None else torch.empty_like(t)

    return (torch.empty_like(x), empty(h, x.dtype), empty(c, x.dtype),
            empty(gate, params[0].dtype), [torch.empty_like(t) for t in params])


def _setup_context(ctx, inputs, output) -> None:
    x, h, c, params, gate, channel_dim = inputs
    ctx.save_for_backward(x, h, c, gate, *params)
    ctx.channel_dim = channel_dim
    ctx.set_materialize_grads(False)  # unused h / c (last site of a group): no zeros to make


def _backward(ctx, grad_out: Tensor | None, grad_h: Tensor | None,
              grad_c: Tensor | None) -> tuple:
    x, h, c, gate, *params = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    dx, dh, dc, dgate, dparams = dia_lstm_backward(
        grad_out, grad_h, grad_c, x, h, c, params, gate, ctx.channel_dim
    )
    return (dx, None if h is None else dh, None if c is None else dc, dparams,
            None if gate is None else dgate, None)


dia_lstm.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fxattn::dia_pack", mutates_args=())
def dia_pack(params: list[Tensor]) -> Tensor:
    """The parameters of a DIA module as one flat tensor, made at a group's first site.

    Why: a cell shared by ``n`` sites would otherwise have autograd sum ``n`` gradients of
    each of its eight parameters (``8 (n - 1)`` small adds per step); the sites of a group
    read one ``P`` instead, so it is ``n - 1`` adds and one :func:`dia_unpack`.
    """
    return torch.cat([p.reshape(-1) for p in params])


@dia_pack.register_fake
def _(params):
    return params[0].new_empty(sum(p.numel() for p in params))


@torch.library.custom_op("fxattn::dia_unpack", mutates_args=())
def dia_unpack(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    """Split a flat gradient back into tensors shaped like ``params`` (backward of pack)."""
    pieces = flat.split([p.numel() for p in params])
    return [piece.reshape(p.shape).clone() for piece, p in zip(pieces, params, strict=True)]


@dia_unpack.register_fake
def _(flat, params):
    return [torch.empty_like(p) for p in params]


def _pack_setup(ctx, inputs, output) -> None:
    (params,) = inputs
    ctx.save_for_backward(*params)


def _pack_backward(ctx, grad: Tensor) -> tuple:
    return (dia_unpack(grad, list(ctx.saved_tensors)),)


dia_pack.register_autograd(_pack_backward, setup_context=_pack_setup)
