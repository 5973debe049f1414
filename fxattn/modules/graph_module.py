"""The module :func:`fxattn.transform` returns: one module hierarchy, two graphs.

Like torchvision's ``DualGraphModule``: ``train()`` runs the training graph (with the SSIA
branches), ``eval()`` the evaluation graph (without). Parameters and buffers are shared by both
graphs, and ``state_dict`` keys are the original model's plus ``fxattn_dia.*`` (and, for the
``channel`` SSIA map, ``fxattn_ssia.*``).

It keeps the original model's interface, because training frameworks call it (ultralytics'
trainers call ``set_head_attr`` and ``loss`` and read ``stride``; Hugging Face reads ``config``
and calls ``save_pretrained``):

- its class derives from the original class too (:func:`interface_class`), so methods and
  class attributes resolve as on the original, bound to the transformed module: a method that
  calls ``self.forward`` / ``self(...)`` runs the transformed graph;
- the submodule containers the graphs reach are the original ones (``net.model[-1]`` is the
  detection head), and the original's plain instance attributes (``config``, ``stride``,
  ``names``) are carried over;
- a call whose positional input is a container where the graph was traced with a tensor (an
  ultralytics trainer's ``net(batch_dict)``) runs the original ``forward`` on the transformed
  module, whose dispatch (``self.loss(batch)``) calls the graph back with the tensor.

It deep-copies (EMA, ``copy.deepcopy``) and pickles (``torch.save(net)``, checkpoints that hold
the module): both graphs travel with it. Unpickling needs the original model's class to be
importable, like any pickled module.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import (  # fx's own pickling machinery, reused for two graphs
    _deserialize_graph_module,
    _format_import_block,
    _forward_from_src,
)
from torch.package import sys_importer

from ..analysis import Plan
from ..capture.signature import describe_fixed_mismatch
from ..capture.wrappers import unwrap  # noqa: F401 - re-exported: callers import it from here
from ..errors import InputError
from ..names import DIA_ROOT, FXATTN_META, SSIA_ROOT


@dataclass
class TransformInfo:
    """How a module was made; enough to rebuild it (see :mod:`fxattn.serialization`)."""

    plan: Plan
    dia: dict[str, Any] | None
    ssia: dict[str, Any] | None
    model_class: str
    extra: dict[str, Any] = field(default_factory=dict)


# Instance attributes of GraphModule / AttentionGraphModule: never carried over from a root.
_OWN_ATTRIBUTES = frozenset(nn.Module().__dict__) | {
    "_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls", "_tracer_extras",
    "meta", "train_graph", "eval_graph", "fxattn_info", "forward", "_in_spec", "_out_spec",
    "_erase_node_hooks", "_replace_hooks", "_create_node_hooks", "_deepcopy_hooks",
    "_fxattn_tensor_inputs", "_fxattn_in_base_forward",
}


def _copy_attr(source: nn.Module, destination: nn.Module, target: str) -> None:
    *prefix, field_name = target.split(".")
    for item in prefix:
        child = getattr(source, item)
        if not hasattr(destination, item):
            # The original container itself (a Sequential stays indexable, a head keeps its
            # attributes), so the original's methods find what they expect.
            destination.add_module(item, child)
        destination = getattr(destination, item)
        source = child
    value = getattr(source, field_name)
    if isinstance(value, nn.Module):
        destination.add_module(field_name, value)
    elif isinstance(value, nn.Parameter):
        destination.register_parameter(field_name, value)
    elif isinstance(value, torch.Tensor) and field_name in source._buffers:
        destination.register_buffer(field_name, value, persistent=field_name not in
                                    source._non_persistent_buffers_set)
    else:
        setattr(destination, field_name, value)


class AttentionGraphModule(fx.GraphModule):
    """A GraphModule with a training graph and an evaluation graph.

    Attributes:
        train_graph: runs in ``train()`` mode; carries DIA and the SSIA branches.
        eval_graph: runs in ``eval()`` mode; carries DIA only.
        fxattn_info: the :class:`TransformInfo` (plan and options) it was built from.
    """

    def __init__(
        self,
        root: nn.Module,
        train_graph: fx.Graph,
        eval_graph: fx.Graph,
        info: TransformInfo,
        class_name: str = "AttentionGraphModule",
    ) -> None:
        nn.Module.__init__(self)  # not super(): the MRO may continue into the original class
        self.__class__.__name__ = class_name
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.fxattn_info = info
        for node in chain(train_graph.nodes, eval_graph.nodes):
            if node.op in ("get_attr", "call_module"):
                _copy_attr(root, self, str(node.target))
        self.training = True
        self.graph = train_graph
        self._tracer_cls = None
        tracer_cls = train_graph._tracer_cls
        if tracer_cls is not None and "<locals>" not in tracer_cls.__qualname__:
            self._tracer_cls = tracer_cls
        for name, value in vars(root).items():  # config, stride, names, args, ...
            if name not in _OWN_ATTRIBUTES and name not in self.__dict__:
                self.__dict__[name] = value

    def fxattn_original_forward(self, *args: Any, **kwargs: Any) -> Any:
        """The original class's ``forward`` run on this module (its dispatch, our graph)."""
        base = getattr(type(self), "_fxattn_base", None)
        if base is None:
            raise InputError("this fxattn module does not derive from its original class")
        if self.__dict__.get("_fxattn_in_base_forward"):
            raise InputError(
                f"{base.__name__}.forward called itself with inputs of a structure the "
                "transformed graph was not traced with; call it with the traced structure"
            )
        self.__dict__["_fxattn_in_base_forward"] = True
        try:
            return base.forward(self, *args, **kwargs)
        finally:
            self.__dict__["_fxattn_in_base_forward"] = False

    def train(self, mode: bool = True) -> AttentionGraphModule:
        if mode != self.training or self.graph is not (
            self.train_graph if mode else self.eval_graph
        ):
            self.graph = self.train_graph if mode else self.eval_graph
        if not mode:
            ssia = getattr(self, SSIA_ROOT, None)
            if ssia is not None:
                ssia.latest = None  # no stale training loss after switching to eval
        return super().train(mode)

    def recompile(self) -> Any:
        # FSDP2's fully_shard swaps in a subclass of this per-instance class. fx's recompile
        # (run by every train/eval graph swap) would then wrap __call__ on that subclass around
        # the one it inherits, which calls back into the subclass: infinite recursion. Reusing
        # the inherited call wrapper keeps one level of wrapping.
        cls = type(self)
        if "_wrapped_call" not in vars(cls):
            for base in cls.__mro__[1:]:
                if "_wrapped_call" in vars(base):
                    cls._wrapped_call = vars(base)["_wrapped_call"]
                    break
        code = super().recompile()
        if getattr(cls, "_fxattn_base", None) is not None:
            placeholders = self.graph.find_nodes(op="placeholder")
            if any("tensor_meta" in node.meta for node in placeholders):  # not after unpickling
                self._fxattn_tensor_inputs = tuple("tensor_meta" in n.meta for n in placeholders)
            cls.forward = _dispatching(cls.forward)
        return code

    def _deepcopy_init(self) -> Callable[..., None]:
        def init(res: AttentionGraphModule, fake_mod: nn.Module, _graph: fx.Graph) -> None:
            state = fake_mod.__dict__
            AttentionGraphModule.__init__(
                res,
                fake_mod,
                state["train_graph"],
                state["eval_graph"],
                state["fxattn_info"],
                class_name=type(self).__name__,
            )
            res.train(state["training"])

        return init

    def __reduce__(self) -> Any:
        """Pickle both graphs with the module state (``torch.save(net)``, trainer checkpoints).

        fxattn's own format, :func:`fxattn.save`, stays the safe one: it loads with
        ``weights_only=True`` and needs no code unpickled.
        """
        body = {k: v for k, v in self.__dict__.items() if k not in _PICKLE_SKIP}
        graphs = (_graph_source(self.train_graph), _graph_source(self.eval_graph))
        base = getattr(type(self), "_fxattn_base", None)
        return (_unpickle, (base, type(self).__name__, body, graphs, self.fxattn_info))

    @property
    def plan(self) -> Plan:
        return self.fxattn_info.plan


_MARK = FXATTN_META  # the pass marks that strip_ssia reads
_PICKLE_SKIP = frozenset({"_graph", "_code", "_lineno_map", "_prologue_start", "_tracer_cls",
                          "train_graph", "eval_graph", "fxattn_info", "_in_spec", "_out_spec"})


# (python source with imports, node name -> mark, the pytree codegen of structured in/outputs)
GraphSource = tuple[str, dict[str, str], fx.graph.CodeGen]


def _graph_source(graph: fx.Graph) -> GraphSource:
    """A graph as fx pickles one: its Python code (fx graphs themselves have no stable
    serialisation, and ATen op targets do not pickle), plus the fxattn marks of its nodes.

    The code is generated flat (plain ``CodeGen``); the pytree codegen that maps structured
    inputs and outputs (a dict in, a ``ModelOutput`` out) travels beside it.
    """
    codegen = graph._codegen
    graph._codegen = fx.graph.CodeGen()
    try:
        code = graph.python_code(root_module="self")
    finally:
        graph._codegen = codegen
    source = _format_import_block(code.globals, sys_importer) + code.src
    return source, {n.name: n.meta[_MARK] for n in graph.nodes if _MARK in n.meta}, codegen


def _graph_from_source(source: GraphSource, body: dict[str, Any]) -> fx.Graph:
    code, marks, codegen = source
    # constants the retrace lifts (_tensor_constant<i>) land in body, where the module finds them
    graph = _deserialize_graph_module(_forward_from_src(code, {}), body).graph
    graph._codegen = codegen
    for node in graph.nodes:
        if node.name in marks:
            node.meta[_MARK] = marks[node.name]
    return graph


def _unpickle(
    base: type[nn.Module] | None,
    class_name: str,
    body: dict[str, Any],
    graphs: tuple[GraphSource, GraphSource],
    info: TransformInfo,
) -> AttentionGraphModule:
    cls = interface_class(base)
    net = cls.__new__(cls)
    if "_fxattn_tensor_inputs" in body:
        net.__dict__["_fxattn_tensor_inputs"] = body["_fxattn_tensor_inputs"]
    train_graph, eval_graph = (_graph_from_source(g, body) for g in graphs)
    AttentionGraphModule.__init__(net, _Body(body), train_graph, eval_graph, info, class_name)
    for name in ("_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
                 "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"):
        if name in body:
            net.__dict__[name] = body[name]
    net.train(body.get("training", True))
    return net


class _Body(nn.Module):
    """A module whose ``__dict__`` is a saved one (what fx's ``_CodeOnlyModule`` does)."""

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.__dict__ = body


@functools.cache
def interface_class(base: type[nn.Module] | None) -> type[AttentionGraphModule]:
    """``AttentionGraphModule`` mixed with the model's own class ``base`` (see module doc).

    Falls back to plain ``AttentionGraphModule`` where ``base`` adds nothing (``nn.Module``,
    a GraphModule) or cannot be mixed in (a C-level layout or metaclass conflict).
    """
    if base is None or base is nn.Module or issubclass(base, fx.GraphModule):
        return AttentionGraphModule
    namespace: dict[str, Any] = {"__module__": __name__, "_fxattn_base": base}
    if callable(getattr(base, "fuse", None)):
        namespace["fuse"] = _no_fuse
    try:
        cls = type(f"FxAttn{base.__name__}", (AttentionGraphModule, base), namespace)
    except TypeError:
        return AttentionGraphModule
    return cls


def _no_fuse(self: AttentionGraphModule, *args: Any, **kwargs: Any) -> AttentionGraphModule:
    """Stands in for the original's ``fuse()`` (ultralytics folds BatchNorm into Conv in place).

    The graphs call the BatchNorm modules themselves, so folding them would break (or, worse,
    double-apply) them. The module runs unfused; the lean model of ``fxattn.strip_ssia`` is
    what to optimise for deployment (onnxruntime folds Conv+BN at load).
    """
    return self


def _is_container(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple)) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    )


@functools.cache
def _named_or_swallowed(base: type[nn.Module]) -> tuple[frozenset[str], bool]:
    """The keywords ``base.forward`` names, and whether it takes ``**kwargs``."""
    params = inspect.signature(base.forward).parameters
    return frozenset(params), any(p.kind is p.VAR_KEYWORD for p in params.values())


def _dispatching(graph_forward: Callable[..., Any]) -> Callable[..., Any]:
    """The graph's ``forward``, or the original's where a tensor input arrives as a container.

    Keywords that the original ``forward`` only passes on through ``**kwargs`` and that hold
    ``None`` / ``False`` (ultralytics' validator calls ``model(img, augment=False)``) select
    the default path the graph was traced with, so they are dropped rather than refused.
    """

    graph_params = frozenset(inspect.signature(graph_forward).parameters)

    @functools.wraps(graph_forward)
    def forward(self: AttentionGraphModule, *args: Any, **kwargs: Any) -> Any:
        fixed = getattr(self.fxattn_info.plan, "fixed_arguments", None)  # older pickles: none
        if fixed and kwargs.keys() & fixed.keys():
            kwargs = _without_fixed(type(self).__name__, kwargs, fixed)
        expects = self.__dict__.get("_fxattn_tensor_inputs", ())
        if any(i < len(expects) and expects[i] and _is_container(arg)
               for i, arg in enumerate(args)):
            return self.fxattn_original_forward(*args, **kwargs)
        if kwargs and not kwargs.keys() <= graph_params:
            named, swallowed = _named_or_swallowed(type(self)._fxattn_base)
            kwargs = {k: v for k, v in kwargs.items() if k in graph_params or k in named
                      or not swallowed or (v is not None and v is not False)}
        return graph_forward(self, *args, **kwargs)

    return forward


def _without_fixed(name: str, kwargs: dict[str, Any], fixed: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """``kwargs`` without the arguments the capture fixed (``use_cache``): left out, ``None``
    or the captured value run the graph as captured; another value is refused."""
    for key in kwargs.keys() & fixed.keys():
        if kwargs[key] is not None and kwargs[key] != fixed[key]:
            raise InputError(describe_fixed_mismatch(name, key, fixed[key], kwargs[key]))
    return {k: v for k, v in kwargs.items() if k not in fixed}


def original_module(net: AttentionGraphModule) -> nn.Module:
    """A module of ``net``'s original class over ``net``'s own submodules, parameters and
    attributes (shared, not copied): the original ``forward``, without DIA or SSIA.

    What :func:`fxattn.strip_ssia` re-captures for another input signature. Raises
    :class:`~fxattn.errors.InputError` where ``net``'s class does not derive from the original.
    """
    base = getattr(type(net), "_fxattn_base", None)
    if base is None:
        raise InputError(
            f"{type(net).__name__} does not derive from the model's own class, so its original "
            "forward() cannot be captured again; transform the original model with these "
            "inputs and load this module's state_dict into it"
        )
    model = base.__new__(base)
    nn.Module.__init__(model)
    for name, value in vars(net).items():
        if name not in _OWN_ATTRIBUTES:
            model.__dict__[name] = value
    model._modules.update((name, child) for name, child in net._modules.items()
                          if name not in (DIA_ROOT, SSIA_ROOT))
    model._parameters.update(net._parameters)
    model._buffers.update(net._buffers)
    model._non_persistent_buffers_set.update(net._non_persistent_buffers_set)
    model.train(net.training)
    return model


def is_fxattn_module(module: nn.Module) -> bool:
    return isinstance(module, AttentionGraphModule)


def deepcopy_module(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)
