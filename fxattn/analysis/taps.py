"""SSIA *taps*: the stage outputs whose attention maps SSIA compares.

A tap is the last feature map at each spatial resolution on the network's main path (a node
every input-to-output path crosses), low to high. A model whose resolution never changes (ViT)
gets ``SSIA.token_taps`` evenly spaced taps instead. In an encoder-decoder (UNet, FPN, YOLO)
the main path is the one from the input to the end of the down-sampling path
(:mod:`.encoder`): the skip connections into the decoder would otherwise leave only the
stages before the first of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from .encoder import downsampling_end
from .graph import (
    example_batch_size,
    main_path_dominators,
    node_module_path,
    stable_keys,
    tensor_dtype,
    tensor_shape,
)
from .layouts import feature_grid, layout_name, token_grid
from .ops import OpInfo, modifies_in_place


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
    # a user writes into the tap's storage (timm's ReLU(inplace=True) after a residual add):
    # SSIA must read a copy, or autograd's saved tensor goes stale
    modified_in_place: bool = False


def _make_tap(node: fx.Node, index: int, dims: dict[fx.Node, int | None], key: str,
              root: nn.Module) -> Tap:
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
        grid, skip = token_grid(spatial[0])
    elif 1 <= len(spatial) <= 3:
        grid = spatial
    else:
        grid = None
    path = node_module_path(node)
    in_place = any(modifies_in_place(user, node, root) for user in node.users)
    return Tap(index, node.name, path, key, shape, channel_dim, layout, grid, skip, in_place)


def find_taps(
    gm: fx.GraphModule,
    dims: dict[fx.Node, int | None],
    residual_nodes: set[str],
    token_taps: int,
) -> tuple[list[Tap], list[str]]:
    """Stage outputs on the main path, low to high (see the module docstring)."""
    keys = stable_keys(gm.graph)
    info = OpInfo(gm)
    batch = example_batch_size(gm.graph)

    def is_map(node: fx.Node) -> bool:
        return _tap_candidate(node, dims, batch)

    chosen: list[fx.Node] = []
    notes: list[str] = []
    encoder = downsampling_end(gm.graph, dims, is_map, info.is_parametrised)
    if encoder is not None:
        chosen, notes = _stage_outputs(
            gm.graph, dims, info, is_map, residual_nodes, token_taps, encoder.end
        )
        if len(chosen) >= 2:
            notes.insert(0, (
                f"encoder-decoder: the decoder starts at the up-sampling "
                f"'{encoder.upsampling.name}' ({node_module_path(encoder.upsampling) or 'root'});"
                f" taps are the stage outputs on the down-sampling path up to its deepest "
                f"feature '{encoder.end.name}' ({node_module_path(encoder.end) or 'root'}), "
                "low to high, each supervised by the next deeper one; the decoder above the "
                "deepest resolution is not tapped"
            ))
    if len(chosen) < 2:
        chosen, notes = _stage_outputs(
            gm.graph, dims, info, is_map, residual_nodes, token_taps, None
        )
    if len(chosen) < 2:
        # No two stage outputs on a single main path: parallel streams that meet only at the
        # head (CrossViT's two patch sizes), or a graph whose blocks all sit inside one
        # dominator-free region. The residual blocks are still the natural layers to
        # supervise: take evenly spaced block outputs in graph order.
        blocks = _block_outputs(
            [node for node in gm.graph.nodes if node.name in residual_nodes and is_map(node)]
        )
        if len(blocks) >= 2:
            count = min(token_taps, len(blocks))
            chosen = [blocks[round((i + 1) * len(blocks) / count) - 1] for i in range(count)]
            notes = [
                f"no two stage outputs on the main path: {count} taps evenly spaced over "
                f"{len(blocks)} residual blocks"
            ]
    taps = [_make_tap(node, i, dims, keys[node], gm) for i, node in enumerate(chosen)]
    return taps, notes


def _stage_outputs(
    graph: fx.Graph,
    dims: dict[fx.Node, int | None],
    info: OpInfo,
    is_map: Callable[[fx.Node], bool],
    residual_nodes: set[str],
    token_taps: int,
    sink: fx.Node | None,
) -> tuple[list[fx.Node], list[str]]:
    """The last feature at each resolution on the main path from the input to ``sink``."""
    candidates = [
        (node, feature_grid(node, dims))
        for node in main_path_dominators(graph, info.is_parametrised, sink)
        if node.op != "placeholder" and is_map(node)
    ]
    # A resolution is a number of positions: flattening a (T, H, W) grid to L = T*H*W
    # positions before a head does not start a new stage. Each run's stage output is its last
    # feature on the richest grid (the clip, not its flattened view). Tokens of a square grid
    # (plus class / register tokens) sit at that grid's resolution: a ViT's patch embedding
    # and its blocks form one stage.
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
    return chosen, notes


def _richest_last(run: list[fx.Node], ranks: dict[fx.Node, int]) -> fx.Node:
    richest = max(ranks[node] for node in run)
    return next(node for node in reversed(run) if ranks[node] == richest)


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
        or not node_module_path(node)
        or node_module_path(adds[i + 1]) != node_module_path(node)
    ]
