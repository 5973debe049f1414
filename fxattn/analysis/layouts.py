"""Channel layouts: which dimension of each tensor holds the channels.

The channel dimension of a tensor is the one the last parametrised op on its path acts on
(conv / batch norm: dim 1; linear / layer norm: the last dim), tracked through permutes,
transposes and reshapes. It tells ``(B, C, H, W)`` from tokens ``(B, N, C)`` and channels-last
grids ``(B, H, W, C)``, and names the layout (``NCHW``, ``NLC``, ``NDHWC`` ...).
"""

from __future__ import annotations

import math

import torch.fx as fx

from .graph import iter_tensor_inputs, tensor_shape
from .ops import (
    FIRST,
    LAST,
    PERMUTES,
    RESHAPE_FUNCTIONS,
    RESHAPE_METHODS,
    TRANSPOSES,
    OpInfo,
    int_list,
    op_key,
)


def infer_channel_dims(
    gm: fx.GraphModule, info: OpInfo | None = None
) -> dict[fx.Node, int | None]:
    """For every tensor node, the index of its channel dimension (``None`` when unknown)."""
    info = info or OpInfo(gm)
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
    key = op_key(node)
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
    if key in PERMUTES and source_dim is not None:
        order = int_list(node.args[1:]) if node.op == "call_method" else int_list(node.args[1])
        if order is not None and len(order) == ndim:
            order = [d % ndim for d in order]
            return order.index(source_dim) if source_dim in order else None
        return None
    if key in TRANSPOSES and source_dim is not None:
        pair = int_list(node.args[1:3])
        if pair is None:
            return None
        a, b = (d % ndim for d in pair)
        return b if source_dim == a else a if source_dim == b else source_dim
    reshape = key in RESHAPE_METHODS or key in RESHAPE_FUNCTIONS
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


def token_grid(count: int, max_prefix: int = 8) -> tuple[tuple[int, int] | None, int]:
    """The square grid of ``count`` tokens less up to ``max_prefix`` leading class / register
    tokens, and that prefix; ``(None, 0)`` when no such square exists."""
    for prefix in range(0, min(max_prefix, count - 1) + 1):
        side = math.isqrt(count - prefix)
        if side > 1 and side * side == count - prefix:
            return (side, side), prefix
    return None, 0


def feature_grid(node: fx.Node, dims: dict[fx.Node, int | None]) -> tuple[int, ...]:
    """The positions of a feature map: every dim but batch and channels, and for tokens
    ``(B, N, C)`` of a square grid (plus class / register tokens) that grid."""
    shape = tensor_shape(node) or ()
    spatial = tuple(s for d, s in enumerate(shape) if d not in (0, dims[node]))
    if layout_name(dims[node] or 1, len(shape)) == "NLC":
        grid, _ = token_grid(spatial[0])
        return grid or spatial
    return spatial
