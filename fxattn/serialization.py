"""Save and load fxattn modules without unpickling code.

File format (``.fxattn``, read with ``torch.load(weights_only=True)``): a dict of plain data::

    {
      "format": "fxattn/1",
      "kind": "transformed" | "stripped",
      "model_spec": "torchvision:resnet18" | None,   # how to rebuild the architecture
      "model_kwargs": {...},
      "model_class": "torchvision.models.resnet.ResNet",
      "inputs": [[shape, dtype], ...],                # example inputs to re-trace with
      "dia": {...} | None, "ssia": {...} | None,      # the options of fxattn.DIA / fxattn.SSIA
      "state_dict": {...},                            # tensors only
      "training": bool,
      "extra": {...}                                  # e.g. optimizer state, step counter
    }

Loading rebuilds the architecture (from ``model_spec``, or from the ``model`` you pass), runs
:func:`fxattn.transform` with the recorded options, and loads the state dict strictly.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, FxAttnError
from .graph_module import AttentionGraphModule, unwrap
from .onnx_export import atomic_path, check_output_path

FORMAT = "fxattn/1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.int64, torch.int32, torch.bool, torch.uint8)}


def save(
    net: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    model_spec: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``net`` (a transformed or stripped fxattn module) to ``path`` atomically."""
    from .tracing import ExampleInputs

    module = unwrap(net)
    info = None
    if isinstance(module, AttentionGraphModule):
        info = module.fxattn_info
    elif isinstance(module, torch.fx.GraphModule):
        info = module.meta.get("fxattn_info")
    if info is None:
        raise CheckpointError(
            f"fxattn.save needs a module made by fxattn.transform or fxattn.strip_ssia, got "
            f"{type(net).__name__}"
        )
    inputs = ExampleInputs.from_user(example_inputs)
    target = check_output_path(path, overwrite)
    payload = {
        "format": FORMAT,
        "kind": "transformed" if isinstance(module, AttentionGraphModule) else "stripped",
        "model_spec": model_spec,
        "model_kwargs": dict(model_kwargs or {}),
        "model_class": info.model_class,
        "inputs": [[list(t.shape), str(t.dtype)] for t in inputs.tensors()],
        "dia": info.dia,
        "ssia": info.ssia,
        "state_dict": dict(module.state_dict()),
        "training": bool(module.training),
        "extra": dict(extra or {}),
    }
    with atomic_path(target, ".tmp") as tmp:
        torch.save(payload, tmp)
    return target


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a saved file's payload with ``weights_only=True`` (no code is unpickled)."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"no such file: {source}")
    if source.is_dir():
        raise CheckpointError(f"{source} is a directory, not an fxattn file")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{source} is not a plain fxattn file: loading it would unpickle arbitrary code "
            f"({str(exc).strip().splitlines()[0]}); refusing. Re-save it with fxattn.save"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{source} is truncated or corrupt ({str(exc).strip().splitlines()[0]})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not an fxattn file (expected format {FORMAT})")
    return payload


def load(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
) -> nn.Module:
    """Rebuild a module written by :func:`save`.

    Args:
        path: the saved file.
        model: the original architecture (random weights are fine). Needed when the file
            was saved without a ``model_spec``.
    """
    from .specs import build_model
    from .transform import strip_ssia, transform

    payload = read(path)
    if model is None:
        if not payload.get("model_spec"):
            raise CheckpointError(
                f"{path} records no model spec; pass the original architecture: "
                "fxattn.load(path, model=MyModel())"
            )
        model = build_model(payload["model_spec"], payload.get("model_kwargs")).model
    try:
        example = tuple(
            torch.zeros(shape, dtype=_DTYPES.get(dtype, torch.float32))
            for shape, dtype in payload["inputs"]
        )
        net: nn.Module = transform(model, example, dia=payload["dia"] or False,
                                   ssia=payload["ssia"] or False)
        if payload["kind"] == "stripped":
            net = strip_ssia(net)
        net.load_state_dict(payload["state_dict"], strict=True)
    except FxAttnError:
        raise
    except (KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} does not match the architecture: {str(exc).strip().splitlines()[0]}"
        ) from None
    net.train(payload["kind"] == "transformed" and bool(payload["training"]))
    return net
