"""What an op is, for the analysis: parametrised or not, and the side its channels live on.

Registries of residual additions, parametrised modules and functions (with the side of the
tensor their channels are on), pools, permutes and reshapes, in every spelling symbolic
tracing and ``torch.export`` produce; and :class:`OpInfo`, the cached facts about the nodes
of one graph.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

FIRST, LAST = "first", "last"

# Residual additions, in every spelling symbolic tracing and torch.export produce.
ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
for _name in ("add.Tensor", "add_.Tensor"):
    _packet, _overload = _name.split(".")
    ADD_FUNCTIONS.add(getattr(getattr(torch.ops.aten, _packet), _overload))

# Parametrised modules and the side of the tensor their channels live on.
_MODULE_CHANNEL_SIDE: list[tuple[type[nn.Module], str]] = [
    (nn.modules.conv._ConvNd, FIRST),
    (nn.modules.batchnorm._BatchNorm, FIRST),
    (nn.modules.instancenorm._InstanceNorm, FIRST),
    (nn.GroupNorm, FIRST),
    (nn.Linear, LAST),
    (nn.Embedding, LAST),
    (nn.LayerNorm, LAST),
    (nn.RMSNorm, LAST),
]

# Functional forms (timm's norm-act layers and torch.export graphs call these).
_FUNCTION_CHANNEL_SIDE: dict[Any, str] = {
    F.conv1d: FIRST,
    F.conv2d: FIRST,
    F.conv3d: FIRST,
    F.conv_transpose1d: FIRST,
    F.conv_transpose2d: FIRST,
    F.batch_norm: FIRST,
    F.group_norm: FIRST,
    F.instance_norm: FIRST,
    F.linear: LAST,
    F.embedding: LAST,
    torch.addmm: LAST,  # bias + x @ W: Hugging Face's Conv1D (GPT-2) projects with it
    F.layer_norm: LAST,
    F.rms_norm: LAST,
}
for _name, _side in [
    ("conv1d.default", FIRST),
    ("conv2d.default", FIRST),
    ("conv3d.default", FIRST),
    ("convolution.default", FIRST),
    ("batch_norm.default", FIRST),
    ("_native_batch_norm_legit_no_training.default", FIRST),
    ("_native_batch_norm_legit_functional.default", FIRST),
    ("group_norm.default", FIRST),
    ("linear.default", LAST),
    ("embedding.default", LAST),
    ("addmm.default", LAST),
    ("layer_norm.default", LAST),
    ("rms_norm.default", LAST),
]:
    _packet, _overload = _name.split(".")
    if hasattr(torch.ops.aten, _packet):
        _FUNCTION_CHANNEL_SIDE[getattr(getattr(torch.ops.aten, _packet), _overload)] = _side

_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
try:  # torchvision's ConvNeXt and Swin permute with a module, not a tensor method
    from torchvision.ops.misc import Permute as _TorchvisionPermute

    _PERMUTE_MODULES: tuple[type[nn.Module], ...] = (_TorchvisionPermute,)
except ImportError:  # pragma: no cover - torchvision is optional
    _PERMUTE_MODULES = ()
RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
RESHAPE_FUNCTIONS: set[Any] = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
for _name in ("view.default", "reshape.default", "flatten.using_ints", "unsqueeze.default",
              "squeeze.dim", "_unsafe_view.default"):
    _packet, _overload = _name.split(".")
    if hasattr(torch.ops.aten, _packet):
        RESHAPE_FUNCTIONS.add(getattr(getattr(torch.ops.aten, _packet), _overload))
PERMUTES: set[Any] = {torch.permute, "permute", torch.ops.aten.permute.default}
TRANSPOSES: set[Any] = {torch.transpose, torch.swapaxes, "transpose", "swapaxes",
                        torch.ops.aten.transpose.int}


def _module(modules: dict[str, nn.Module], node: fx.Node) -> nn.Module | None:
    if node.op == "call_module":
        return modules.get(str(node.target))
    return None


def _is_parameter_attr(node: fx.Node, modules: dict[str, nn.Module], root: nn.Module) -> bool:
    if node.op != "get_attr":
        return False
    try:
        value = _fetch_attr(root, str(node.target))
    except AttributeError:
        return False
    return isinstance(value, nn.Parameter)


def _fetch_attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


class OpInfo:
    """Cached facts about nodes of one graph: parametrised or not, channel side."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())

    def channel_side(self, node: fx.Node) -> str | None:
        module = _module(self.modules, node)
        if module is not None:
            for cls, side in _MODULE_CHANNEL_SIDE:
                if isinstance(module, cls):
                    return side
            return None
        if node.op == "call_function":
            return _FUNCTION_CHANNEL_SIDE.get(node.target)
        return None

    def is_parametrised(self, node: fx.Node) -> bool:
        module = _module(self.modules, node)
        if module is not None:
            return any(True for _ in module.parameters())
        if node.op in ("call_function", "call_method"):
            return any(
                _is_parameter_attr(arg, self.modules, self.gm) for arg in node.all_input_nodes
            )
        return False

    def permute_dims(self, node: fx.Node) -> list[int] | None:
        """The dimension order of a permute *module* (``torchvision.ops.Permute``): a leaf the
        tracer keeps as ``call_module``, so no ``permute`` call appears in the graph."""
        module = _module(self.modules, node)
        if module is None or any(True for _ in module.parameters()):
            return None
        if _PERMUTE_MODULES and isinstance(module, _PERMUTE_MODULES):
            return int_list(getattr(module, "dims", None))
        return None

    def is_pool(self, node: fx.Node) -> bool:
        module = _module(self.modules, node)
        if module is not None:
            return isinstance(module, _POOL_MODULES)
        name = getattr(node.target, "__name__", str(node.target))
        return node.op == "call_function" and "pool" in name


def op_key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def int_list(value: Any) -> list[int] | None:
    """An op argument as a list of ints (``permute(0, 2, 1)`` or ``permute([0, 2, 1])``)."""
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def modifies_in_place(user: fx.Node, value: fx.Node, root: nn.Module) -> bool:
    """Whether ``user`` writes into ``value``'s storage (``ReLU(inplace=True)``, ``x.add_``,
    ``x += y``, ``F.relu(x, inplace=True)``, ``aten.relu_``): a tensor autograd saved from
    ``value`` for backward is then stale, and the backward fails."""
    if not user.args or user.args[0] is not value:
        return False
    target = user.target
    if user.op == "call_module":
        try:
            return getattr(root.get_submodule(str(target)), "inplace", False) is True
        except AttributeError:
            return False
    if user.kwargs.get("inplace") is True:
        return True
    if user.op == "call_method":
        return str(target).endswith("_") and not str(target).startswith("__")
    if user.op == "call_function":
        if target in _IN_PLACE_OPERATORS:
            return True
        if isinstance(target, torch._ops.OpOverload):
            return target._schema.name.endswith("_")  # aten::relu_, aten::add_
        return getattr(target, "__name__", "").endswith("_")  # torch.relu_, torch.add_
    return False
