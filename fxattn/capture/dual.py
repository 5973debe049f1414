"""Dual capture: a model as two FX graphs, one for training and one for evaluation.

Modules bake ``self.training`` branches into a captured graph (drop-path, dropout, auxiliary
heads), so - like torchvision's ``create_feature_extractor`` - the model is captured twice,
once per mode, and both graphs share the model's submodules and parameters
(:class:`DualGraphs`). The training graph later carries the SSIA branches; the evaluation
graph never does.

:func:`trace_dual` tries ``torch.fx`` symbolic tracing first (graphs that call the model's own
modules, easy to read). Where it fails - data-dependent Python control flow, Hugging Face
transformers models - :func:`export_dual` captures the model with non-strict
``torch.export`` instead: an ATen-level graph per mode with a dynamic batch dimension,
re-rooted on the model so that it shares its parameters like the ``torch.fx`` pair does.
When both fail, the ``torch.fx`` error (which names the module and the line) is raised with
the export failure appended.

Forward arguments the example leaves at a ``None`` / bool default are fixed at that default
for the symbolic trace (``concrete_args``), so optional branches are traced the way the
model is actually called; a Hugging Face model's key/value cache is switched off for the
capture (``use_cache=False``, :mod:`fxattn.capture.signature`), as a training graph never
needs it.

Example::

    >>> import torch, torchvision
    >>> from fxattn.capture import ExampleInputs, trace_dual
    >>> model = torchvision.models.resnet18()
    >>> graphs = trace_dual(model, ExampleInputs.from_user(torch.randn(2, 3, 64, 64)))
    >>> graphs.tracer, graphs.train.graph is not graphs.eval.graph
    ('torch.fx', True)
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import TraceError, first_line
from .inputs import ExampleInputs
from .shapes import silenced, stderr_kept_on_success
from .signature import (
    bound_forward,
    capture_defaults,
    describe_output_type,
    with_unused_defaults,
)
from .tracer import TRACE_LOCK, TraceOptions, symbolic_trace

_NO_OPTIONS = TraceOptions()  # the default: only the zoo registries


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
    # forward() arguments the capture fixed (:data:`fxattn.capture.signature.CAPTURE_DEFAULTS`:
    # ``use_cache=False`` where the example leaves the cache out); the graphs take them no more
    fixed_arguments: dict[str, Any] = field(default_factory=dict)


def trace_dual(
    model: nn.Module,
    inputs: ExampleInputs,
    options: TraceOptions = _NO_OPTIONS,
    export_fallback: bool = True,
) -> DualGraphs:
    """Trace ``model`` in train and eval mode; restores the model's own mode afterwards.

    ``torch.fx`` symbolic tracing is tried first: its graphs call the model's own modules, which
    keeps them readable. Where it fails (data-dependent control flow, HF transformers models),
    the model is captured with ``torch.export`` instead (see :func:`export_dual`), and
    :attr:`DualGraphs.tracer` says which one served. When both fail, the ``torch.fx`` error
    (which names the module and line) is raised, with the export failure appended; when
    ``forward`` returns a type no graph can carry (a key/value cache object), the error says
    which type and which option fixes it.

    Arguments the example leaves out are fixed for the capture (see
    :mod:`fxattn.capture.signature`): unused optional ones at their defaults, and
    ``use_cache=False`` where ``forward`` takes ``use_cache`` (recorded in
    :attr:`DualGraphs.fixed_arguments`).

    ``model`` should already be the caller's private copy: tracing itself does not change
    parameters, but the returned GraphModules share its submodules.
    """
    with TRACE_LOCK:
        fixed = capture_defaults(model, inputs, options)
        try:
            graphs = _symbolic_dual(model, with_unused_defaults(model, inputs, options, fixed))
        except TraceError as fx_error:
            if not export_fallback:
                raise
            try:
                with silenced("torch.fx.experimental.symbolic_shapes", "torch._export",
                              "torch.export", "torch._dynamo"), stderr_kept_on_success(), \
                        bound_forward(model, fixed):
                    graphs = export_dual(model, inputs)
            except Exception as export_error:  # noqa: BLE001 - report both tracers' failures
                raise TraceError(_both_failed(model, inputs, fx_error, export_error)) \
                    from fx_error
        graphs.fixed_arguments = dict(fixed)
        return graphs


def _both_failed(model: nn.Module, inputs: ExampleInputs, fx_error: TraceError,
                 export_error: BaseException) -> str:
    """One message for two failed captures: the cause first where it is known."""
    output_type = describe_output_type(model, inputs, export_error)
    if output_type is not None:
        return (f"cannot capture {type(model).__name__}: {output_type} (both torch.fx and "
                "the torch.export fallback stop on it)")
    hint = ""
    if "data-dependent" in str(export_error):
        hint = (
            "; the model branches in Python on a tensor's value, e.g. a random "
            "draw deciding whether to skip a layer in training (LayerDrop): make "
            "that decision fixed (layerdrop=0) for the transform"
        )
    return f"{fx_error} (the torch.export fallback failed too: {first_line(export_error)}{hint})"


def _symbolic_dual(model: nn.Module, options: TraceOptions) -> DualGraphs:
    was_training = model.training
    graphs: dict[bool, fx.GraphModule] = {}
    try:
        for mode in (True, False):
            model.train(mode)
            graphs[mode] = symbolic_trace(model, options)
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
