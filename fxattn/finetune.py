"""Optimizer parameter groups for fine-tuning a transformed model: :func:`param_groups`.

A trained model that gets DIA has two kinds of parameters: its own, already trained, which a
fine-tuning run should move gently (a small learning rate), and fxattn's new ones (the DIA
modules under ``fxattn_dia``, SSIA's training-only projections under ``fxattn_ssia``), which
start from scratch (or from the identity gate of ``DIA(init="identity")``) and need a larger
one. ``param_groups`` returns the two groups as optimizer param-group dicts, the format every
``torch.optim`` optimizer takes, and so Hugging Face ``Trainer(optimizers=(opt, sched))`` and
Lightning's ``configure_optimizers`` too (``docs/finetuning.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from .capture.wrappers import unwrap
from .errors import ConfigError, NotTransformedError
from .modules.graph_module import AttentionGraphModule
from .names import DIA_ROOT, SSIA_ROOT
from .scope import scope_info

#: ``group["name"]`` of the two groups (torch optimizers keep extra keys; handy in logs)
MODEL_GROUP = "model"
NEW_GROUP = "fxattn"


def _is_new(name: str) -> bool:
    """A parameter fxattn added: one below a ``fxattn_dia`` / ``fxattn_ssia`` root, at any
    depth (a scoped detector has them at ``backbone.fxattn_dia...``)."""
    return any(part in (DIA_ROOT, SSIA_ROOT) for part in name.split("."))


def _below(name: str, paths: Sequence[str]) -> bool:
    return any(name.startswith(f"{path}.") for path in paths)


def _check_paths(module: nn.Module, new_modules: Any) -> tuple[str, ...]:
    """``new_modules`` as a tuple of existing module paths (``"fc"``, ``"classifier.1"``)."""
    paths = (new_modules,) if isinstance(new_modules, str) else new_modules
    try:
        paths = tuple(paths)
    except TypeError:
        raise ConfigError(f"new_modules must be a list of module paths, got {new_modules!r}"
                          ) from None
    known = dict(module.named_modules())
    for path in paths:
        if not isinstance(path, str) or not path or path not in known:
            raise ConfigError(
                f"new_modules entry {path!r} is not a submodule of {type(module).__name__}; "
                "use paths as net.named_modules() prints them (e.g. 'fc')"
            )
    return paths


def _check_rate(name: str, value: Any, *, positive: bool) -> float | None:
    if value is None and not positive:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def split_parameters(
    net: nn.Module, new_modules: Sequence[str] = ()
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(model's own, new)`` trainable parameters of a transformed ``net``: new are fxattn's
    and those below the module paths ``new_modules`` (a replaced head).

    Looks through DDP / DataParallel / ``torch.compile`` wrappers; works on scoped models (a
    detector whose backbone was transformed) and on stripped (lean) ones. Parameters with
    ``requires_grad=False`` (a frozen backbone) are left out, as Hugging Face's
    ``Trainer`` does; tied parameters appear once.

    Raises:
        NotTransformedError: ``net`` carries no fxattn attention.
    """
    if not isinstance(net, nn.Module):
        raise NotTransformedError(
            f"param_groups needs a module returned by fxattn.transform, got "
            f"{type(net).__name__}"
        )
    module = unwrap(net)
    named = list(module.named_parameters())
    transformed = (
        isinstance(module, AttentionGraphModule)
        or scope_info(module) is not None
        or any(_is_new(name) for name, _ in named)
    )
    if not transformed:
        raise NotTransformedError(
            f"param_groups needs a module returned by fxattn.transform, got "
            f"{type(module).__name__} without fxattn attention; call "
            "fxattn.transform(model, example_inputs, dia=fxattn.DIA(init='identity')) first"
        )
    paths = _check_paths(module, new_modules)
    new_names = {name for name, _ in named if _is_new(name) or _below(name, paths)}
    own = [p for name, p in named if p.requires_grad and name not in new_names]
    new = [p for name, p in named if p.requires_grad and name in new_names]
    return own, new


def param_groups(
    net: nn.Module,
    *,
    lr: float,
    new_lr: float,
    weight_decay: float | None = None,
    new_weight_decay: float | None = None,
    new_modules: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Optimizer param groups: the model's own parameters at ``lr``, fxattn's at ``new_lr``.

    Pass the result to any optimizer in place of ``net.parameters()``::

        net = fxattn.transform(trained, x, dia=fxattn.DIA(init="identity"))
        opt = torch.optim.AdamW(fxattn.param_groups(net, lr=1e-4, new_lr=1e-3))

    Each group is ``{"params": [...], "lr": ..., "name": "model" | "fxattn"}``, with
    ``"weight_decay"`` only when given (the optimizer's default otherwise); a group with no
    parameter (``dia=False`` with the spatial SSIA map adds none) is left out. Schedulers scale
    each group's ``lr`` alike, so the ratio survives warm-up and decay.

    Args:
        net: a module made by :func:`fxattn.transform` (or its lean copy from
            :func:`fxattn.strip_ssia`), possibly wrapped by DDP or ``torch.compile``.
        lr: learning rate of the model's own (trained) parameters, > 0.
        new_lr: learning rate of DIA's and SSIA's new parameters, > 0 (commonly 10x ``lr``).
        weight_decay / new_weight_decay: weight decay of each group, >= 0 (``None``: the
            optimizer's default).
        new_modules: module paths of the model's own whose parameters are new too and join
            the ``new_lr`` group, e.g. ``["fc"]`` for a head replaced for the new task.

    Raises:
        NotTransformedError: ``net`` carries no fxattn attention.
        ConfigError: a learning rate is not a positive finite number, a weight decay not a
            finite number >= 0, or ``new_modules`` names no submodule.
    """
    rates = {
        "lr": _check_rate("lr", lr, positive=True),
        "new_lr": _check_rate("new_lr", new_lr, positive=True),
        "weight_decay": _check_rate("weight_decay", weight_decay, positive=False),
        "new_weight_decay": _check_rate("new_weight_decay", new_weight_decay, positive=False),
    }
    own, new = split_parameters(net, new_modules)
    groups = []
    for name, params, prefix in ((MODEL_GROUP, own, ""), (NEW_GROUP, new, "new_")):
        if not params:
            continue
        group: dict[str, Any] = {"params": params, "lr": rates[f"{prefix}lr"], "name": name}
        if rates[f"{prefix}weight_decay"] is not None:
            group["weight_decay"] = rates[f"{prefix}weight_decay"]
        groups.append(group)
    return groups
