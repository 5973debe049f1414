"""Save and load fxattn modules without unpickling code.

File format (``.fxattn``, read with ``torch.load(weights_only=True)``): a dict of plain data::

    {
      "format": "fxattn/1",
      "kind": "transformed" | "stripped",
      "model_spec": "torchvision:resnet18" | None,   # how to rebuild the architecture
      "model_kwargs": {...},
      "model_class": "torchvision.models.resnet.ResNet",
      "inputs": [[shape, dtype], ...],                # example inputs to re-trace with
      "example": {"args": [...], "kwargs": {...}},    # their structure (images, targets)
      "scope": ["backbone"] | None,                   # the parts of a scoped model
      "dia": {...} | None, "ssia": {...} | None,      # the options of fxattn.DIA / fxattn.SSIA
      "state_dict": {...},                            # tensors only
      "training": bool,
      "extra": {...},                                 # your own plain data (epoch, metrics)
      "optimizer": {...} | None,                      # optimizer.state_dict()
      "scheduler": {...} | None,                      # lr_scheduler.state_dict()
      "step": int | None,                             # the training step counter
      "rng": {"torch": ByteTensor, "cuda": [...], "python": (...), "numpy": {...}} | None
    }

Loading rebuilds the architecture (from ``model_spec``, or from the ``model`` you pass), runs
:func:`fxattn.transform` with the recorded options, and loads the state dict strictly.

A *training checkpoint* is the same file with the optimizer (and scheduler, step counter and
RNG states) filled in. Resuming is two calls, because an optimizer must be built over the
parameters of the module it updates::

    net = fxattn.transform(model, example)                 # or fxattn.load(path, model=model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ckpt = fxattn.load_checkpoint(path, net, optimizer=opt)  # weights, momentum, RNG, step
    start = ckpt.step + 1

Every value is checked when saving, so a file that ``fxattn.save`` writes always loads with
``weights_only=True``: the check names the offending key instead of failing at resume time.
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, FxAttnError
from .files import atomic_path, check_output_path
from .modules.graph_module import AttentionGraphModule, unwrap
from .scope import scope_info

FORMAT = "fxattn/1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64,
                               torch.int64, torch.int32, torch.bool, torch.uint8)}


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
          torch.Size)


class _Stateful(Protocol):
    """Anything with ``state_dict`` / ``load_state_dict``: optimizers and LR schedulers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` restored, and the plain data saved beside the weights.

    Attributes:
        path: the file read.
        step: the step counter given to :func:`save` (``None`` when none was).
        extra: the ``extra`` dict given to :func:`save`.
        restored: which parts were loaded: a subset of ``{"model", "optimizer", "scheduler",
            "rng"}``.
    """

    path: Path
    step: int | None
    extra: dict[str, Any] = field(default_factory=dict)
    restored: tuple[str, ...] = ()


def _check_plain(value: Any, where: str) -> None:
    """Refuse values ``torch.load(weights_only=True)`` would not read back (e.g. lambdas).

    Checking at save time turns a resume that fails days later into an error now, naming the
    key that holds the offending object.
    """
    if isinstance(value, torch.Tensor):
        if type(value) not in (torch.Tensor, nn.Parameter):
            raise CheckpointError(
                f"{where} is a tensor subclass ({type(value).__name__}); store a plain tensor "
                "(.detach().clone()) so the file loads with weights_only=True"
            )
        return
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (dict, OrderedDict)):
        for key, item in value.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(
                    f"{where} has a key of type {type(key).__name__}; use str or int keys"
                )
            _check_plain(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} holds a {type(value).__module__}.{type(value).__qualname__}, which a safe "
        "(weights_only=True) load cannot read; keep checkpoints to tensors, numbers, strings, "
        "lists and dicts"
    )


def rng_state() -> dict[str, Any]:
    """The torch (CPU and, when initialised, CUDA), Python and NumPy RNG states, as plain data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _tuples_to_lists(random.getstate()),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where devices match)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32),
                  "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_tuples_to_lists(v) for v in value]
    return value


def save(
    net: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    model_spec: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    optimizer: _Stateful | None = None,
    scheduler: _Stateful | None = None,
    step: int | None = None,
    rng: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write ``net`` (a transformed or stripped fxattn module) to ``path`` atomically.

    Args:
        net: the module, or a DDP / ``torch.compile`` wrapper around it.
        path: the file to write (replaced atomically: a crash never leaves half a file).
        example_inputs: the batch ``net`` was transformed with (shapes and dtypes are kept to
            re-trace on load).
        model_spec / model_kwargs: how to rebuild the architecture without code (CLI specs).
        extra: your own plain data (epoch, best metric, ...), returned by
            :func:`load_checkpoint`.
        optimizer / scheduler: saved with their ``state_dict()`` so training resumes
            identically (momentum buffers, Adam moments, LR schedule position).
        step: the training step counter.
        rng: also store the torch / Python / NumPy RNG states (needed for an identical resume
            when the loop draws random numbers: dropout, augmentation, shuffling).
        overwrite: replace an existing file.
    """
    from .capture import ExampleInputs

    module = unwrap(net)
    info: Any = scope_info(module)
    scope = info.plan.paths if info is not None else None
    stripped = info.stripped if info is not None else not isinstance(module,
                                                                     AttentionGraphModule)
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
        "kind": "stripped" if stripped else "transformed",
        "model_spec": model_spec,
        "model_kwargs": dict(model_kwargs or {}),
        "model_class": info.model_class,
        "inputs": [[list(t.shape), str(t.dtype)] for t in inputs.tensors()],
        "example": _plain_example(inputs),
        "scope": scope,
        "dia": info.dia,
        "ssia": info.ssia,
        "state_dict": dict(module.state_dict()),
        "training": bool(module.training),
        "extra": dict(extra or {}),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": None if step is None else int(step),
        "rng": rng_state() if rng else None,
    }
    for key in ("extra", "optimizer", "scheduler"):
        _check_plain(payload[key], key)
    with atomic_path(target) as tmp:
        torch.save(payload, tmp)
    return target


_SPEC = "fxattn_tensor"  # {"fxattn_tensor": shape, "dtype": "torch.float32"}: zeros on load


def _plain_example(inputs: Any) -> Any:
    """The example as plain data: the inputs' structure, re-traceable on load.

    Batch data (batch-major tensors, the images of a sample list) is kept as shape and dtype
    (zeros on load, as for plain tensors); everything else - a detector's target dicts (boxes
    must stay valid), timesteps, flags - is kept by value.
    """
    from .capture import is_sample_list

    def encode(value: Any, data: bool) -> Any:
        if isinstance(value, torch.Tensor):
            if data and value.dim() >= 1:
                return {_SPEC: list(value.shape), "dtype": str(value.dtype)}
            return value.detach().cpu().clone()
        if is_sample_list(value):
            return [encode(v, True) if isinstance(v, torch.Tensor) else encode(v, False)
                    for v in value]
        if isinstance(value, Mapping):
            return {k: encode(v, data) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(encode(v, data) for v in value) if type(value) in (
                list, tuple) else [encode(v, data) for v in value]
        return value

    plain = {"args": [encode(a, True) for a in inputs.args],
             "kwargs": {k: encode(v, True) for k, v in inputs.kwargs.items()}}
    try:
        _check_plain(plain, "example_inputs")
    except CheckpointError:
        return None  # not plain data (a custom object): load re-traces with the tensor shapes
    return plain


def _example_from_plain(plain: Mapping[str, Any]) -> Any:
    def decode(value: Any) -> Any:
        if isinstance(value, Mapping) and _SPEC in value:
            return torch.zeros(value[_SPEC], dtype=_DTYPES.get(value["dtype"], torch.float32))
        if isinstance(value, Mapping):
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(decode(v) for v in value)
        return value

    from .capture import ExampleInputs

    return ExampleInputs(tuple(decode(a) for a in plain["args"]),
                         {k: decode(v) for k, v in plain["kwargs"].items()})


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a saved file's payload with ``weights_only=True`` (no code is unpickled)."""
    source = Path(path)
    if not source.exists():
        raise CheckpointError(f"no such file: {source}")
    if source.is_dir():
        raise CheckpointError(f"{source} is a directory, not an fxattn file")
    if not zipfile.is_zipfile(source):  # torch.save writes a zip archive; anything else is cut
        raise CheckpointError(
            f"{source} is truncated or corrupt (not the zip archive torch.save writes); "
            "re-create it with fxattn.save"
        )
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
    from .capture.specs import build_model
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
        example: Any = tuple(
            torch.zeros(shape, dtype=_DTYPES.get(dtype, torch.float32))
            for shape, dtype in payload["inputs"]
        )
        if payload.get("example") is not None:
            example = _example_from_plain(payload["example"])
        net: nn.Module = transform(model, example, dia=payload["dia"] or False,
                                   ssia=payload["ssia"] or False,
                                   scope=payload.get("scope") or "auto")
        if payload["kind"] == "stripped":
            net = strip_ssia(net)
        net.load_state_dict(payload["state_dict"], strict=True)
    except FxAttnError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} does not match the architecture: {str(exc).strip().splitlines()[0]}"
        ) from None
    net.train(payload["kind"] == "transformed" and bool(payload["training"]))
    return net


def load_checkpoint(
    path: str | os.PathLike[str],
    net: nn.Module,
    optimizer: _Stateful | None = None,
    scheduler: _Stateful | None = None,
    *,
    restore_rng: bool = True,
) -> Checkpoint:
    """Resume training: load a file written by :func:`save` into an existing module.

    ``net`` is the module you train (made by :func:`fxattn.transform` with the same options,
    or by :func:`load`; a DDP / compiled wrapper is fine); ``optimizer`` and ``scheduler`` must
    be built over ``net``'s parameters, as in the run that saved the file. Weights are loaded
    strictly, then the optimizer and scheduler states, then (if saved and ``restore_rng``) the
    RNG states. The file is read with ``weights_only=True``.

    Raises:
        CheckpointError: the file is unsafe, corrupt, of another architecture, or lacks the
            optimizer / scheduler state you asked to restore.
    """
    payload = read(path)
    module = unwrap(net)
    restored = ["model"]
    try:
        module.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} does not match this module: {str(exc).strip().splitlines()[0]}; "
            "transform the same architecture with the same DIA/SSIA options"
        ) from None
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler)):
        if target is None:
            continue
        state = payload.get(name)
        if state is None:
            raise CheckpointError(
                f"{path} holds no {name} state; it was saved without {name}=..., so training "
                f"cannot resume identically (drop the {name} argument to load weights only)"
            )
        try:
            target.load_state_dict(state)
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"the {name} state in {path} does not fit this {name}: "
                f"{str(exc).strip().splitlines()[0]}; build it over net.parameters() with the "
                "same parameter groups as the run that saved it"
            ) from None
        restored.append(name)
    if restore_rng and payload.get("rng") is not None:
        set_rng_state(payload["rng"])
        restored.append("rng")
    return Checkpoint(
        path=Path(path),
        step=payload.get("step"),
        extra=dict(payload.get("extra") or {}),
        restored=tuple(restored),
    )
