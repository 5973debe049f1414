"""Shape propagation: every node of a captured graph annotated with its output's shape.

The analysis finds residual sites and stage outputs from the shapes on the graph's nodes, so
after capture :func:`propagate_shapes` runs the graph once and records
``node.meta['tensor_meta']`` (``torch.fx``'s ``ShapeProp`` format) and ``node.meta['type']``.
It runs on fake tensors where every op allows it (shapes and dtypes without computing
anything), else on the real example inputs; either way in eval mode, without autograd, on a
forked RNG and with the buffers restored, so that propagating a *training* graph neither
updates batch-norm statistics nor consumes the user's random stream.

A failing run raises one :class:`~fxattn.errors.InputError` naming the module it failed in
and the example's shapes. The log-silencing helpers here (:func:`silenced`,
:func:`stderr_kept_on_success`) drop what torch logs while fxattn only *tries* something
(a fake-tensor run, a ``torch.export`` fallback) that it reports itself if it fails.

Example::

    >>> import torch, torchvision
    >>> from fxattn.capture import ExampleInputs, propagate_shapes
    >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18())
    >>> propagate_shapes(gm, ExampleInputs.from_user(torch.randn(2, 3, 64, 64)))
    >>> relu = next(n for n in gm.graph.nodes if n.name == "layer1_0_relu")
    >>> tuple(relu.meta["tensor_meta"].shape)
    (2, 64, 16, 16)
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from ..errors import InputError
from .inputs import ExampleInputs
from .tracer import TRACE_LOCK


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
        with silenced("torch._subclasses.fake_tensor"), mode:
            fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
            recorder.run(*fake)
    except Exception:  # noqa: BLE001 - fall back to a real run, which reports real errors
        return False
    return True


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def silenced(*loggers: str) -> Iterator[None]:
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
def stderr_kept_on_success() -> Iterator[None]:
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
