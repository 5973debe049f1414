"""An edit of onnxruntime's optimised graph: who makes and reads each tensor, what is replaced.

The fuser (:mod:`.fuse`) rewrites onnxruntime's graph one DIA multiply at a time without
touching the node list while it reads it: new nodes are recorded before the node they replace
(:attr:`GraphEdit.replaced`), removed nodes by id, renamed tensors by name, and
:meth:`GraphEdit.finish` puts it all in place at the end.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..export.onnx_graph import graph_reads, node_attr, readers, remove_dead_nodes
from .ort_graph import NCHWC

#: the names of the nodes the rewrite adds (the cost account counts them as activation passes,
#: but for reshapes, which are views, and the scaled convolutions, which replace the original's)
NODE_PREFIX = "fxattn_ort_cpu."


class OrtGraph:
    """Producers and users of every tensor of onnxruntime's optimised graph."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.users = readers(graph)
        self.outputs = {value.name for value in graph.output}

    def only_user(self, tensor: str, op_type: str) -> Any | None:
        users = self.users.get(tensor, [])
        if len(users) == 1 and users[0].op_type == op_type and not users[0].domain \
                and tensor not in self.outputs:
            return users[0]
        return None


def reorder_output_channels(node: Any) -> int | None:
    """Channels of a ``ReorderOutput`` to NCHW (``None`` for any other node)."""
    if node is None or node.domain != NCHWC or node.op_type != "ReorderOutput" \
            or node_attr(node, "channels_last", 0):
        return None
    return int(node_attr(node, "channels", 0)) or None



class GraphEdit:
    """The state of one rewrite of onnxruntime's graph ``model`` (see the module docstring).

    ``multiplies`` are the portable model's channel multiplies (:func:`.fuse.channel_multiplies`)
    by node name; ``blocked`` maps each NCHW tensor that onnxruntime also holds in the blocked
    layout to that blocked tensor.
    """

    def __init__(self, model: Any, multiplies: dict[str, Any], batch_size: int,
                 block_size: int, fold_weights: bool = True, drop_copies: bool = False) -> None:
        self.model, self.batch_size, self.block_size = model, batch_size, block_size
        self.multiplies, self.fold_weights, self.drop_copies = multiplies, fold_weights, \
            drop_copies
        self.copies_dropped = 0
        self.graph = OrtGraph(model.graph)
        self.weights = {init.name: list(init.dims) for init in model.graph.initializer}
        self.blocked: dict[str, str] = {}  # NCHW tensor -> the same tensor, blocked
        for node in model.graph.node:
            if reorder_output_channels(node) is not None:
                self.blocked[node.output[0]] = node.input[0]
        self.replaced: dict[int, list[Any]] = {}  # id(kept node) -> the nodes before it
        self.removed: set[int] = set()
        self.renamed: dict[str, str] = {}  # a removed ReorderInput's output -> blocked tensor
        self.constants: list[Any] = []
        self.count = 0

    def constant(self, name: str, values: list[int]) -> str:
        from onnx import numpy_helper

        if name not in {c.name for c in self.constants}:
            self.constants.append(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def _operands(self, node: Any) -> tuple[str, str]:
        """A channel multiply's (activation, scale), as the portable model said."""
        k = self.multiplies[node.name].scale_input
        return node.input[1 - k], node.input[k]

    def _flat(self, tensor: str, name: str, new: list[Any]) -> str:
        """``tensor`` viewed as one image of ``B*C`` channels (itself at batch 1)."""
        from onnx import helper

        if self.batch_size == 1:
            return tensor
        flat = self.constant(f"{NODE_PREFIX}flat_batch", [1, -1, 0, 0])
        prefix, what = name.rsplit(".", 1)
        new.append(helper.make_node("Reshape", [tensor, flat], [name],
                                    name=f"{prefix}/Reshape_{what}"))
        return name

    def finish(self) -> None:
        """Put the new nodes in place, drop what nothing reads, and the stale shapes."""
        graph = self.model.graph
        nodes: list[Any] = []
        for node in graph.node:
            nodes.extend(self.replaced.get(id(node), []))
            if id(node) not in self.removed:
                nodes.append(node)
        for node in nodes:
            for i, name in enumerate(node.input):
                if name in self.renamed:
                    node.input[i] = self.renamed[name]
        del graph.node[:]
        graph.node.extend(nodes)
        remove_dead_nodes(self.model)
        used = graph_reads(graph)
        graph.initializer.extend(c for c in self.constants if c.name in used)
        del graph.value_info[:]  # onnxruntime's were for its own graph; shapes are static now
