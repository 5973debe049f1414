"""The ``torch.fx`` tracer fxattn captures models with, and what it treats as opaque.

:class:`FxAttnTracer` is ``torch.fx.Tracer`` taught about the zoos a user's model comes from:
when timm is importable its registries of non-traceable modules and functions
(``timm.layers.get_notrace_modules`` / ``get_notrace_functions``) are used, every
``torchvision.ops`` module is a leaf, and ``math`` plus ``torchvision.ops`` are autowrapped,
as torchvision's own ``create_feature_extractor`` does. Users add their own leaf modules,
autowrapped functions and ``concrete_args`` through :class:`TraceOptions`, which is validated
when it is built (a wrong type is refused there, not deep inside ``torch.fx``).

When symbolic tracing fails, :func:`symbolic_trace` raises one :class:`~fxattn.errors.TraceError`
that names the module being traced (the tracer keeps a stack of them), the user's source line
and the options that fix it. :data:`TRACE_LOCK` serialises fxattn's tracing: ``torch.fx``
patches ``nn.Module.__call__`` process-wide while it traces.

Example::

    >>> import torch, torchvision
    >>> from fxattn.capture.tracer import TraceOptions, symbolic_trace
    >>> model = torchvision.models.resnet18()
    >>> gm = symbolic_trace(model, TraceOptions(leaf_modules=["layer4"]))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_module"][-3:]
    ['layer4', 'avgpool', 'fc']
"""

from __future__ import annotations

import inspect
import math
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import InputError, TraceError

# --------------------------------------------------------------------------- zoo registries


def _timm_leaf_modules() -> list[type[nn.Module]]:
    try:
        from timm.layers import get_notrace_modules
    except ImportError:
        return []
    return list(get_notrace_modules())


def _timm_autowrap_functions() -> list[Callable[..., Any]]:
    try:
        from timm.layers import get_notrace_functions
    except ImportError:
        return []
    # timm registers some by name (strings); the FX tracer wants callables.
    return [fn for fn in get_notrace_functions() if callable(fn)]


def _torchvision_leaf_modules() -> list[type[nn.Module]]:
    try:
        import torchvision.ops
    except ImportError:
        return []
    return [
        obj
        for _, obj in inspect.getmembers(torchvision.ops)
        if inspect.isclass(obj) and issubclass(obj, nn.Module)
    ]


def _default_autowrap_modules() -> tuple[Any, ...]:
    modules: list[Any] = [math]
    try:
        import torchvision.ops

        modules.append(torchvision.ops)
    except ImportError:
        pass
    return tuple(modules)


@dataclass(frozen=True)
class TraceOptions:
    """What the tracer should treat as opaque, on top of the zoo registries.

    Args:
        leaf_modules: module classes, or qualified module names (``"backbone.block3"``), that
            are recorded as one ``call_module`` node instead of being traced through.
        autowrap_functions: free functions recorded as one ``call_function`` node.
        concrete_args: arguments of ``forward`` fixed at trace time (``torch.fx`` semantics).
    """

    leaf_modules: tuple[type[nn.Module] | str, ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()
    concrete_args: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", _as_entries("leaf_modules", self.leaf_modules))
        object.__setattr__(
            self, "autowrap_functions", _as_entries("autowrap_functions", self.autowrap_functions)
        )
        if self.concrete_args is not None and not isinstance(self.concrete_args, Mapping):
            raise InputError(
                f"concrete_args must be a dict of forward() argument names to fixed values, "
                f"got {type(self.concrete_args).__name__}"
            )
        for leaf in self.leaf_modules:
            is_class = inspect.isclass(leaf) and issubclass(leaf, nn.Module)
            if not (isinstance(leaf, str) or is_class):
                raise InputError(
                    f"leaf_modules entries must be nn.Module classes or module names, got {leaf!r}"
                )
        for fn in self.autowrap_functions:
            if not callable(fn):
                raise InputError(f"autowrap_functions entries must be callables, got {fn!r}")


def _as_entries(name: str, value: Any) -> tuple[Any, ...]:
    """``value`` as a tuple; one class, name or function is accepted as a list of one."""
    if isinstance(value, (str, type)) or callable(value):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise InputError(f"{name} must be a list, got {type(value).__name__}") from None


class FxAttnTracer(fx.Tracer):
    """``torch.fx.Tracer`` that knows timm's and torchvision's leaves and records failures.

    When tracing fails, :attr:`module_path_stack` still holds the modules being traced at the
    moment of failure, which lets the error name the module that could not be traced.
    """

    def __init__(self, options: TraceOptions = TraceOptions()) -> None:
        autowrap_functions = tuple(_timm_autowrap_functions()) + options.autowrap_functions
        super().__init__(
            autowrap_modules=_default_autowrap_modules(),
            autowrap_functions=autowrap_functions,
        )
        leaf_types = _timm_leaf_modules() + _torchvision_leaf_modules()
        leaf_types += [leaf for leaf in options.leaf_modules if not isinstance(leaf, str)]
        self.leaf_types: tuple[type[nn.Module], ...] = tuple(leaf_types)
        self.leaf_names: frozenset[str] = frozenset(
            leaf for leaf in options.leaf_modules if isinstance(leaf, str)
        )
        self.module_path_stack: list[tuple[str, type[nn.Module]]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        self.module_path_stack.append((self.path_of_module(m), type(m)))
        result = super().call_module(m, forward, args, kwargs)
        self.module_path_stack.pop()
        return result


# torch.fx symbolic tracing patches ``nn.Module.__call__`` (and autowrapped functions) for the
# whole process and keeps the active patcher in a module global, so two traces in two threads
# corrupt each other ("CURRENT_PATCHER is None"), and a module run in another thread during a
# trace is recorded into it. fxattn serialises its own tracing and shape propagation; running
# other models in other threads while fxattn traces stays unsafe (a torch.fx limitation).
TRACE_LOCK = threading.RLock()


def _check_concrete_args(model: nn.Module, concrete_args: Mapping[str, Any] | None) -> None:
    """Unknown ``concrete_args`` names are silently ignored by torch.fx: refuse them here."""
    if not concrete_args:
        return
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # builtin or C forward: nothing to check against
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(concrete_args) - set(parameters))
    if unknown:
        raise InputError(
            f"concrete_args names {', '.join(map(repr, unknown))}, which "
            f"{type(model).__name__}.forward() does not take (it takes "
            f"{', '.join(map(repr, parameters)) or 'nothing'})"
        )


def symbolic_trace(model: nn.Module, options: TraceOptions) -> fx.GraphModule:
    _check_concrete_args(model, options.concrete_args)
    tracer = FxAttnTracer(options)
    try:
        graph = tracer.trace(model, concrete_args=dict(options.concrete_args or {}) or None)
    except Exception as exc:  # noqa: BLE001 - every tracing failure becomes one clear error
        raise TraceError(_describe_trace_failure(model, tracer, exc)) from exc
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _describe_trace_failure(model: nn.Module, tracer: FxAttnTracer, exc: Exception) -> str:
    if tracer.module_path_stack:
        path, cls = tracer.module_path_stack[-1]
        where = f"module '{path or '<root>'}' ({cls.__name__})"
    else:
        where = f"module '<root>' ({type(model).__name__})"
    line = _user_source_line(exc)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = (
        "Mark that module as a leaf (transform(..., leaf_modules=[ModuleClass or 'its.path'])), "
        "fix the value it branches on with concrete_args={...}, autowrap the function that "
        "branches on a tensor (autowrap_functions=[fn]), or make it capturable by the "
        "export-based fallback (torch.export, e.g. torch.cond for data-dependent branches)"
    )
    return f"cannot trace {where}{line}: {first}. {hint}"


def _user_source_line(exc: BaseException) -> str:
    """The last traceback frame outside torch / fxattn: usually the offending model line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        filename = frame.filename.replace("\\", "/")
        if "/torch/" in filename or "/fxattn/" in filename:
            continue
        return f" at {filename}:{frame.lineno} `{(frame.line or '').strip()}`"
    return ""
