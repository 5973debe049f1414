"""The module :func:`fxattn.transform` returns: one module hierarchy, two graphs.

Like torchvision's ``DualGraphModule``: ``train()`` runs the training graph (with the SSIA
branches), ``eval()`` the evaluation graph (without). Parameters and buffers are shared by both
graphs, and ``state_dict`` keys are the original model's plus ``fxattn_dia.*`` (and, for the
``channel`` SSIA map, ``fxattn_ssia.*``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .analysis import Plan

DIA_ROOT = "fxattn_dia"
SSIA_ROOT = "fxattn_ssia"


@dataclass
class TransformInfo:
    """How a module was made; enough to rebuild it (see :mod:`fxattn.serialization`)."""

    plan: Plan
    dia: dict[str, Any] | None
    ssia: dict[str, Any] | None
    model_class: str
    extra: dict[str, Any] = field(default_factory=dict)


def _copy_attr(source: nn.Module, destination: nn.Module, target: str) -> None:
    *prefix, field_name = target.split(".")
    for item in prefix:
        child = getattr(source, item)
        if not hasattr(destination, item):
            destination.add_module(item, nn.Module())
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
        super(fx.GraphModule, self).__init__()
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
        return super().recompile()

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
        raise TypeError(
            "an fxattn module is not pickled; save it with fxattn.save(net, path) "
            "(options + state_dict, loads without unpickling code)"
        )

    @property
    def plan(self) -> Plan:
        return self.fxattn_info.plan


def is_fxattn_module(module: nn.Module) -> bool:
    return isinstance(module, AttentionGraphModule)


def unwrap(module: Any) -> Any:
    """Look through DistributedDataParallel / DataParallel / torch.compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        else:
            break
    return module


def deepcopy_module(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)
