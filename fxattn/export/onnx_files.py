"""ONNX model files on disk: a model over 2 GB keeps its weights in ``<name>.data`` beside it.

That is the layout onnxruntime and ``onnx.load`` expect. The export writes it, the low-precision
rewrite (:mod:`fxattn.export.lowp`) rewrites it in place, and both report the bytes of both files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import external_data_path


def save_with_external_data(model: Any, path: Path) -> None:
    """Save ONNX ``model`` at ``path`` with its weights in the one file ``<name>.data``."""
    import onnx

    data = external_data_path(path)
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data.name)


def onnx_file_bytes(path: Path) -> int:
    """Bytes on disk of an ONNX model: the file plus its ``<name>.data`` file, if any."""
    data = external_data_path(path)
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
