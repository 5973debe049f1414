"""Find where attention goes: residual *sites*, their *groups*, and stage-output *taps*.

Everything here reads a shape-propagated ``torch.fx`` graph and returns plain data; nothing
is modified. The rules (see the README's "How it works"):

* A **site** is a residual addition ``y = shortcut + branch`` of two floating tensors of the same
  shape. Walking back from both operands to their nearest common ancestor (the block input),
  the *branch* is the operand with more parametrised ops (conv, linear, norm, any module with
  parameters) on its path; the shortcut has strictly fewer (identity or a projection). Adds of a
  parameter or a constant have no common ancestor and are never sites.
* The **channel dimension** of a site is the one its branch's last parametrised op acts on
  (conv / batch norm: dim 1; linear / layer norm: the last dim), tracked through permutes,
  transposes and reshapes up to the add. This tells ``(B, C, H, W)`` from token ``(B, N, C)``
  and channels-last grids ``(B, H, W, C)``.
* A **group** is a maximal run of consecutive sites with the same channel count and layout; the
  DIA state is reset at the first site of every group.
* A **tap** is the last feature map at each spatial resolution on the network's main path (a node
  every input-to-output path crosses), low to high. A model whose resolution never changes
  (ViT) gets ``SSIA.token_taps`` evenly spaced taps instead.
"""

from __future__ import annotations

import heapq
import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .config import DIA, SSIA
from .errors import ConfigError
from .tracing import count_parameters, iter_tensor_inputs, tensor_dtype, tensor_shape

FIRST, LAST = "first", "last"

# --------------------------------------------------------------------------- op registries

# Residual additions, in every spelling symbolic tracing and torch.export produce.
_ADD_FUNCTIONS: set[Any] = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
for _name in ("add.Tensor", "add_.Tensor"):
    _packet, _overload = _name.split(".")
    _ADD_FUNCTIONS.add(getattr(getattr(torch.ops.aten, _packet), _overload))

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
_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
_RESHAPE_FUNCTIONS: set[Any] = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
for _name in ("view.default", "reshape.default", "flatten.using_ints", "unsqueeze.default",
              "squeeze.dim", "_unsafe_view.default"):
    _packet, _overload = _name.split(".")
    if hasattr(torch.ops.aten, _packet):
        _RESHAPE_FUNCTIONS.add(getattr(getattr(torch.ops.aten, _packet), _overload))
_PERMUTES: set[Any] = {torch.permute, "permute", torch.ops.aten.permute.default}
_TRANSPOSES: set[Any] = {torch.transpose, torch.swapaxes, "transpose", "swapaxes",
                         torch.ops.aten.transpose.int}


# --------------------------------------------------------------------------- plan data


@dataclass(frozen=True)
class Site:
    """One place DIA attaches: the branch of a residual add (or a stage output)."""

    index: int
    node: str  # the add node (or, for a stage-output site, the output node itself)
    branch: str  # node whose value DIA multiplies
    shortcut: str | None  # the other operand of the add; None for a stage-output site
    module_path: str  # the block that holds the add, e.g. "layer1.0"
    key: str  # stable identity, equal in the train and eval graphs
    channels: int
    channel_dim: int
    ndim: int
    layout: str
    kind: str  # "residual" | "stage_output"
    group: int = -1  # the run whose DIA state is threaded (reset at its first site)
    module: str = ""  # name of the DIA module used here (under ``fxattn_dia``)


@dataclass(frozen=True)
class DIAModuleSpec:
    name: str
    channels: int
    channel_dim: int
    sites: tuple[int, ...]
    parameters: int


@dataclass(frozen=True)
class Tap:
    index: int
    node: str
    module_path: str
    key: str
    shape: tuple[int, ...]  # with the example batch
    channel_dim: int
    layout: str
    grid: tuple[int, ...] | None  # spatial grid of the attention map; None when not a grid
    skip_tokens: int  # leading non-grid tokens (class / register tokens) dropped


@dataclass(frozen=True)
class Pair:
    low: int
    high: int
    resize: bool
    skipped: str | None = None  # reason, when the pair cannot be compared


@dataclass
class Plan:
    """What :func:`fxattn.inspect` found; ``print(plan)`` shows it as tables."""

    model_name: str
    tracer: str
    model_parameters: int
    sites: list[Site]
    dia_modules: list[DIAModuleSpec]
    taps: list[Tap]
    pairs: list[Pair]
    dia: DIA | None
    ssia: SSIA | None
    ssia_parameters: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def dia_parameters(self) -> int:
        return sum(module.parameters for module in self.dia_modules)

    @property
    def groups(self) -> list[list[Site]]:
        runs: dict[int, list[Site]] = {}
        for site in self.sites:
            runs.setdefault(site.group, []).append(site)
        return list(runs.values())

    @property
    def active_pairs(self) -> list[Pair]:
        return [pair for pair in self.pairs if pair.skipped is None]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dia"] = self.dia.to_dict() if self.dia else None
        data["ssia"] = self.ssia.to_dict() if self.ssia else None
        data["dia_parameters"] = self.dia_parameters
        return data

    def __str__(self) -> str:
        from .report import render_plan

        return render_plan(self)


# --------------------------------------------------------------------------- op classification


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


class _OpInfo:
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
            return _int_list(getattr(module, "dims", None))
        return None

    def is_pool(self, node: fx.Node) -> bool:
        module = _module(self.modules, node)
        if module is not None:
            return isinstance(module, _POOL_MODULES)
        name = getattr(node.target, "__name__", str(node.target))
        return node.op == "call_function" and "pool" in name


def _op_key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def infer_channel_dims(
    gm: fx.GraphModule, info: _OpInfo | None = None
) -> dict[fx.Node, int | None]:
    """For every tensor node, the index of its channel dimension (``None`` when unknown)."""
    info = info or _OpInfo(gm)
    dims: dict[fx.Node, int | None] = {}
    for node in gm.graph.nodes:
        shape = tensor_shape(node)
        if shape is None:
            dims[node] = None
            continue
        ndim = len(shape)
        side = info.channel_side(node)
        if side == FIRST:
            dims[node] = 1 if ndim >= 2 else None
        elif side == LAST:
            dims[node] = ndim - 1 if ndim >= 2 else None
        elif node.op == "placeholder":
            dims[node] = 1 if ndim == 4 else None  # images arrive channel-first
        elif info.is_pool(node):
            dims[node] = 1
        else:
            dims[node] = _propagated_channel_dim(node, shape, dims, info.permute_dims(node))
    return dims


def _propagated_channel_dim(
    node: fx.Node,
    shape: tuple[int, ...],
    dims: dict[fx.Node, int | None],
    module_dims: list[int] | None = None,
) -> int | None:
    key = _op_key(node)
    inputs = [inp for inp in iter_tensor_inputs(node) if inp.op != "get_attr"]
    if not inputs:
        return None
    source = inputs[0]
    source_dim = dims.get(source)
    ndim = len(shape)
    if module_dims is not None and source_dim is not None:
        # a permute module (torchvision.ops.Permute in ConvNeXt and Swin)
        order = [d % ndim for d in module_dims]
        return order.index(source_dim) if source_dim in order else None
    if key in _PERMUTES and source_dim is not None:
        order = _int_list(node.args[1:]) if node.op == "call_method" else _int_list(node.args[1])
        if order is not None and len(order) == ndim:
            order = [d % ndim for d in order]
            return order.index(source_dim) if source_dim in order else None
        return None
    if key in _TRANSPOSES and source_dim is not None:
        pair = _int_list(node.args[1:3])
        if pair is None:
            return None
        a, b = (d % ndim for d in pair)
        return b if source_dim == a else a if source_dim == b else source_dim
    reshape = key in _RESHAPE_METHODS or key in _RESHAPE_FUNCTIONS
    for inp in inputs:
        cd = dims.get(inp)
        in_shape = tensor_shape(inp)
        if cd is None or in_shape is None:
            continue
        if in_shape == shape:
            return cd
        if len(in_shape) == ndim and not reshape:
            return cd  # rank-preserving op (cat, pad, slice, interpolate): layout kept
        mapped = _map_dim_through_reshape(in_shape, shape, cd)
        if mapped is not None:
            return mapped
    return None


def _map_dim_through_reshape(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> int | None:
    """Where ``src``'s dim lands in ``dst`` when the dims before (or after) it are kept."""
    if len(dst) > dim and src[: dim + 1] == dst[: dim + 1]:
        return dim
    tail = len(src) - dim
    if len(dst) > tail - 1 and len(dst) - tail >= 1 and src[dim:] == dst[len(dst) - tail:]:
        return len(dst) - tail
    return None


def _int_list(value: Any) -> list[int] | None:
    if isinstance(value, (list, tuple)) and len(value) == 1 and isinstance(value[0], (list, tuple)):
        value = value[0]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def layout_name(channel_dim: int, ndim: int) -> str:
    names = {
        (2, 1): "NC",
        (3, 1): "NCL",
        (3, 2): "NLC",
        (4, 1): "NCHW",
        (4, 3): "NHWC",
        (5, 1): "NCDHW",
        (5, 4): "NDHWC",
    }
    return names.get((ndim, channel_dim), f"{ndim}d/c{channel_dim}")


# --------------------------------------------------------------------------- graph helpers


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return ""


def _stable_keys(graph: fx.Graph) -> dict[fx.Node, str]:
    """Names that survive re-tracing in another mode: module path + op + occurrence."""
    counts: dict[tuple[str, str], int] = {}
    keys: dict[fx.Node, str] = {}
    for node in graph.nodes:
        path = _module_path(node)
        if node.op == "call_module":
            kind = "module"
        else:
            kind = getattr(node.target, "__name__", str(node.target))
        occurrence = counts.get((path, kind), 0)
        counts[(path, kind)] = occurrence + 1
        keys[node] = f"{path}:{kind}:{occurrence}"
    return keys


def _tensor_parents(node: fx.Node) -> list[fx.Node]:
    """Inputs that carry tensors, including multi-output ops (``unbind``, ``chunk``, ``split``).

    Shape propagation records a tuple of tensor metadata for those; without them the path
    from a ViT / Swin block input through ``qkv.unbind(0)`` to the attention output is cut and
    the attention sub-layer's residual add is never recognised as a site.
    """
    return [
        arg
        for arg in node.all_input_nodes
        if arg.op != "get_attr" and _carries_tensor(arg.meta.get("tensor_meta"))
    ]


def _carries_tensor(meta: Any) -> bool:
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):  # TensorMetadata (a NamedTuple)
        return True
    if isinstance(meta, (list, tuple)):
        return any(_carries_tensor(item) for item in meta)
    return False


def _nearest_common_ancestor(
    a: fx.Node, b: fx.Node, index: dict[fx.Node, int], nodes: list[fx.Node]
) -> tuple[fx.Node, dict[fx.Node, int]] | None:
    """Latest node both ``a`` and ``b`` depend on, and which side reached each visited node."""
    marks: dict[fx.Node, int] = {a: 1}
    marks[b] = marks.get(b, 0) | 2
    heap = [-index[a], -index[b]]
    heapq.heapify(heap)
    done: set[int] = set()
    while heap:
        position = -heapq.heappop(heap)
        if position in done:
            continue
        done.add(position)
        node = nodes[position]
        mark = marks[node]
        if mark == 3:
            return node, marks
        for parent in _tensor_parents(node):
            if marks.get(parent, 0) | mark != marks.get(parent, 0):
                marks[parent] = marks.get(parent, 0) | mark
                heapq.heappush(heap, -index[parent])
    return None


def _parametrised_depth(
    target: fx.Node,
    ancestor: fx.Node,
    side: int,
    marks: dict[fx.Node, int],
    index: dict[fx.Node, int],
    info: _OpInfo,
) -> int:
    """Most parametrised ops on any path ``ancestor -> target`` (the ancestor excluded)."""
    floor = index[ancestor]
    region = sorted(
        (n for n, m in marks.items() if m & side and index[n] > floor), key=index.__getitem__
    )
    depth: dict[fx.Node, int] = {ancestor: 0}
    for node in region:
        parents = [depth[p] for p in _tensor_parents(node) if p in depth]
        if parents:
            depth[node] = max(parents) + int(info.is_parametrised(node))
    return depth.get(target, -1)


def _residual_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _ADD_METHODS:
        pass
    else:
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    return a, b


def _is_float_tensor(node: fx.Node) -> bool:
    dtype = tensor_dtype(node)
    return node.op != "get_attr" and dtype is not None and dtype.is_floating_point


def _reaching(graph: fx.Graph, sources: Iterable[fx.Node], forward: bool) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = list(sources)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if forward:
            stack.extend(user for user in node.users if user.op != "get_attr")
        else:
            stack.extend(_tensor_parents(node) if node.op != "output" else node.all_input_nodes)
    return seen


def _feature_nodes(source: fx.Node, is_parametrised: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """Floating-point nodes that carry the input's features forward.

    Features flow through floating-point tensors. From integer inputs (token ids) they start
    at the first parametrised op (the embedding lookup); masks, position ids and shapes that
    are computed *from* the input without parameters are side paths, and their edges into
    every layer must not hide the stage boundaries.
    """
    seen: set[tuple[fx.Node, bool]] = set()
    stack = [(source, _is_float_tensor(source))]
    while stack:
        node, in_features = stack.pop()
        if (node, in_features) in seen:
            continue
        seen.add((node, in_features))
        for user in node.users:
            if user.op == "get_attr":
                continue
            if user.op == "output" or _is_float_tensor(user):
                if in_features or is_parametrised(user):
                    stack.append((user, True))
            elif not in_features and tensor_dtype(user) is not None:
                stack.append((user, False))
    return {node for node, in_features in seen if in_features}


def main_path_dominators(
    graph: fx.Graph, is_parametrised: Callable[[fx.Node], bool] = lambda node: False
) -> list[fx.Node]:
    """Nodes that every path from the first input to the output passes through, in order.

    A node is crossed by every path iff no edge between main-path nodes jumps over it in
    topological order. Inputs other than the first (masks, timesteps) do not form paths.
    """
    placeholders = list(graph.find_nodes(op="placeholder"))
    output = next(iter(graph.find_nodes(op="output")))
    if not placeholders:
        return []
    relevant = _feature_nodes(placeholders[0], is_parametrised) & _reaching(
        graph, [output], forward=False
    )
    ordered = [n for n in graph.nodes if n in relevant and (n is output or tensor_shape(n))]
    position = {node: i for i, node in enumerate(ordered)}
    cover = [0] * (len(ordered) + 1)
    for node in ordered:
        parents = node.all_input_nodes if node is output else _tensor_parents(node)
        for parent in parents:
            if parent in position and position[node] - position[parent] > 1:
                cover[position[parent] + 1] += 1
                cover[position[node]] -= 1
    result, running = [], 0
    for i, node in enumerate(ordered):
        running += cover[i]
        if running == 0 and node is not output:
            result.append(node)
    return result


# --------------------------------------------------------------------------- sites


def find_residual_sites(
    gm: fx.GraphModule, dims: dict[fx.Node, int | None], info: _OpInfo
) -> tuple[list[Site], list[str]]:
    """All residual additions of the graph, with branch / shortcut resolved."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    keys = _stable_keys(gm.graph)
    sites: list[Site] = []
    notes: list[str] = []
    for node in nodes:
        operands = _residual_operands(node)
        if operands is None:
            continue
        a, b = operands
        shape_a, shape_b = tensor_shape(a), tensor_shape(b)
        dtype_a, dtype_b = tensor_dtype(a), tensor_dtype(b)
        if shape_a is None or shape_a != shape_b or len(shape_a) < 2:
            continue
        if not (dtype_a and dtype_a.is_floating_point and dtype_a == dtype_b):
            continue
        found = _nearest_common_ancestor(a, b, index, nodes)
        if found is None:
            continue  # a parameter / constant added to an activation
        ancestor, marks = found
        depth_a = _parametrised_depth(a, ancestor, 1, marks, index, info)
        depth_b = _parametrised_depth(b, ancestor, 2, marks, index, info)
        if max(depth_a, depth_b) < 1 or depth_a == depth_b:
            continue
        branch, shortcut = (a, b) if depth_a > depth_b else (b, a)
        channel_dim = dims.get(branch)
        if channel_dim is None:
            channel_dim = dims.get(shortcut)
        if channel_dim is None:
            notes.append(f"skipped add '{node.name}': its channel dimension could not be inferred")
            continue
        ndim = len(shape_a)
        sites.append(
            Site(
                index=len(sites),
                node=node.name,
                branch=branch.name,
                shortcut=shortcut.name,
                module_path=_module_path(node),
                key=keys[node],
                channels=shape_a[channel_dim],
                channel_dim=channel_dim,
                ndim=ndim,
                layout=layout_name(channel_dim, ndim),
                kind="residual",
            )
        )
    return sites, notes


def _select(sites: list[Site], dia: DIA) -> list[Site]:
    include = [re.compile(p) for p in dia.include]
    exclude = [re.compile(p) for p in dia.exclude]

    def keep(site: Site) -> bool:
        names = (site.module_path, site.node)
        if include and not any(p.search(n) for p in include for n in names):
            return False
        return not any(p.search(n) for p in exclude for n in names)

    return [site for site in sites if keep(site)]


def dia_module_parameters(kind: str, channels: int, reduction: int) -> int:
    """Parameter count of one DIA module (the formula of the README / SPEC)."""
    hidden = channels // reduction
    if kind == "lstm":
        return 2 * (channels * hidden + hidden + hidden * 4 * channels + 4 * channels)
    return channels * hidden + hidden + hidden * channels + channels


CHANNELS_LAST = "channels_last"


def _group_layout(site: Site) -> str:
    """What must agree for sites to share a DIA cell: channel-first sites by their exact layout,
    channels-last sites (tokens ``(B, N, C)`` or grids ``(B, H, W, C)``) as one kind.

    timm's Swin adds its attention branch on a ``(B, H, W, C)`` grid and its MLP branch on
    ``(B, H*W, C)`` tokens: both are the same C channels on the last axis, and the descriptor
    (mean over every other axis) is the same, so one cell serves the stage as in the paper.
    """
    if site.ndim >= 3 and site.channel_dim == site.ndim - 1:
        return CHANNELS_LAST
    return site.layout


def assign_groups(sites: list[Site], dia: DIA) -> tuple[list[Site], list[DIAModuleSpec]]:
    """Runs of consecutive sites (state resets) and the DIA modules shared per ``dia.share``."""
    assigned: list[Site] = []
    module_sites: dict[str, list[int]] = {}
    module_shape: dict[str, tuple[int, int]] = {}
    group, previous = -1, None
    for i, site in enumerate(sites):
        signature = (site.channels, _group_layout(site))
        if signature != previous:
            group += 1
            previous = signature
        if site.channels // dia.reduction < 1:
            raise ConfigError(
                f"DIA reduction {dia.reduction} exceeds the {site.channels} channels of site "
                f"'{site.node}' ({site.module_path or 'root'}); use a reduction <= "
                f"{site.channels} or exclude that site"
            )
        if dia.share == "stage":
            name = f"g{group}"
        elif dia.share == "channels":
            name = f"c{site.channels}_{_group_layout(site).lower().replace('/', '_')}"
        else:
            name = f"s{i}"
        module_sites.setdefault(name, []).append(i)
        channels_last = _group_layout(site) == CHANNELS_LAST
        module_shape[name] = (site.channels, -1 if channels_last else site.channel_dim)
        assigned.append(_replace(site, index=i, group=group, module=name))
    specs = [
        DIAModuleSpec(
            name=name,
            channels=module_shape[name][0],
            channel_dim=module_shape[name][1],
            sites=tuple(indices),
            parameters=dia_module_parameters(dia.module, module_shape[name][0], dia.reduction),
        )
        for name, indices in module_sites.items()
    ]
    return assigned, specs


def _replace(site: Site, **changes: Any) -> Site:
    values = asdict(site)
    values.update(changes)
    return Site(**values)


# --------------------------------------------------------------------------- taps


def _token_grid(count: int, max_prefix: int = 8) -> tuple[tuple[int, int] | None, int]:
    for prefix in range(0, min(max_prefix, count - 1) + 1):
        side = math.isqrt(count - prefix)
        if side > 1 and side * side == count - prefix:
            return (side, side), prefix
    return None, 0


def _make_tap(node: fx.Node, index: int, dims: dict[fx.Node, int | None], key: str) -> Tap:
    """A tap and the grid its attention map lives on.

    Every channel-first or channels-last feature map has a grid: its non-batch, non-channel
    dims - ``(L,)`` for ``(B, C, L)``, ``(H, W)`` for images, ``(T, H, W)`` for video - and
    SSIA resizes along it (linear, bilinear, trilinear). Tokens ``(B, N, C)`` have one only
    when ``N`` (less a few class / register tokens) is a square: a token sequence of another
    length has no spatial order that a resize could respect.
    """
    shape = tensor_shape(node) or ()
    channel_dim = dims[node] or 1
    spatial = tuple(s for d, s in enumerate(shape) if d not in (0, channel_dim))
    layout = layout_name(channel_dim, len(shape))
    grid: tuple[int, ...] | None
    skip = 0
    if layout == "NLC":
        grid, skip = _token_grid(spatial[0])
    elif 1 <= len(spatial) <= 3:
        grid = spatial
    else:
        grid = None
    return Tap(index, node.name, _module_path(node), key, shape, channel_dim, layout, grid, skip)


def find_taps(
    gm: fx.GraphModule,
    dims: dict[fx.Node, int | None],
    residual_nodes: set[str],
    token_taps: int,
) -> tuple[list[Tap], list[str]]:
    """Stage outputs on the main path, low to high (see the module docstring)."""
    keys = _stable_keys(gm.graph)
    candidates = []
    info = _OpInfo(gm)
    batch = _batch_size(gm.graph)
    for node in main_path_dominators(gm.graph, info.is_parametrised):
        if node.op == "placeholder" or not _tap_candidate(node, dims, batch):
            continue
        shape = tensor_shape(node) or ()
        spatial = tuple(s for d, s in enumerate(shape) if d not in (0, dims[node]))
        if layout_name(dims[node] or 1, len(shape)) == "NLC":
            # Tokens of a square grid (plus class / register tokens) sit at that grid's
            # resolution: a ViT's patch embedding and its blocks form one stage.
            grid, _ = _token_grid(spatial[0])
            spatial = grid or spatial
        candidates.append((node, spatial))
    # A resolution is a number of positions: flattening a (T, H, W) grid to L = T*H*W
    # positions before a head does not start a new stage. Each run's stage output is its last
    # feature on the richest grid (the clip, not its flattened view).
    runs: list[list[fx.Node]] = []
    ranks: dict[fx.Node, int] = {}
    previous = None
    for node, spatial in candidates:
        positions = math.prod(spatial)
        if positions != previous:
            runs.append([])
            previous = positions
        runs[-1].append(node)
        ranks[node] = len(spatial)
    notes: list[str] = []
    layouts = [layout_name(dims[run[-1]] or 1, len(tensor_shape(run[-1]) or ())) for run in runs]
    # One resolution throughout (a ViT's tokens, a ConvMixer's isotropic feature map): the
    # stage outputs are its blocks, evenly spaced.
    if runs and (len(runs) == 1 or (layouts[-1] == "NLC" and layouts.count("NLC") == 1)):
        run = runs[-1]
        adds = [node for node in run if node.name in residual_nodes]
        # taps fall on block boundaries
        pool = _block_outputs(adds) or run
        count = min(token_taps, len(pool))
        chosen = [pool[round((i + 1) * len(pool) / count) - 1] for i in range(count)]
        notes.append(
            f"constant token resolution: {count} taps evenly spaced over {len(pool)} blocks"
        )
    else:
        chosen = [_richest_last(run, ranks) for run in runs]
    if len(chosen) < 2:
        # No two stage outputs on a single main path: parallel streams that meet only at the
        # head (CrossViT's two patch sizes), or a graph whose blocks all sit inside one
        # dominator-free region. The residual blocks are still the natural layers to
        # supervise: take evenly spaced block outputs in graph order.
        blocks = _block_outputs(
            [
                node
                for node in gm.graph.nodes
                if node.name in residual_nodes and _tap_candidate(node, dims, batch)
            ]
        )
        if len(blocks) >= 2:
            count = min(token_taps, len(blocks))
            chosen = [blocks[round((i + 1) * len(blocks) / count) - 1] for i in range(count)]
            notes = [
                f"no two stage outputs on the main path: {count} taps evenly spaced over "
                f"{len(blocks)} residual blocks"
            ]
    taps = [_make_tap(node, i, dims, keys[node]) for i, node in enumerate(chosen)]
    return taps, notes


def _richest_last(run: list[fx.Node], ranks: dict[fx.Node, int]) -> fx.Node:
    richest = max(ranks[node] for node in run)
    return next(node for node in reversed(run) if ranks[node] == richest)


def _batch_size(graph: fx.Graph) -> int | None:
    """The example's batch size: the leading dimension of the first input."""
    first = next(iter(graph.find_nodes(op="placeholder")), None)
    shape = tensor_shape(first) if first is not None else None
    return shape[0] if shape else None


def _tap_candidate(node: fx.Node, dims: dict[fx.Node, int | None], batch: int | None) -> bool:
    """A batch-major float feature map with a known channel dimension and a plain layout."""
    shape = tensor_shape(node)
    dtype = tensor_dtype(node)
    if shape is None or len(shape) < 3 or dims.get(node) is None:
        return False
    if batch is not None and shape[0] != batch:
        return False  # not batch-major (Hiera's unrolled windows): per-sample maps need it
    if dtype is None or not dtype.is_floating_point:
        return False
    if "/" in layout_name(dims[node] or 1, len(shape)):
        return False  # not a feature map: Swin's patch merging reshapes (B, H/2, 2, W/2, 2, C)
    positions = math.prod(s for d, s in enumerate(shape) if d not in (0, dims[node]))
    # more than one position: a class token alone (CrossViT's fusion) has no map to supervise
    return positions > 1


def _block_outputs(adds: list[fx.Node]) -> list[fx.Node]:
    """The last residual add of each block (a transformer block has two: attention and MLP).

    Adds written in the root module's own forward have no block to group them: each counts.
    """
    return [
        node
        for i, node in enumerate(adds)
        if i + 1 == len(adds)
        or not _module_path(node)
        or _module_path(adds[i + 1]) != _module_path(node)
    ]


def pair_taps(taps: list[Tap], ssia: SSIA) -> list[Pair]:
    pairs: list[Pair] = []
    last = len(taps) - 1
    for low in range(last):
        high = low + 1 if ssia.pairs == "next" else last
        pairs.append(_pair(taps[low], taps[high], ssia))
    return pairs


def _positions(tap: Tap) -> int:
    return math.prod(s for d, s in enumerate(tap.shape) if d not in (0, tap.channel_dim))


def _pair(low: Tap, high: Tap, ssia: SSIA) -> Pair:
    if ssia.map == "channel":
        return Pair(low.index, high.index, resize=False)
    if low.grid is not None and high.grid is not None and len(low.grid) == len(high.grid):
        return Pair(low.index, high.index, resize=low.grid != high.grid)
    low_positions, high_positions = _positions(low), _positions(high)
    if low_positions == high_positions and low.skip_tokens == high.skip_tokens:
        return Pair(low.index, high.index, resize=False)
    return Pair(
        low.index,
        high.index,
        resize=False,
        skipped=f"{low.node} ({low.layout}, map grid {_grid_text(low)}) and {high.node} "
        f"({high.layout}, map grid {_grid_text(high)}) have {low_positions} and "
        f"{high_positions} positions and no common grid to resize along",
    )


def _grid_text(tap: Tap) -> str:
    return "x".join(map(str, tap.grid)) if tap.grid else "none"


# --------------------------------------------------------------------------- the analysis pass


def analyze(
    gm: fx.GraphModule,
    dia: DIA | None,
    ssia: SSIA | None,
    *,
    tracer: str = "torch.fx",
    model_name: str | None = None,
) -> Plan:
    """Build the :class:`Plan` of a shape-propagated graph. Pure: ``gm`` is not modified."""
    info = _OpInfo(gm)
    dims = infer_channel_dims(gm, info)
    residual, notes = find_residual_sites(gm, dims, info)
    token_taps = ssia.token_taps if ssia else SSIA().token_taps
    taps, tap_notes = find_taps(gm, dims, {s.node for s in residual}, token_taps)
    notes += tap_notes

    sites: list[Site] = []
    modules: list[DIAModuleSpec] = []
    if dia is not None:
        candidates = residual
        if not residual:
            candidates = [
                Site(
                    index=i,
                    node=tap.node,
                    branch=tap.node,
                    shortcut=None,
                    module_path=tap.module_path,
                    key=tap.key,
                    channels=tap.shape[tap.channel_dim],
                    channel_dim=tap.channel_dim,
                    ndim=len(tap.shape),
                    layout=tap.layout,
                    kind="stage_output",
                )
                for i, tap in enumerate(taps)
            ]
            if candidates:
                notes.append("no residual additions: DIA multiplies the stage outputs instead")
        selected = _select(candidates, dia)
        narrow = [s for s in selected if s.channels // dia.reduction < 1]
        if narrow and len(narrow) < len(selected):
            # e.g. a segmentation head adding two num_classes-wide maps: too narrow for DIA.
            # Only when every site is that narrow is the reduction itself wrong (ConfigError).
            notes.append(
                f"skipped {len(narrow)} site(s) narrower than the DIA reduction "
                f"{dia.reduction}: " + ", ".join(f"{s.node} ({s.channels})" for s in narrow)
            )
            selected = [s for s in selected if s.channels // dia.reduction >= 1]
        sites, modules = assign_groups(selected, dia)

    pairs = pair_taps(taps, ssia) if ssia is not None else []
    for pair in pairs:
        if pair.skipped:
            notes.append(f"SSIA pair {pair.low}->{pair.high} skipped: {pair.skipped}")
    ssia_params = 0
    if ssia is not None and ssia.map == "channel":
        for pair in pairs:
            low, high = taps[pair.low], taps[pair.high]
            c_low, c_high = low.shape[low.channel_dim], high.shape[high.channel_dim]
            ssia_params += c_high * c_low + c_low
    return Plan(
        model_name=model_name or type(gm).__name__,
        tracer=tracer,
        model_parameters=count_parameters(gm),
        sites=sites,
        dia_modules=modules,
        taps=taps,
        pairs=pairs,
        dia=dia,
        ssia=ssia,
        ssia_parameters=ssia_params,
        notes=notes,
    )
