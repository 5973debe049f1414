"""Walking a shape-propagated graph: module paths, stable node keys, tensor edges, the main
path (the nodes every input-to-output path crosses); what shape propagation recorded on a
node (its shape and dtype)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn


def node_module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return ""


def stable_keys(graph: fx.Graph) -> dict[fx.Node, str]:
    """Names that survive re-tracing in another mode: module path + op + occurrence."""
    counts: dict[tuple[str, str], int] = {}
    keys: dict[fx.Node, str] = {}
    for node in graph.nodes:
        path = node_module_path(node)
        if node.op == "call_module":
            kind = "module"
        else:
            kind = getattr(node.target, "__name__", str(node.target))
        occurrence = counts.get((path, kind), 0)
        counts[(path, kind)] = occurrence + 1
        keys[node] = f"{path}:{kind}:{occurrence}"
    return keys


def tensor_parents(node: fx.Node) -> list[fx.Node]:
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


def is_float_tensor(node: fx.Node) -> bool:
    dtype = tensor_dtype(node)
    return node.op != "get_attr" and dtype is not None and dtype.is_floating_point


def _carries_float_tensors(node: fx.Node) -> bool:
    """A multi-output op (``split``, ``chunk``, ``unbind``) of floating tensors."""
    meta = node.meta.get("tensor_meta")
    return (
        node.op != "get_attr"
        and isinstance(meta, (list, tuple))
        and any(getattr(item, "dtype", None) is not None and item.dtype.is_floating_point
                for item in meta)
    )


def reaching(graph: fx.Graph, sources: Iterable[fx.Node], forward: bool) -> set[fx.Node]:
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
            stack.extend(tensor_parents(node) if node.op != "output" else node.all_input_nodes)
    return seen


def feature_nodes(source: fx.Node, is_parametrised: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """Floating-point nodes that carry the input's features forward.

    Features flow through floating-point tensors, and through the multi-output ops that
    split them (a CSP block's ``chunk``: its halves are features too). From integer inputs
    (token ids) they start at the first parametrised op (the embedding lookup); masks,
    position ids and shapes that are computed *from* the input without parameters are side
    paths, and their edges into every layer must not hide the stage boundaries.
    """
    seen: set[tuple[fx.Node, bool]] = set()
    stack = [(source, is_float_tensor(source))]
    while stack:
        node, in_features = stack.pop()
        if (node, in_features) in seen:
            continue
        seen.add((node, in_features))
        for user in node.users:
            if user.op == "get_attr":
                continue
            if user.op == "output" or is_float_tensor(user) or _carries_float_tensors(user):
                if in_features or is_parametrised(user):
                    stack.append((user, True))
            elif not in_features and tensor_dtype(user) is not None:
                stack.append((user, False))
    return {node for node, in_features in seen if in_features}


def main_path_dominators(
    graph: fx.Graph,
    is_parametrised: Callable[[fx.Node], bool] = lambda node: False,
    sink: fx.Node | None = None,
) -> list[fx.Node]:
    """Nodes that every path from the first input to ``sink`` passes through, in order.

    ``sink`` defaults to the output (excluded from the result); a given sink is included.
    A node is crossed by every path iff no edge between main-path nodes jumps over it in
    topological order. Inputs other than the first (masks, timesteps) do not form paths, and
    edges to nodes the sink does not depend on (an encoder's skip connections) do not count.
    """
    placeholders = list(graph.find_nodes(op="placeholder"))
    output = next(iter(graph.find_nodes(op="output")))
    if not placeholders:
        return []
    end = output if sink is None else sink
    relevant = feature_nodes(placeholders[0], is_parametrised) & reaching(
        graph, [end], forward=False
    )
    ordered = [
        n for n in graph.nodes
        if n in relevant and (n is output or tensor_shape(n) or _carries_float_tensors(n))
    ]
    position = {node: i for i, node in enumerate(ordered)}
    cover = [0] * (len(ordered) + 1)
    for node in ordered:
        parents = node.all_input_nodes if node is output else tensor_parents(node)
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


def example_batch_size(graph: fx.Graph) -> int | None:
    """The example's batch size: the leading dimension of the first input."""
    first = next(iter(graph.find_nodes(op="placeholder")), None)
    shape = tensor_shape(first) if first is not None else None
    return shape[0] if shape else None


def count_parameters(module: nn.Module) -> int:
    """Number of distinct parameter elements (tied parameters count once)."""
    return sum(p.numel() for p in module.parameters())


def iter_tensor_inputs(node: fx.Node) -> Iterable[fx.Node]:
    """The input nodes of ``node`` that carry tensors (according to shape propagation)."""
    for arg in node.all_input_nodes:
        if "tensor_meta" in arg.meta and _is_tensor_meta(arg.meta["tensor_meta"]):
            yield arg


def _is_tensor_meta(meta: Any) -> bool:
    return hasattr(meta, "shape") and hasattr(meta, "dtype")


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not _is_tensor_meta(meta):
        return None
    return tuple(int(s) for s in meta.shape)


def tensor_dtype(node: fx.Node) -> torch.dtype | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not _is_tensor_meta(meta):
        return None
    return meta.dtype
