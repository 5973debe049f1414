"""Residual *sites*: the additions ``y = shortcut + branch`` where DIA attaches.

Walking back from both operands of an add of two floating tensors of the same shape to their
nearest common ancestor (the block input), the *branch* is the operand with more parametrised
ops on its path; the shortcut has strictly fewer (identity or a projection). Adds of a
parameter or a constant have no common ancestor and are never sites.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import torch.fx as fx

from ..config import DIA
from .graph import node_module_path, stable_keys, tensor_dtype, tensor_parents, tensor_shape
from .layouts import layout_name
from .ops import ADD_FUNCTIONS, ADD_METHODS, OpInfo


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
        for parent in tensor_parents(node):
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
    info: OpInfo,
) -> int:
    """Most parametrised ops on any path ``ancestor -> target`` (the ancestor excluded)."""
    floor = index[ancestor]
    region = sorted(
        (n for n, m in marks.items() if m & side and index[n] > floor), key=index.__getitem__
    )
    depth: dict[fx.Node, int] = {ancestor: 0}
    for node in region:
        parents = [depth[p] for p in tensor_parents(node) if p in depth]
        if parents:
            depth[node] = max(parents) + int(info.is_parametrised(node))
    return depth.get(target, -1)


def _residual_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in ADD_METHODS:
        pass
    else:
        return None
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    return a, b


def find_residual_sites(
    gm: fx.GraphModule, dims: dict[fx.Node, int | None], info: OpInfo
) -> tuple[list[Site], list[str]]:
    """All residual additions of the graph, with branch / shortcut resolved."""
    nodes = list(gm.graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    keys = stable_keys(gm.graph)
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
                module_path=node_module_path(node),
                key=keys[node],
                channels=shape_a[channel_dim],
                channel_dim=channel_dim,
                ndim=ndim,
                layout=layout_name(channel_dim, ndim),
                kind="residual",
            )
        )
    return sites, notes


def select_sites(sites: list[Site], dia: DIA) -> list[Site]:
    include = [re.compile(p) for p in dia.include]
    exclude = [re.compile(p) for p in dia.exclude]

    def keep(site: Site) -> bool:
        names = (site.module_path, site.node)
        if include and not any(p.search(n) for p in include for n in names):
            return False
        return not any(p.search(n) for p in exclude for n in names)

    return [site for site in sites if keep(site)]
