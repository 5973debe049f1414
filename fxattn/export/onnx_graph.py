"""What the nodes of an ONNX graph read, the names their subgraphs read included.

An ``If`` or ``Loop`` node lists only its condition or trip count in ``node.input``; its
branches read tensors of the enclosing graph by name (outer-scope references). A torchvision
detector exported to ONNX has such nodes in its post-processing. A pass that decides from
``node.input`` alone whether a tensor is still needed would drop the node that makes a tensor
only a branch reads, and the graph would no longer be valid; every liveness and "who reads
this" question in fxattn's ONNX passes is asked here instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def subgraphs(node: Any) -> Iterable[Any]:
    """The graphs held in ``node``'s attributes (``If`` branches, ``Loop`` and ``Scan`` bodies)."""
    import onnx

    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def has_control_flow(graph: Any) -> bool:
    """Whether a node of ``graph`` holds a subgraph (``If``, ``Loop``, ``Scan``)."""
    return any(next(iter(subgraphs(node)), None) is not None for node in graph.node)


def node_reads(node: Any) -> list[str]:
    """The names ``node`` reads: its inputs, then every name its subgraphs' nodes read (at any
    depth). Names a subgraph makes itself are included too: harmless where the question is
    whether an outer tensor is needed, since a subgraph's own names never collide with them."""
    names = [name for name in node.input if name]
    for graph in subgraphs(node):
        for inner in graph.node:
            names.extend(node_reads(inner))
    return names


def graph_reads(graph: Any) -> set[str]:
    """Every name read by a node of ``graph`` (subgraphs included) or returned by it."""
    names = {name for node in graph.node for name in node_reads(node)}
    names.update(output.name for output in graph.output)
    return names


def readers(graph: Any) -> dict[str, list[Any]]:
    """Tensor name -> the nodes of ``graph`` that read it, directly or in their subgraphs; a
    node appears once per read (``Mul(x, x)`` reads ``x`` twice), so one entry means one read."""
    found: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node_reads(node):
            found.setdefault(name, []).append(node)
    return found


def remove_dead_nodes(model: Any) -> None:
    """Drop the nodes of ``model`` (in topological order) that no graph output depends on."""
    needed = {out.name for out in model.graph.output}
    keep = []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node_reads(node))  # an If's branches read outer names too
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))


def op_types(model: Any) -> Iterable[str]:
    return (node.op_type for node in model.graph.node)


def node_attr(node: Any, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name``, or ``default`` when it has none."""
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def remove_unused_initializers(model: Any) -> None:
    """Drop the initializers nothing in the graph reads (subgraphs included)."""
    used = graph_reads(model.graph)
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
