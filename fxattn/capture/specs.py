"""Model specs of the command line: ``torchvision:resnet50``, ``timm:vit_tiny_patch16_224``,
``package.module:factory`` or a file saved by :func:`fxattn.save`.

Every model is built with random weights (no download). ``package.module:factory`` *imports
and runs code* from that module - only name modules you trust. No spec string is ever passed to
``eval``/``exec``.
"""

from __future__ import annotations

import difflib
import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelSpecError

_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass(frozen=True)
class BuiltModel:
    model: nn.Module
    spec: str
    input_shape: tuple[int, ...]  # default example input (batch 2)


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> BuiltModel:
    """Build the model named by ``spec`` with random weights."""
    kwargs = dict(kwargs or {})
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("empty model spec; use e.g. torchvision:resnet18 or timm:resnet50")
    source, _, name = spec.partition(":")
    try:
        if source == "torchvision" and name:
            return _torchvision(name, spec, kwargs)
        if source == "timm" and name:
            return _timm(name, spec, kwargs)
        if _IMPORT_SPEC.match(spec):
            return _factory(spec, kwargs)
    except ModelSpecError:
        raise
    except TypeError as exc:  # usually an option the factory does not take
        raise ModelSpecError(f"cannot build {spec} with options {kwargs}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the factory's own failure, reported in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ModelSpecError(
            f"building {spec} with options {kwargs} failed: {type(exc).__name__}: {first}"
        ) from exc
    raise ModelSpecError(
        f"unknown model spec {spec!r}; use torchvision:NAME, timm:NAME, package.module:factory "
        "or the path of a file saved by fxattn"
    )


def _torchvision(name: str, spec: str, kwargs: dict[str, Any]) -> BuiltModel:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        raise ModelSpecError(f"torchvision has no model {name!r}{_suggest(name, names)}")
    if name in torchvision.models.list_models(module=torchvision.models.detection):
        kwargs = {"weights_backbone": None, **kwargs}  # never download a backbone
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    size = 299 if name == "inception_v3" else 224
    return BuiltModel(model, spec, (2, 3, size, size))


def _timm(name: str, spec: str, kwargs: dict[str, Any]) -> BuiltModel:
    import timm

    if not timm.is_model(name):
        raise ModelSpecError(f"timm has no model {name!r}{_suggest(name, timm.list_models())}")
    model = timm.create_model(name, pretrained=False, **kwargs)
    input_size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    return BuiltModel(model, spec, (2, *input_size))


def _factory(spec: str, kwargs: dict[str, Any]) -> BuiltModel:
    module_name, factory_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelSpecError(
            f"cannot import {module_name!r} for model spec {spec}: {exc}"
        ) from None
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ModelSpecError(f"{module_name} has no callable {factory_name!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned {type(model).__name__}, not an nn.Module")
    shape = getattr(model, "example_input_shape", None) or getattr(
        module, "EXAMPLE_INPUT_SHAPE", (2, 3, 224, 224)
    )
    return BuiltModel(model, spec, tuple(shape))


def is_saved_file(spec: str) -> bool:
    return Path(spec).suffix in (".fxattn", ".pt", ".pth") or Path(spec).exists()


def parse_shape(text: str) -> tuple[int, ...]:
    """``"2,3,224,224"`` -> ``(2, 3, 224, 224)``, with a clear error otherwise."""
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise ModelSpecError(
            f"input shape {text!r} is not a comma-separated list of integers"
        ) from None
    if len(shape) < 2 or any(s <= 0 for s in shape):
        raise ModelSpecError(
            f"input shape {text!r} needs a batch and positive sizes, e.g. 2,3,224,224"
        )
    return shape


def random_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A reproducible random example input; a shape too large for memory is a clear error."""
    try:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    except (RuntimeError, MemoryError) as exc:
        gigabytes = math.prod(shape) * 4 / 1e9
        raise ModelSpecError(
            f"cannot allocate an example input of shape {','.join(map(str, shape))} "
            f"({gigabytes:.1f} GB in float32): {str(exc).strip().splitlines()[0][:80]}; use a "
            "smaller --input-shape"
        ) from None
