"""Triton kernels for the four passes over the large tensor, registered for CUDA tensors.

The DIA operators (:mod:`.dia_lstm`, :mod:`.dia_se`) split into passes over the branch output
``x`` (pool; multiply; in the backward ``sum(g * x)`` with ``mean(x)``, then ``g * s + d``) and
small ``(B, C)`` arithmetic. On CUDA the passes are the kernels below and the ``(B, C)`` part
stays PyTorch (cuBLAS for the cell's matmuls). Every kernel sees ``x`` as a strided
``(B, C, S)`` view, so one kernel covers ``(B, C, L)``, ``(B, C, H, W)``, ``(B, C, T, H, W)``,
tokens ``(B, N, C)`` and channels-last grids without copies; it accumulates in fp32 and stores
in the output's dtype.

The kernels also run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1`` set before
this module is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import channel_axis
from .dia_lstm import (
    as_weights,
    dia_lstm,
    dia_lstm_backward,
    like_params,
    lstm_backward,
    lstm_forward,
)
from .dia_se import dia_se, dia_se_backward, se_backward, se_forward

BLOCK_C = 16
BLOCK_S = 64


@triton.jit
def _pool_kernel(x_ptr, out_ptr, n_c, n_s, sxb, sxc, sxs, inv_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for start in range(0, n_s, BLOCK_S):
        ss = start + tl.arange(0, BLOCK_S)
        mask = (cs[:, None] < n_c) & (ss[None, :] < n_s)
        offsets = b * sxb + cs[:, None] * sxc + ss[None, :] * sxs
        acc += tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=1) * inv_s
    tl.store(out_ptr + b * n_c + cs, total.to(out_ptr.dtype.element_ty), mask=cs < n_c)


@triton.jit
def _reduce_grad_kernel(g_ptr, x_ptr, gx_ptr, mean_ptr, n_c, n_s, sgb, sgc, sgs, sxb, sxc, sxs,
                        inv_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc_gx = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_C, BLOCK_S), dtype=tl.float32)
    for start in range(0, n_s, BLOCK_S):
        ss = start + tl.arange(0, BLOCK_S)
        mask = (cs[:, None] < n_c) & (ss[None, :] < n_s)
        x = tl.load(x_ptr + b * sxb + cs[:, None] * sxc + ss[None, :] * sxs, mask=mask,
                    other=0.0).to(tl.float32)
        g = tl.load(g_ptr + b * sgb + cs[:, None] * sgc + ss[None, :] * sgs, mask=mask,
                    other=0.0).to(tl.float32)
        acc_gx += g * x
        acc_x += x
    keep = cs < n_c
    tl.store(gx_ptr + b * n_c + cs, tl.sum(acc_gx, axis=1).to(gx_ptr.dtype.element_ty),
             mask=keep)
    tl.store(mean_ptr + b * n_c + cs, (tl.sum(acc_x, axis=1) * inv_s).to(
        mean_ptr.dtype.element_ty), mask=keep)


@triton.jit
def _scale_add_kernel(x_ptr, s_ptr, d_ptr, out_ptr, n_c, n_s, sxb, sxc, sxs, sob, soc, sos,
                      HAS_D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """``out = x * s (+ d)`` with ``s``, ``d`` contiguous ``(B, C)`` fp32."""
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ss = tl.program_id(2) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (cs[:, None] < n_c) & (ss[None, :] < n_s)
    x = tl.load(x_ptr + b * sxb + cs[:, None] * sxc + ss[None, :] * sxs, mask=mask,
                other=0.0).to(tl.float32)
    s = tl.load(s_ptr + b * n_c + cs, mask=cs < n_c, other=0.0)
    y = x * s[:, None]
    if HAS_D:
        y += tl.load(d_ptr + b * n_c + cs, mask=cs < n_c, other=0.0)[:, None]
    tl.store(out_ptr + b * sob + cs[:, None] * soc + ss[None, :] * sos,
             y.to(out_ptr.dtype.element_ty), mask=mask)


def _bcs(t: torch.Tensor, channel_dim: int) -> torch.Tensor | None:
    """``t`` as a ``(B, C, S)`` view (no copy), or None where its strides do not allow one."""
    moved = t.movedim(channel_axis(t, channel_dim), 1)
    try:
        return moved.view(moved.shape[0], moved.shape[1], -1)
    except RuntimeError:
        return None


def _readable(t: torch.Tensor, channel_dim: int) -> torch.Tensor:
    view = _bcs(t, channel_dim)
    return view if view is not None else _bcs(t.contiguous(), channel_dim)  # type: ignore


def _grid(view: torch.Tensor, split_s: bool) -> tuple[int, ...]:
    b, c, s = view.shape
    blocks = (b, triton.cdiv(c, BLOCK_C))
    return (*blocks, triton.cdiv(s, BLOCK_S)) if split_s else blocks


class TritonBackend:
    """:class:`fxattn.ops._common.Backend` with Triton kernels (CUDA, or the interpreter)."""

    def pool(self, x: torch.Tensor, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
        view = _readable(x, channel_dim)
        out = torch.empty(view.shape[:2], dtype=dtype, device=x.device)
        _pool_kernel[_grid(view, False)](view, out, view.shape[1], view.shape[2],
                                         *view.stride(), 1.0 / max(view.shape[2], 1),
                                         BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
        return out

    def reduce_grad(self, g: torch.Tensor, x: torch.Tensor, channel_dim: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        gv, xv = _readable(g, channel_dim), _readable(x, channel_dim)
        gx = torch.empty(xv.shape[:2], dtype=dtype, device=x.device)
        mean = torch.empty_like(gx)
        _reduce_grad_kernel[_grid(xv, False)](gv, xv, gx, mean, xv.shape[1], xv.shape[2],
                                              *gv.stride(), *xv.stride(),
                                              1.0 / max(xv.shape[2], 1),
                                              BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
        return gx, mean

    def scale(self, x: torch.Tensor, channel_dim: int, s: torch.Tensor,
              out: torch.Tensor) -> torch.Tensor:
        return self._scale_add(x, channel_dim, s, None, out)

    def input_grad(self, g: torch.Tensor, channel_dim: int, s: torch.Tensor, d: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
        return self._scale_add(g, channel_dim, s, d, out)

    def _scale_add(self, x: torch.Tensor, channel_dim: int, s: torch.Tensor,
                   d: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
        xv = _readable(x, channel_dim)
        target = out if _bcs(out, channel_dim) is not None else torch.empty_like(x.contiguous())
        ov = _bcs(target, channel_dim)
        assert ov is not None
        s32 = s.float().contiguous()
        d32 = s32 if d is None else d.float().contiguous()
        _scale_add_kernel[_grid(xv, True)](xv, s32, d32, ov, xv.shape[1], xv.shape[2],
                                           *xv.stride(), *ov.stride(), HAS_D=d is not None,
                                           BLOCK_C=BLOCK_C, BLOCK_S=BLOCK_S)
        return out if target is out else out.copy_(target)


TRITON_BACKEND = TritonBackend()


# --- CUDA registrations: the same operators, the passes as the kernels above ---------------


@dia_lstm.register_kernel("cuda")
def _dia_lstm_cuda(x, h, c, params, gate, channel_dim):
    w = as_weights(params, x.shape[channel_dim])
    return lstm_forward(TRITON_BACKEND, x, h, c, w, gate, channel_dim)


@dia_lstm_backward.register_kernel("cuda")
def _dia_lstm_backward_cuda(grad_out, grad_h, grad_c, x, h, c, params, gate, channel_dim):
    w = as_weights(params, x.shape[channel_dim])
    dx, dh, dc, dgate, *dweights = lstm_backward(
        TRITON_BACKEND, grad_out, grad_h, grad_c, x, h, c, w, gate, channel_dim)
    return dx, dh, dc, dgate, like_params(dweights, params)


@dia_se.register_kernel("cuda")
def _dia_se_cuda(x, w1, b1, w2, b2, gate, channel_dim):
    return se_forward(TRITON_BACKEND, x, w1, b1, w2, b2, gate, channel_dim)


@dia_se_backward.register_kernel("cuda")
def _dia_se_backward_cuda(grad_out, x, w1, b1, w2, b2, gate, channel_dim):
    return se_backward(TRITON_BACKEND, grad_out, x, w1, b1, w2, b2, gate, channel_dim)
