"""Capture a model as FX graphs: one for training, one for evaluation.

Modules bake ``self.training`` branches into a traced graph (drop-path, dropout, auxiliary
heads), so - like torchvision's ``create_feature_extractor`` - the model is traced twice. The
training graph later carries the SSIA branches; the evaluation graph never does.

The tracer knows the zoos: when timm is importable its registries of non-traceable modules and
functions are used, and ``math`` plus ``torchvision.ops`` are autowrapped as torchvision's own
feature extractor does. Users add their own leaf modules, autowrapped functions and
``concrete_args`` through :class:`TraceOptions`.

Example::

    >>> import torch, torchvision
    >>> from fxattn.tracing import trace_dual
    >>> model = torchvision.models.resnet18()
    >>> graphs = trace_dual(model, ExampleInputs.from_user(torch.randn(2, 3, 64, 64)))
    >>> graphs.train.graph is not graphs.eval.graph
    True
"""

from __future__ import annotations

import inspect
import math
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import InputError, TraceError

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
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        object.__setattr__(self, "autowrap_functions", tuple(self.autowrap_functions))
        for leaf in self.leaf_modules:
            if not (isinstance(leaf, str) or (inspect.isclass(leaf) and issubclass(leaf, nn.Module))):
                raise InputError(
                    f"leaf_modules entries must be nn.Module classes or module names, got {leaf!r}"
                )
        for fn in self.autowrap_functions:
            if not callable(fn):
                raise InputError(f"autowrap_functions entries must be callables, got {fn!r}")


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


# --------------------------------------------------------------------------- example inputs


@dataclass(frozen=True)
class ExampleInputs:
    """The user's example inputs, normalised to positional ``args`` and keyword ``kwargs``.

    Accepted forms: one tensor, a tuple/list of positional arguments, or a dict of keyword
    arguments (``{"input_ids": ids}``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_user(cls, example_inputs: Any) -> ExampleInputs:
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if example_inputs is None:
            raise InputError(
                "example_inputs is required: pass a tensor shaped like one real batch "
                "(e.g. torch.randn(2, 3, 224, 224)), a tuple of positional inputs, or a dict"
            )
        if isinstance(example_inputs, torch.Tensor):
            inputs = cls((example_inputs,))
        elif isinstance(example_inputs, Mapping):
            inputs = cls((), dict(example_inputs))
        elif isinstance(example_inputs, (tuple, list)):
            inputs = cls(tuple(example_inputs))
        else:
            raise InputError(
                f"example_inputs must be a tensor, a tuple/list or a dict, got "
                f"{type(example_inputs).__name__}"
            )
        inputs.validate()
        return inputs

    def tensors(self) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves((self.args, self.kwargs))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def validate(self) -> None:
        tensors = self.tensors()
        if not tensors:
            raise InputError("example_inputs holds no tensor; pass at least one input tensor")
        for tensor in tensors:
            if tensor.dim() == 0:
                raise InputError(
                    "example input is a scalar tensor; inputs need a leading batch dimension"
                )
            if tensor.shape[0] == 0:
                raise InputError(
                    f"example input of shape {tuple(tensor.shape)} has an empty batch; "
                    "use a batch of at least 1 (2 or more lets export check a dynamic batch)"
                )
        if len({t.shape[0] for t in tensors}) > 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise InputError(f"example inputs disagree on the batch size: {shapes}")

    @property
    def batch_size(self) -> int:
        return int(self.tensors()[0].shape[0])

    def with_batch(self, batch: int, generator: torch.Generator | None = None) -> ExampleInputs:
        """Fresh random inputs of the same kind with another batch size (for verification)."""

        def fresh(leaf: Any) -> Any:
            if not isinstance(leaf, torch.Tensor):
                return leaf
            shape = (batch, *leaf.shape[1:])
            if leaf.is_floating_point():
                return torch.randn(shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
            if leaf.dtype == torch.bool:
                return torch.ones(shape, dtype=torch.bool, device=leaf.device)
            high = int(leaf.max().item()) + 1 if leaf.numel() else 2
            return torch.randint(0, max(high, 1), shape, generator=generator, dtype=leaf.dtype).to(
                leaf.device
            )

        args, kwargs = torch.utils._pytree.tree_map(fresh, (self.args, self.kwargs))
        return ExampleInputs(tuple(args), dict(kwargs))

    def call(self, module: Callable[..., Any]) -> Any:
        return module(*self.args, **self.kwargs)

    def placeholder_values(self, graph: fx.Graph) -> list[Any]:
        """The inputs in the order of the graph's placeholders (for ``Interpreter.run``)."""
        values: list[Any] = []
        positional = list(self.args)
        for node in graph.find_nodes(op="placeholder"):
            name = node.target.lstrip("*")
            if positional:
                values.append(positional.pop(0))
            elif name in self.kwargs:
                values.append(self.kwargs[name])
            elif node.args:
                values.append(node.args[0])
            else:
                raise InputError(f"example_inputs gives no value for the input {name!r}")
        return values


# --------------------------------------------------------------------------- dual tracing


@dataclass
class DualGraphs:
    """The model traced in both modes; both GraphModules share ``root``'s submodules."""

    root: nn.Module
    train: fx.GraphModule
    eval: fx.GraphModule
    tracer: str  # "torch.fx" (the export-based capture is recorded as "torch.export")


def trace_dual(
    model: nn.Module, inputs: ExampleInputs, options: TraceOptions = TraceOptions()
) -> DualGraphs:
    """Trace ``model`` in train and eval mode; restores the model's own mode afterwards.

    ``model`` should already be the caller's private copy: tracing itself does not change
    parameters, but the returned GraphModules share its submodules.
    """
    was_training = model.training
    graphs: dict[bool, fx.GraphModule] = {}
    try:
        for mode in (True, False):
            model.train(mode)
            graphs[mode] = _symbolic_trace(model, options)
    finally:
        model.train(was_training)
    return DualGraphs(root=model, train=graphs[True], eval=graphs[False], tracer="torch.fx")


def _symbolic_trace(model: nn.Module, options: TraceOptions) -> fx.GraphModule:
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
        "Mark that module as a leaf (TraceOptions(leaf_modules=[...]) / --leaf), fix the "
        "value with concrete_args, or autowrap the function that branches on a tensor"
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


# --------------------------------------------------------------------------- shapes


def propagate_shapes(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Annotate every node with ``meta['tensor_meta']`` by running ``ShapeProp``.

    Runs with all modules in eval mode, without autograd and on a forked RNG, so that shape
    propagation of a *training* graph neither updates batch-norm statistics nor consumes the
    user's random stream. The modules' training flags are restored afterwards.
    """
    flags = {module: module.training for module in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            ShapeProp(gm).propagate(*inputs.placeholder_values(gm.graph))
    except Exception as exc:  # noqa: BLE001 - the model rejected the example inputs
        raise InputError(_describe_run_failure(gm, inputs, exc)) from exc
    finally:
        for module, flag in flags.items():
            module.training = flag


def _describe_run_failure(gm: fx.GraphModule, inputs: ExampleInputs, exc: Exception) -> str:
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs.tensors())
    message = str(exc).strip().splitlines()
    first = message[0] if message else type(exc).__name__
    node = getattr(exc, "__fxattn_node__", None)
    where = f" at node {node}" if node else ""
    return (
        f"the model cannot run on the example inputs [{shapes}]{where}: {first}. "
        "Pass inputs shaped and typed like one real batch (e.g. torch.randn(2, 3, 224, 224))"
    )


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter elements (tied parameters count once)."""
    return sum(p.numel() for p in module.parameters())


def iter_tensor_inputs(node: fx.Node) -> Iterable[fx.Node]:
    """The input nodes of ``node`` that carry tensors (according to shape propagation)."""
    for arg in node.all_input_nodes:
        if "tensor_meta" in arg.meta and _is_tensor_meta(arg.meta["tensor_meta"]):
            yield arg


def _is_tensor_meta(meta: Any) -> bool:
    return hasattr(meta, "shape") and hasattr(meta, "dtype")


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not _is_tensor_meta(meta):
        return None
    return tuple(int(s) for s in meta.shape)


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not _is_tensor_meta(meta):
        return None
    return meta.dtype


__all__: Sequence[str] = [
    "DualGraphs",
    "ExampleInputs",
    "FxAttnTracer",
    "TraceOptions",
    "count_parameters",
    "propagate_shapes",
    "tensor_dtype",
    "tensor_shape",
    "trace_dual",
]
