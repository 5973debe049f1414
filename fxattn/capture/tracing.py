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

import contextlib
import copy
import dataclasses
import inspect
import io
import logging
import math
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from ..errors import InputError, TraceError, first_line

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


# --------------------------------------------------------------------------- example inputs


def _is_sample_list(value: Any) -> bool:
    """A Python ``list`` of per-sample items: CHW images, or target dicts.

    torchvision's detectors take ``images: list[Tensor]`` (each its own size) and
    ``targets: list[dict]``; such a list is a batch of its own, of ``len(list)`` samples.
    A list of 4-D (or larger) tensors is a list of batches (a feature pyramid), not samples.
    """
    if not isinstance(value, list) or not value:
        return False
    images = all(isinstance(v, torch.Tensor) and v.dim() == 3 for v in value)
    return images or all(isinstance(v, Mapping) for v in value)


def _walk_batches(value: Any, tensors: list[torch.Tensor], lists: list[list[Any]]) -> None:
    """Sort a pytree's leaves into batch-major tensors and sample lists (others pass)."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1:
            tensors.append(value)
    elif _is_sample_list(value):
        lists.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _walk_batches(item, tensors, lists)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk_batches(item, tensors, lists)


def _fresh_tensor(leaf: torch.Tensor, shape: tuple[int, ...],
                  generator: torch.Generator | None) -> torch.Tensor:
    """Random values of ``leaf``'s kind: normal floats, all-true masks, ids below its max."""
    if leaf.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
    if leaf.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=leaf.device)
    high = int(leaf.max().item()) + 1 if leaf.numel() else 2
    return torch.randint(0, max(high, 1), shape, generator=generator, dtype=leaf.dtype).to(
        leaf.device
    )


@dataclass(frozen=True)
class ExampleInputs:
    """The user's example inputs, normalised to positional ``args`` and keyword ``kwargs``.

    Accepted forms: one tensor, a tuple/list of positional arguments, or a dict of keyword
    arguments (``{"input_ids": ids}``). Each argument is a pytree whose parts are one of:

    - a *batch-major tensor* (dim >= 1): its leading dimension is the batch; all of them
      must agree on it (an image and its mask, ids and attention mask);
    - a *sample list*: a Python ``list`` of tensors (CHW images, each its own size) or of
      dicts (detection targets), nested inside an argument: a batch of ``len(list)`` of its
      own (torchvision's detectors take ``(images, targets)`` this way);
    - anything else (0-d timesteps, ints, flags, ``None``): passed through unchanged.
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

    def batches(self) -> tuple[list[torch.Tensor], list[list[Any]]]:
        """The batch-major tensors and the sample lists (see the class docstring)."""
        tensors: list[torch.Tensor] = []
        lists: list[list[Any]] = []
        for value in (*self.args, *self.kwargs.values()):
            _walk_batches(value, tensors, lists)
        return tensors, lists

    def validate(self) -> None:
        tensors = self.tensors()
        if not tensors:
            raise InputError("example_inputs holds no tensor; pass at least one input tensor")
        batched, lists = self.batches()
        if not batched and not lists:
            raise InputError(
                "example input is a scalar tensor; inputs need a leading batch dimension"
            )
        for tensor in batched:
            if tensor.shape[0] == 0:
                raise InputError(
                    f"example input of shape {tuple(tensor.shape)} has an empty batch; "
                    "use a batch of at least 1 (2 or more lets export check a dynamic batch)"
                )
        if len({t.shape[0] for t in batched}) > 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in batched)
            raise InputError(f"example inputs disagree on the batch size: {shapes}")
        counts = {len(items) for items in lists}
        if len(counts) > 1:
            raise InputError(
                f"example inputs hold lists of {' and '.join(map(str, sorted(counts)))} samples "
                "(e.g. images and their targets); give one entry per sample in each list"
            )

    @property
    def batch_size(self) -> int:
        """The leading size of the batch-major tensors, else the length of the sample lists."""
        batched, lists = self.batches()
        return int(batched[0].shape[0]) if batched else len(lists[0])

    def with_batch(self, batch: int, generator: torch.Generator | None = None) -> ExampleInputs:
        """Fresh random inputs of the same kind with another batch size (for verification).

        Batch-major tensors get ``batch`` rows of random values; a sample list gets ``batch``
        entries cycling over the example's (so images keep their sizes, each paired with its
        own target: sample ``i`` is a fresh image shaped like example ``i % len``, with that
        example's target dict); other leaves are kept.
        """

        def fresh(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if value.dim() == 0:
                    return value
                return _fresh_tensor(value, (batch, *value.shape[1:]), generator)
            if _is_sample_list(value):
                cycled = [value[i % len(value)] for i in range(batch)]
                return [
                    _fresh_tensor(item, tuple(item.shape), generator)
                    if isinstance(item, torch.Tensor) else item
                    for item in cycled
                ]
            if isinstance(value, dict):
                out = copy.copy(value)  # keeps OrderedDict / BatchEncoding and their order
                for key, item in value.items():
                    out[key] = fresh(item)
                return out
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuples
                return type(value)(*(fresh(v) for v in value))
            if isinstance(value, (list, tuple)):
                return type(value)(fresh(v) for v in value)
            return value

        return ExampleInputs(tuple(fresh(a) for a in self.args),
                             {k: fresh(v) for k, v in self.kwargs.items()})

    def call(self, module: Callable[..., Any]) -> Any:
        return module(*self.args, **self.kwargs)

    def placeholder_values(self, graph: fx.Graph) -> list[Any]:
        """The inputs in the order of the graph's placeholders (for ``Interpreter.run``)."""
        values: list[Any] = []
        positional = list(self.args)
        placeholders = list(graph.find_nodes(op="placeholder"))
        names = [str(node.target).lstrip("*") for node in placeholders]
        variadic = any(str(node.target).startswith("*") for node in placeholders)
        unknown = sorted(set(self.kwargs) - set(names))
        if unknown and not variadic:
            raise InputError(
                f"example_inputs names {', '.join(map(repr, unknown))}, but forward() takes "
                f"{', '.join(map(repr, names)) or 'no inputs'}; use forward()'s argument names"
            )
        for node, name in zip(placeholders, names, strict=True):
            if str(node.target).startswith("**"):
                continue  # ``**kwargs``: extra keywords (the interpreter hands it the rest)
            if positional:
                values.append(positional.pop(0))
            elif name in self.kwargs:
                values.append(self.kwargs[name])
            elif node.args:
                values.append(node.args[0])
            else:
                raise InputError(
                    f"example_inputs gives no value for forward()'s input {name!r}; pass it "
                    f"positionally or as {{{name!r}: tensor}}"
                )
        if positional and not variadic:
            images = all(isinstance(a, torch.Tensor) and a.dim() == 3 for a in self.args)
            hint = "; a list of images is one input: pass ([image, ...],)" if images else ""
            raise InputError(
                f"example_inputs has {len(self.args)} positional inputs but forward() takes "
                f"{len(names)} ({', '.join(map(repr, names))}); pass one value per argument"
                f"{hint}"
            )
        return values


# --------------------------------------------------------------------------- dual tracing


@dataclass
class DualGraphs:
    """The model traced in both modes; both GraphModules share ``root``'s submodules."""

    root: nn.Module
    train: fx.GraphModule
    eval: fx.GraphModule
    tracer: str  # "torch.fx" (the export-based capture is recorded as "torch.export")
    # The batch size torch.export specialised the graphs to, when it could not keep the batch
    # dynamic (a shape guard in the model's code it cannot prove for every batch size).
    fixed_batch: int | None = None


# torch.fx symbolic tracing patches ``nn.Module.__call__`` (and autowrapped functions) for the
# whole process and keeps the active patcher in a module global, so two traces in two threads
# corrupt each other ("CURRENT_PATCHER is None"), and a module run in another thread during a
# trace is recorded into it. fxattn serialises its own tracing and shape propagation; running
# other models in other threads while fxattn traces stays unsafe (a torch.fx limitation).
TRACE_LOCK = threading.RLock()


def trace_dual(
    model: nn.Module,
    inputs: ExampleInputs,
    options: TraceOptions = TraceOptions(),
    export_fallback: bool = True,
) -> DualGraphs:
    """Trace ``model`` in train and eval mode; restores the model's own mode afterwards.

    ``torch.fx`` symbolic tracing is tried first: its graphs call the model's own modules, which
    keeps them readable. Where it fails (data-dependent control flow, HF transformers models),
    the model is captured with ``torch.export`` instead (see :func:`export_dual`), and
    :attr:`DualGraphs.tracer` says which one served. When both fail, the ``torch.fx`` error
    (which names the module and line) is raised, with the export failure appended.

    ``model`` should already be the caller's private copy: tracing itself does not change
    parameters, but the returned GraphModules share its submodules.
    """
    with TRACE_LOCK:
        try:
            return _symbolic_dual(model, _with_unused_defaults(model, inputs, options))
        except TraceError as fx_error:
            if not export_fallback:
                raise
            try:
                with _silenced("torch.fx.experimental.symbolic_shapes", "torch._export",
                               "torch.export", "torch._dynamo"), _stderr_kept_on_success():
                    return export_dual(model, inputs)
            except Exception as export_error:  # noqa: BLE001 - report both tracers' failures
                hint = ""
                if "data-dependent" in str(export_error):
                    hint = (
                        "; the model branches in Python on a tensor's value, e.g. a random "
                        "draw deciding whether to skip a layer in training (LayerDrop): make "
                        "that decision fixed (layerdrop=0) for the transform"
                    )
                raise TraceError(
                    f"{fx_error} (the torch.export fallback failed too: "
                    f"{first_line(export_error)}{hint})"
                ) from fx_error


def _with_unused_defaults(
    model: nn.Module, inputs: ExampleInputs, options: TraceOptions
) -> TraceOptions:
    """Fix ``forward`` arguments the example leaves at a ``None`` / bool default.

    Optional inputs (``mask=None``, ``return_dict=None``, ``output_attentions=False``) guard
    ``if mask is not None:`` branches; traced as proxies, the branch would be taken and the
    graph would need a mask nobody passes (Hiera). Fixed at their defaults, as the model is
    actually called, they trace the path the example runs. ``concrete_args`` given by the user
    win; the graph still accepts the argument and checks it has the traced value.
    """
    try:
        signature = inspect.signature(model.forward)
        supplied = signature.bind_partial(*inputs.args, **inputs.kwargs).arguments
    except (TypeError, ValueError):
        return options
    fixed = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name not in supplied
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and (parameter.default is None or isinstance(parameter.default, bool))
    }
    fixed.update(options.concrete_args or {})
    if not fixed:
        return options
    return dataclasses.replace(options, concrete_args=fixed)


def _symbolic_dual(model: nn.Module, options: TraceOptions) -> DualGraphs:
    was_training = model.training
    graphs: dict[bool, fx.GraphModule] = {}
    try:
        for mode in (True, False):
            model.train(mode)
            graphs[mode] = _symbolic_trace(model, options)
    finally:
        model.train(was_training)
    return DualGraphs(root=model, train=graphs[True], eval=graphs[False], tracer="torch.fx")


def export_dual(model: nn.Module, inputs: ExampleInputs) -> DualGraphs:
    """Capture ``model`` with ``torch.export`` (non-strict), once per mode, on one root.

    Non-strict export runs the real Python forward, so data-dependent Python, dataclass
    outputs and integer inputs are fine. The ATen-level training IR keeps the model's
    parameters (``get_attr`` on their qualified names), keeps in-place ops (batch norm
    updates its running statistics in the training graph, as the module would) and bakes
    ``self.training`` into each graph, hence one capture per mode. The batch dimension of every
    input is dynamic (``Dim.AUTO``; an example of batch 1 is captured repeated twice),
    so nothing is specialised to the example batch size - unless a shape guard in the model's
    code pins it, which :attr:`DualGraphs.fixed_batch` then records. The unlifted
    graphs keep their pytree codegen: they take and return exactly what the model does (dicts,
    ``ModelOutput`` dataclasses, tuples).

    Both graphs are re-rooted on ``model`` itself (constants lifted by export are attached to
    it under ``fxattn_const*``), so they share parameters like the ``torch.fx`` pair does.
    """
    was_training = model.training
    attempts = [inputs]
    if inputs.batch_size < 2 and not inputs.batches()[1]:
        # export specialises a dimension of size 1 (its 0/1 rule): capture on the example
        # repeated twice first (valid ids and masks stay valid), so the batch stays dynamic
        attempts.insert(0, ExampleInputs(*torch.utils._pytree.tree_map(
            lambda leaf: torch.cat([leaf, leaf]) if isinstance(leaf, torch.Tensor)
            and leaf.dim() >= 1 else leaf, (inputs.args, inputs.kwargs))))
    for attempt in attempts:
        graphs: dict[bool, fx.Graph] = {}
        fixed: set[int] = set()
        rejected = False
        try:
            for mode in (True, False):
                model.train(mode)
                graphs[mode], batch = _export_graph(
                    model, attempt, prefix=f"fxattn_const_{mode:d}_")
                fixed |= {batch} if batch is not None else set()
        except Exception:
            if attempt is inputs:
                raise
            rejected = True  # the model rejects a batch of two: capture at the user's batch
        finally:
            model.train(was_training)
        if attempt is inputs or not (fixed or rejected):
            break
        # rejected or pinned anyway: capture at the user's own batch, so their batches run
        _drop_lifted_constants(model)
    name = type(model).__name__
    train = fx.GraphModule(model, graphs[True], name)
    evaluation = fx.GraphModule(model, graphs[False], name)
    return DualGraphs(root=model, train=train, eval=evaluation, tracer="torch.export",
                      fixed_batch=max(fixed) if fixed else None)


def _drop_lifted_constants(model: nn.Module) -> None:
    """Remove the ``fxattn_const*`` attributes an earlier capture attached to ``model``."""
    names = {*vars(model), *model._parameters, *model._buffers, *model._modules}
    for key in sorted(k for k in names if k.startswith("fxattn_const_")):
        delattr(model, key)  # nn.Module.__delattr__ handles parameters, buffers, submodules


def _specialised_batch(program: torch.export.ExportedProgram) -> int | None:
    """The batch size ``Dim.AUTO`` fell back to, if torch.export specialised it.

    ``Dim.AUTO`` keeps a dimension symbolic where it can and silently makes it a constant
    where a guard in the model's code pins it (a forward that checks ``x.shape[0]``). The
    graph then works at that batch only. (RAFT is not such a case at capture: ``Dim.AUTO``
    gives its two images separate batch symbols; its pin appears only when the ONNX export
    asks for one shared batch, see ``fxattn.onnx_export``.)
    """
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if node.name in user_inputs and isinstance(value, torch.Tensor) and value.dim() >= 1:
            size = value.shape[0]
            if is_concrete_int(size):  # a plain int, or a SymInt that was made a constant
                return int(size)
            bounds = program.range_constraints.get(size.node.expr)
            if bounds is not None and bounds.lower == bounds.upper:
                return int(bounds.lower)
    return None


def _export_graph(
    model: nn.Module, inputs: ExampleInputs, prefix: str
) -> tuple[fx.Graph, int | None]:
    dynamic = torch.utils._pytree.tree_map(
        lambda leaf: {0: torch.export.Dim.AUTO} if isinstance(leaf, torch.Tensor) else None,
        (inputs.args, inputs.kwargs),
    )
    if inputs.kwargs:
        bound = inspect.signature(model.forward).bind(*dynamic[0], **dynamic[1])
        dynamic_shapes: Any = dict(bound.arguments)
    else:
        dynamic_shapes = tuple(dynamic[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            model, inputs.args, inputs.kwargs or None, dynamic_shapes=dynamic_shapes,
            strict=False,
        )
        unlifted = program.module()
    fixed_batch = _specialised_batch(program)
    graph = unlifted.graph
    for node in list(graph.nodes):
        # The guard-checking submodule (when present) only re-validates input shapes.
        if node.op == "call_module" and not node.users:
            graph.erase_node(node)
    constants = 0
    for node in graph.find_nodes(op="get_attr"):
        target = str(node.target)
        try:
            value = _fetch_attr(model, target)
            own = value is _fetch_attr(unlifted, target)
        except AttributeError:
            own = False
        if own:
            continue
        new_target = f"{prefix}{constants}"
        constants += 1
        value = _fetch_attr(unlifted, target)
        if isinstance(value, nn.Parameter):
            model.register_parameter(new_target, value)
        elif isinstance(value, torch.Tensor):
            model.register_buffer(new_target, value, persistent=False)
        elif isinstance(value, nn.Module):  # subgraphs of higher-order ops (cond, autocast)
            model.add_module(new_target, value)
        else:
            setattr(model, new_target, value)
        node.target = new_target
    graph.owning_module = None  # now rooted on ``model``; fx.GraphModule re-owns and checks it
    return graph, fixed_batch


def _fetch_attr(root: Any, target: str) -> Any:
    value = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


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


def _symbolic_trace(model: nn.Module, options: TraceOptions) -> fx.GraphModule:
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


# --------------------------------------------------------------------------- shapes


def propagate_shapes(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    """Annotate every node with ``meta['tensor_meta']`` by running ``ShapeProp``.

    Runs with all modules in eval mode, without autograd and on a forked RNG, so that shape
    propagation of a *training* graph neither updates batch-norm statistics nor consumes the
    user's random stream. The modules' training flags are restored afterwards.
    """
    with TRACE_LOCK:
        _propagate_shapes(gm, inputs)


def _propagate_shapes(gm: fx.GraphModule, inputs: ExampleInputs) -> None:
    flags = {module: module.training for module in gm.modules()}
    # An exported training graph has ``training=True`` baked into its batch-norm ops, which
    # update the running statistics in place whatever the module flags say: restore them.
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    values = _graph_inputs(gm, inputs)
    recorder = _ShapeRecorder(gm)
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if not _run_with_fake_tensors(recorder, values):
                recorder = _ShapeRecorder(gm)
                recorder.run(*values)
    except Exception as exc:  # noqa: BLE001 - the model rejected the example inputs
        raise InputError(_describe_run_failure(recorder.failed, inputs, exc)) from exc
    finally:
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _run_with_fake_tensors(recorder: ShapeProp, values: list[Any]) -> bool:
    """Shape propagation on fake tensors: shapes and dtypes without computing anything.

    Several times faster than running the model, and nothing real (batch-norm statistics
    included) can be written. Returns ``False`` when some op cannot run on fake tensors
    (data-dependent leaf modules); the caller then propagates with the real inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # A failing meta kernel is logged by torch with its whole traceback on stderr; the real
    # run that follows reports the failure as one clear InputError, so drop those records.
    try:
        with _silenced("torch._subclasses.fake_tensor"), mode:
            fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
            recorder.run(*fake)
    except Exception:  # noqa: BLE001 - fall back to a real run, which reports real errors
        return False
    return True


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _silenced(*loggers: str) -> Iterator[None]:
    """Drop what torch logs while fxattn *tries* something it will report itself.

    torch logs failed attempts with whole tracebacks or graph dumps on stderr (fake-tensor
    meta kernels, torch.export's data-dependent guards); when fxattn falls back or raises
    its own one-line error, those records are noise. Callers hold ``TRACE_LOCK``.
    """
    drop = _DropRecords()
    # A logger's filters see only its own records, not its children's: filter every logger
    # under each name (``torch.export`` -> ``torch.export._trace``, ...).
    known = list(logging.root.manager.loggerDict)
    targets = [logging.getLogger(name) for name in known
               if any(name == prefix or name.startswith(prefix + ".") for prefix in loggers)]
    targets += [logging.getLogger(name) for name in loggers]
    for logger in targets:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in targets:
            logger.removeFilter(drop)


@contextlib.contextmanager
def _stderr_kept_on_success() -> Iterator[None]:
    """Hold back what is printed on stderr; show it only if the block succeeds.

    ``torch.export`` prints the partial graph of a failed capture straight to ``sys.stderr``.
    When the export fallback fails too, fxattn raises one TraceError that says why, so that
    dump is dropped. Callers hold ``TRACE_LOCK``.
    """
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield
    sys.stderr.write(buffer.getvalue())


def _graph_inputs(gm: fx.GraphModule, inputs: ExampleInputs) -> list[Any]:
    """The flat placeholder values; exported graphs flatten ``(args, kwargs)`` by their spec."""
    codegen = gm.graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info.in_spec is not None:
        from torch.fx._pytree import tree_flatten_spec

        return list(tree_flatten_spec((inputs.args, inputs.kwargs), codegen.pytree_info.in_spec))
    return inputs.placeholder_values(gm.graph)


def _mutable_literals(value: Any) -> Any:
    """Plain lists and dicts in place of fx's ``immutable_list`` / ``immutable_dict``.

    The generated ``forward`` writes a list argument as a fresh literal on every call, so a
    callee may mutate it (torchvision's ``shifted_window_attention_3d`` adjusts its
    ``window_size`` in place); ``fx.Interpreter`` passes the graph's immutable copies instead,
    and such a callee would fail under shape propagation only.
    """
    if isinstance(value, immutable_list) or type(value) is tuple:
        items = [_mutable_literals(v) for v in value]
        return items if isinstance(value, immutable_list) else tuple(items)
    if isinstance(value, immutable_dict):
        return {k: _mutable_literals(v) for k, v in value.items()}
    return value  # node values (a list a callee returned) keep their identity


class _ShapeRecorder(ShapeProp):
    """``ShapeProp`` that remembers the failing node instead of printing a traceback.

    torch's ``ShapeProp.run_node`` prints the whole traceback to stderr and replaces the
    error by a dump of the node; the user needs the original one-line reason and the module.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            with self._set_current_node(n):
                args, kwargs = self.fetch_args_kwargs_from_env(n)
                args, kwargs = _mutable_literals(args), _mutable_literals(kwargs)
                result = getattr(self, n.op)(n.target, args, kwargs)
        except Exception:
            self.failed = n
            raise
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def _node_location(node: fx.Node | None) -> str:
    """``module 'layer1.0.conv1' (Conv2d)`` for the node a run failed at."""
    if node is None:
        return ""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        path = str(node.target)
        kind = next((v[1] for v in reversed(stack.values()) if v[0] == path), None)
    elif stack:
        path, kind = list(stack.values())[-1]
    else:
        return f" at node '{node.name}'"
    name = getattr(kind, "__name__", None) or str(kind).rsplit(".", 1)[-1].strip("'>")
    return f" in module '{path}' ({name})" if kind else f" in module '{path}'"


def _describe_run_failure(node: fx.Node | None, inputs: ExampleInputs, exc: Exception) -> str:
    tensors = inputs.tensors()
    shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors)
    message = str(exc).strip().splitlines()
    first = message[0] if message else type(exc).__name__
    hint = "pass inputs shaped and typed like one real batch (e.g. torch.randn(2, 3, 224, 224))"
    if any(not t.is_floating_point() for t in tensors) and "scalar type" in first:
        hint = "this model wants floating-point inputs: convert them with .float(); " + hint
    where = _node_location(node)
    return f"the model cannot run on the example inputs [{shapes}]{where}: {first}; {hint}"


def _check_not_wrapped(model: nn.Module) -> None:
    """Wrappers hide the Python forward that torch.fx traces: ask for the module inside."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace; "
            "pass the Python nn.Module it was scripted from"
        )
    if hasattr(model, "_orig_mod"):
        raise InputError(
            "the model is wrapped by torch.compile; pass model._orig_mod to fxattn and "
            "compile the module fxattn returns"
        )
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise InputError(
            f"the model is wrapped in {type(model).__name__}; pass model.module to fxattn "
            "and wrap the module fxattn returns"
        )


def check_model_inputs(model: nn.Module, inputs: ExampleInputs) -> None:
    """Refuse a model/input mismatch before tracing, with the fix in the message.

    Catches what would otherwise surface as an obscure error deep inside a kernel: parameters
    on the meta device (never materialised), floating inputs of another dtype than the
    model's parameters, and inputs on another device than the parameters.
    """
    _check_not_wrapped(model)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise InputError(
            f"{type(model).__name__} has parameters on the meta device (not materialised); "
            "call model.to_empty(device='cpu') and load weights first"
        )
    floating = [t for t in tensors if t.is_floating_point()]
    if not floating:
        return
    dtype, device = floating[0].dtype, floating[0].device
    for tensor in inputs.tensors():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            raise InputError(
                f"example input is {str(tensor.dtype).replace('torch.', '')} but the model's "
                f"parameters are {str(dtype).replace('torch.', '')}; convert the input "
                f"(x.to({dtype})) or the model (model.to({tensor.dtype}))"
            )
        if tensor.device != device:
            raise InputError(
                f"example input is on {tensor.device} but the model is on {device}; move "
                "them to the same device"
            )


__all__: Sequence[str] = [
    "DualGraphs",
    "ExampleInputs",
    "check_model_inputs",
    "FxAttnTracer",
    "TraceOptions",
    "propagate_shapes",
    "trace_dual",
]
