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

:func:`fxattn.export_onnx` enters the mode only after a plain export failed, so a model that
exports as it is keeps its exact ONNX graph. Nothing is changed outside the ``with`` block.

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

    @property
    def changed(self) -> bool:
        return bool(self.attention_folded_to_4d or self.contiguous_reshapes)

    def __str__(self) -> str:
        return (f"export compatibility rewrites: {self.attention_folded_to_4d} attention call(s) "
                f"folded to 4-D, {self.contiguous_reshapes} permuted tensor(s) copied before a "
                "reshape")


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


class ExportCompatMode(TorchFunctionMode):
    """Substitute the exact rewrites of the module docstring for the calls made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.report = ExportCompatReport()
        # by identity: a WeakSet would compare tensors with ==, which is elementwise
        self._permuted: dict[int, weakref.ref[torch.Tensor]] = {}

    def _is_permuted(self, value: Any) -> bool:
        ref = self._permuted.get(id(value))
        return ref is not None and ref() is value

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        # the mode is off inside this method, so the calls below are not intercepted again
        if func in _ATTENTION and args and args[0].dim() != 4:
            self.report.attention_folded_to_4d += 1
            return scaled_dot_product_attention_4d(*args, **kwargs)
        if func in _RESHAPES and args and self._is_permuted(args[0]):
            # a permuted tensor that happens to be contiguous while tracing (see above)
            self.report.contiguous_reshapes += 1
            dense = args[0].clone(memory_format=torch.contiguous_format)
            return func(dense, *args[1:], **kwargs)
        result = func(*args, **kwargs)
        if func in _PERMUTES and isinstance(result, torch.Tensor):
            self._permuted[id(result)] = weakref.ref(result)
        return result
