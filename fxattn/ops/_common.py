"""Layout, dtype and backend helpers shared by fxattn's fused operators.

Every fused DIA / SSIA operator reads a feature map ``x`` whose channels sit on
``channel_dim`` (1 or -1) and reduces or scales it per ``(batch, channel)``. The *backend*
holds the four memory-bound passes over ``x`` (the only parts that touch the large tensor);
the cell arithmetic on ``(B, C)`` tensors is plain PyTorch. :class:`TorchBackend` is the
composite implementation used on every device; ``fxattn.ops.triton_dia`` provides the same
four passes as Triton kernels for CUDA tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch


def channel_axis(x: torch.Tensor, channel_dim: int) -> int:
    """``channel_dim`` as a non-negative axis of ``x`` (``-1``: channels last)."""
    return channel_dim % x.dim()


def reduce_dims(x: torch.Tensor, channel_dim: int) -> list[int]:
    """Every dimension but batch and channels: what the descriptor averages over."""
    axis = channel_axis(x, channel_dim)
    return [d for d in range(1, x.dim()) if d != axis]


def positions(x: torch.Tensor, channel_dim: int) -> int:
    """How many positions one ``(batch, channel)`` pair averages over."""
    count = 1
    for d in reduce_dims(x, channel_dim):
        count *= x.shape[d]
    return count


def broadcastable(values: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``(B, C)`` viewed so that it broadcasts over ``like``'s non-channel dimensions."""
    axis = channel_axis(like, channel_dim)
    shape = [1] * like.dim()
    shape[0], shape[axis] = values.shape[0], values.shape[1]
    return values.view(shape)


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the small cell arithmetic runs in: float32, or float64 for a float64 check.

    fp16 / bf16 activations and weights are widened: the cell's sigmoids and its recurrence are
    cheap, and fp32 keeps the state from drifting across a stage.
    """
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def state_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype of the ``(B, C)`` state a site hands on: fp32 under autocast (fp32 weights)."""
    return torch.promote_types(x.dtype, weight.dtype)


@contextlib.contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Run an operator's implementation with autocast off.

    Autocast falls through custom operators, so without this the matmuls inside the
    implementation would be recast to bf16 behind the operator's back; the operators choose
    their own precision (:func:`compute_dtype`).
    """
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


class Backend(Protocol):
    """The four passes over the large tensor that a device implementation provides."""

    def pool(self, x: torch.Tensor, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """Mean over positions: ``(B, C)`` in ``dtype``."""
        ...

    def scale(
        self, x: torch.Tensor, channel_dim: int, s: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        """``out = x * s`` with ``s`` ``(B, C)`` broadcast, in ``out``'s dtype."""
        ...

    def reduce_grad(
        self, g: torch.Tensor, x: torch.Tensor, channel_dim: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum over positions of g * x, mean over positions of x)``, both ``(B, C)``."""
        ...

    def input_grad(
        self, g: torch.Tensor, channel_dim: int, s: torch.Tensor, d: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """``out = g * s + d`` with ``s``, ``d`` ``(B, C)`` broadcast."""
        ...


class TorchBackend:
    """The composite implementation: a handful of PyTorch ops, valid on every device."""

    def pool(self, x: torch.Tensor, channel_dim: int, dtype: torch.dtype) -> torch.Tensor:
        dims = reduce_dims(x, channel_dim)
        if not dims:
            return x.to(dtype)
        return torch.mean(x, dim=dims, dtype=dtype)

    def scale(
        self, x: torch.Tensor, channel_dim: int, s: torch.Tensor, out: torch.Tensor
    ) -> torch.Tensor:
        # s stays fp32: computed in fp32, rounded once into out's dtype (as the Triton kernel)
        return torch.mul(x, broadcastable(s, x, channel_dim), out=out)

    def reduce_grad(
        self, g: torch.Tensor, x: torch.Tensor, channel_dim: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dims = reduce_dims(x, channel_dim)
        product = g * x
        if not dims:
            return product.to(dtype), x.to(dtype)
        return torch.sum(product, dim=dims, dtype=dtype), torch.mean(x, dim=dims, dtype=dtype)

    def input_grad(
        self, g: torch.Tensor, channel_dim: int, s: torch.Tensor, d: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        s = broadcastable(s, g, channel_dim)
        d = broadcastable(d, g, channel_dim)
        return torch.addcmul(d, g, s, out=out)  # in s's dtype (fp32), rounded once


TORCH_BACKEND = TorchBackend()
