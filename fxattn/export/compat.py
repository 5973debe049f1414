"""Export compatibility: exact rewrites, made while exporting, of calls torch.onnx cannot convert.

Some models that run fine in PyTorch trip ``torch.onnx.export(dynamo=True)`` on patterns with
an exact equivalent the exporter does convert. :class:`ExportCompatMode` is a
``TorchFunctionMode``: entered around the exporter, it sees every torch call as ``torch.export``
traces the model (inside modules too, so it needs no graph of its own) and substitutes:

* ``scaled_dot_product_attention`` on inputs that are not 4-D (Twins, NesT: ``(B, groups,
  heads, L, E)``): the exporter's ONNX function takes 4-D query / key / value only. Leading
  dimensions are folded into the batch, the attention runs in 4-D and the result is unfolded.
  Attention is independent per leading index, so this is exact.
* ``reshape`` / ``view`` of a transposed or permuted tensor (BEiT, HF Swin:
  ``x.transpose(1, 2).reshape(B, N, C)``): CPU attention returns its output heads-minor, so
  while tracing that transpose *is* contiguous and the reshape is recorded as a view; the
  exporter's later decomposition gives attention the standard layout and the view becomes
  impossible. An explicit contiguous copy first (``clone``) survives decomposition;
  onnxruntime sees an Identity, which its optimizer removes.
* zero padding followed by max pooling (HF BiT's stem: ``ConstantPad2d(1, 0)`` then
  ``MaxPool2d``): exported as ONNX ``Pad`` -> ``MaxPool``, which onnxruntime's ``PadFusion``
  optimizer (onnxruntime >= 1.17) folds into the pool's own padding. Pool padding means
  ``-inf``, not 0, so every window of negative values at the border comes out wrong. The zeros
  are concatenated instead (ONNX ``Concat``), which nothing fuses. This one fixes wrong
  numbers rather than a failed export, so :func:`fxattn.export_onnx` applies it on every
  export (the mode with ``layout_rewrites=False``); it changes nothing in a model without
  the pattern.

:func:`fxattn.export_onnx` enters the mode with the layout rewrites only after a plain export
failed, so a model that exports as it is keeps its exact ONNX graph. Nothing is changed outside
the ``with`` block.

Example::

    with ExportCompatMode() as compat:
        torch.onnx.export(model, args, "m.onnx", dynamo=True)
    print(compat.report)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias
from torch.overrides import TorchFunctionMode


@dataclass
class ExportCompatReport:
    """How many calls :class:`ExportCompatMode` rewrote while it was active."""

    attention_folded_to_4d: int = 0
    contiguous_reshapes: int = 0
    zero_pads_concatenated: int = 0

    @property
    def changed(self) -> bool:
        return bool(
            self.attention_folded_to_4d or self.contiguous_reshapes or self.zero_pads_concatenated
        )

    def __str__(self) -> str:
        return (f"export compatibility rewrites: {self.attention_folded_to_4d} attention call(s) "
                f"folded to 4-D, {self.contiguous_reshapes} permuted tensor(s) copied before a "
                f"reshape, {self.zero_pads_concatenated} zero pad(s) before a max pool "
                "concatenated")


def scaled_dot_product_attention_4d(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` computed on 4-D tensors, for any input rank >= 3.

    Leading dimensions (all but heads, length, features) are folded into one batch dimension;
    a 3-D input gets a singleton heads dimension. A mask of rank > 2 is broadcast and folded
    the same way (a 2-D mask broadcasts as it is).
    """
    rank = query.dim()
    if rank == 4:
        return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)
    lead = query.shape[:-3] if rank > 4 else query.shape[:-2]

    def to_4d(tensor: torch.Tensor) -> torch.Tensor:
        if rank == 3:
            return tensor.unsqueeze(1)
        return tensor.expand(*lead, *tensor.shape[-3:]).flatten(0, rank - 4)

    mask = kwargs.get("attn_mask", args[0] if args else None)
    if isinstance(mask, torch.Tensor) and mask.dim() > 2:
        mask = to_4d(mask.expand(*query.shape[:-2], *mask.shape[-2:]))
        if args:
            args = (mask, *args[1:])
        else:
            kwargs = {**kwargs, "attn_mask": mask}
    out = F.scaled_dot_product_attention(to_4d(query), to_4d(key), to_4d(value), *args, **kwargs)
    return out.squeeze(1) if rank == 3 else out.unflatten(0, lead)


aten = torch.ops.aten
_ATTENTION = frozenset({F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default})
_PADS = frozenset({F.pad, aten.pad.default, aten.constant_pad_nd.default})
_MAX_POOLS = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
    torch.max_pool3d, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
})
# calls that return a tensor with permuted strides, and calls that view a tensor's memory
_PERMUTES = frozenset({
    torch.transpose, torch.Tensor.transpose, torch.permute, torch.Tensor.permute,
    torch.swapaxes, torch.Tensor.swapaxes, torch.movedim, torch.Tensor.movedim,
    aten.transpose.int, aten.permute.default,
})
_RESHAPES = frozenset({
    torch.reshape, torch.Tensor.reshape, torch.Tensor.view, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default,
})


def zero_pad_by_concat(x: torch.Tensor, pads: list[int] | tuple[int, ...]) -> torch.Tensor:
    """``F.pad(x, pads)`` with zeros, built with ``torch.cat`` (no ``Pad`` node to fuse).

    ``pads`` is in ``F.pad`` order: (left, right) of the last dimension first, then of the one
    before it, and so on. Negative pads (cropping) are not handled here.
    """
    for i in range(len(pads) // 2):
        dim = x.dim() - 1 - i
        before, after = int(pads[2 * i]), int(pads[2 * i + 1])
        parts = []
        if before:
            parts.append(x.new_zeros([*x.shape[:dim], before, *x.shape[dim + 1:]]))
        parts.append(x)
        if after:
            parts.append(x.new_zeros([*x.shape[:dim], after, *x.shape[dim + 1:]]))
        x = torch.cat(parts, dim) if len(parts) > 1 else x
    return x


def _zero_pad_call(func: Any, args: tuple[Any, ...], kwargs: dict) -> tuple | None:
    """``(input, pads)`` of a constant zero pad with non-negative pads, else ``None``."""
    if func not in _PADS or not args or not isinstance(args[0], torch.Tensor):
        return None
    pads = args[1] if len(args) > 1 else kwargs.get("pad", kwargs.get("padding"))
    if func is aten.constant_pad_nd.default:
        mode, value = "constant", args[2] if len(args) > 2 else kwargs.get("value", 0)
    else:
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", None)
    if mode != "constant" or (value or 0) != 0 or pads is None:
        return None
    if any(not isinstance(p, int) or p < 0 for p in pads):
        return None
    return args[0], list(pads)


class ExportCompatMode(TorchFunctionMode):
    """Substitute the exact rewrites of the module docstring for the calls made under it.

    Args:
        layout_rewrites: the attention-rank and permuted-reshape rewrites (on by default).
            Off, only the zero-pad-then-max-pool fix is made, a fix for wrong numbers rather
            than a failed conversion, which :func:`fxattn.export_onnx` applies on every export.
    """

    def __init__(self, layout_rewrites: bool = True) -> None:
        super().__init__()
        self.layout_rewrites = layout_rewrites
        self.report = ExportCompatReport()
        # Tensors remembered by identity, each entry (weak reference, *facts): a WeakSet would
        # compare tensors with ==, which is elementwise.
        self._permuted: dict[int, tuple[weakref.ref[torch.Tensor]]] = {}
        self._zero_padded: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor, list]] = {}

    @staticmethod
    def _lookup(table: dict[int, tuple], value: Any) -> tuple | None:
        entry = table.get(id(value))
        return entry if entry is not None and entry[0]() is value else None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        # the mode is off inside this method, so the calls below are not intercepted again
        if func in _MAX_POOLS and args:
            padded = self._lookup(self._zero_padded, args[0])
            if padded is not None:
                self.report.zero_pads_concatenated += 1
                _, source, pads = padded
                return func(zero_pad_by_concat(source, pads), *args[1:], **kwargs)
        if self.layout_rewrites and func in _ATTENTION and args and args[0].dim() != 4:
            self.report.attention_folded_to_4d += 1
            return scaled_dot_product_attention_4d(*args, **kwargs)
        if self.layout_rewrites and func in _RESHAPES and args and self._lookup(
            self._permuted, args[0]
        ):
            # a permuted tensor that happens to be contiguous while tracing (see above)
            self.report.contiguous_reshapes += 1
            dense = args[0].clone(memory_format=torch.contiguous_format)
            return func(dense, *args[1:], **kwargs)
        result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            return result
        if self.layout_rewrites and func in _PERMUTES:
            self._permuted[id(result)] = (weakref.ref(result),)
        zero_pad = _zero_pad_call(func, args, kwargs)
        if zero_pad is not None:  # remembered in case a max pool reads it
            self._zero_padded[id(result)] = (weakref.ref(result), *zero_pad)
        return result
