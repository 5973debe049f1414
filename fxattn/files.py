"""Writing files safely: check an output path early, write through a staging folder.

Every writer of fxattn (ONNX exports, the onnxruntime compile, checkpoints) goes through
:func:`atomic_path`, so a failure never leaves a half-written file where the user asked for
one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import ExportError


def external_data_path(model_path: Path) -> Path:
    """Where a model over 2 GB keeps its weights: ``<model file name>.data`` beside it."""
    return model_path.with_name(model_path.name + ".data")


def check_output_path(path: str | os.PathLike[str], overwrite: bool = True) -> Path:
    """Fail early, with a clear message, when ``path`` cannot receive a file."""
    target = Path(path)
    if str(path) == "" or target.name == "":
        raise ExportError("the output path is empty; give a file name such as model.onnx")
    if target.is_dir():
        raise ExportError(f"output path {target} is a directory; give a file name inside it")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.exists():
        raise ExportError(f"the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ExportError(f"{parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"the folder {parent} is not writable; choose another output path")
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; pass overwrite=True (--force) to replace it")
    return target


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield ``target``'s name in a private folder beside it; move it over ``target`` on success.

    Writers that add companion files keep their names right: an ONNX model over 2 GB stores its
    weights in ``<name>.data``, referenced by that name from inside the model, so the model is
    staged under its final name and the data file moves along with it (data first, model last,
    so ``target`` never names a model whose data is missing).

    An ``OSError`` on the way (a folder nothing can be created in, a full disk) becomes an
    :class:`ExportError`; either way the staging folder is removed and ``target`` is untouched.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ExportError(
            f"cannot create a file in {target.parent} ({exc.strerror or exc}); choose a "
            "writable folder"
        ) from None
    staged = staging / target.name
    try:
        try:
            yield staged
            data = external_data_path(staged)
            if data.exists():
                os.replace(data, external_data_path(target))
            os.replace(staged, target)
        except OSError as exc:
            raise ExportError(
                f"writing {target} failed ({exc.strerror or exc}); nothing was written"
            ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
