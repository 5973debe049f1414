"""fxattn's fused operators (``torch.library`` custom ops), the lowest layer of the package.

* ``torch.ops.fxattn.dia_lstm`` / ``dia_lstm_backward``: a whole DIA-LSTM site (pool, cell,
  channel multiply) and its backward, one operator each (:mod:`.dia_lstm`).
* ``torch.ops.fxattn.dia_se`` / ``dia_se_backward``: the same for the shared SE module.
* ``torch.ops.fxattn.ssia_map`` / ``ssia_pair_loss``: SSIA's attention map of a tap and the
  loss of one pair of taps (:mod:`.ssia`).

Each has an autograd formula (its backward one operator too), a fake implementation (so
``torch.compile`` / ``torch.export`` see one node), a composite PyTorch implementation for
every device and, where Triton is installed, Triton kernels for CUDA tensors
(:mod:`.triton_dia`). Only ``torch``, ``triton`` and fxattn's ``errors`` / ``config`` may be
imported here: ``fxattn.modules`` builds on this package, never the reverse.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import dia_lstm as _dia_lstm_module  # noqa: F401  (registers the operators)
from . import dia_se as _dia_se_module  # noqa: F401
from . import ssia as _ssia_module  # noqa: F401
from .counting import AtenOpCounter, count_aten_ops
from .dia_lstm import Weights, dia_lstm, dia_pack
from .dia_se import dia_se
from .ssia import ssia_map, ssia_pair_loss

if torch.cuda.is_available():  # Triton kernels for CUDA tensors (Triton comes with the wheel)
    try:
        from . import triton_dia as _triton_dia  # noqa: F401
    except ImportError:  # pragma: no cover - a CUDA torch without Triton: composite only
        pass

__all__ = ["AtenOpCounter", "Weights", "count_aten_ops", "decomposed", "dia_lstm", "dia_pack",
           "dia_se", "fused_enabled", "ssia_map", "ssia_pair_loss"]

_DECOMPOSED_DEPTH = [0]


def fused_enabled() -> bool:
    """Whether fused-capable modules should use the fused operators right now.

    False inside :func:`decomposed` and during ONNX export (both exporters): the exported
    graph must keep the standard ops that fxattn's ONNX optimiser recognises.
    """
    return _DECOMPOSED_DEPTH[0] == 0 and not torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def decomposed() -> Iterator[None]:
    """Run fused-capable modules through their decomposed PyTorch path (debugging, hooks)."""
    _DECOMPOSED_DEPTH[0] += 1
    try:
        yield
    finally:
        _DECOMPOSED_DEPTH[0] -= 1
