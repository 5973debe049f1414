"""Dropping the layout copies onnxruntime makes of DIA's small vectors (bit-exact).

The ``ReorderOutput`` of each pooled ``(B, C, 1, 1)`` activation whose channels fill the blocks
(a 1x1 blocked image has the bytes of its NCHW form) and the ``Unsqueeze`` of each ``h`` (the
filter reshape reads ``(B, C)`` as well): a few microseconds a node, which is what DIA's small
vectors cost on small models.
"""

from __future__ import annotations

from typing import Any

from ..export.onnx_graph import node_attr
from .graph_edit import GraphEdit, reorder_output_channels
from .ort_graph import NCHWC


class LayoutCopies(GraphEdit):
    """The copies of the module docstring, as steps of a :class:`GraphEdit`."""

    def _without_unsqueeze(self, scale: str, node: Any) -> str:
        """``h`` before the ``Unsqueeze`` that made the ``(B, C, 1, 1)`` scale, when only this
        multiply reads it: the filter reshape reads ``(B, C)`` as well, one copy fewer."""
        unsqueeze = self.graph.producer.get(scale)
        if not self.drop_copies or unsqueeze is None or unsqueeze.op_type != "Unsqueeze" \
                or unsqueeze.domain or self.graph.users.get(scale, []) != [node] \
                or scale in self.graph.outputs:
            return scale
        self.copies_dropped += 1
        return unsqueeze.input[0]

    def drop_vector_reorders(self, dia_names: set[str]) -> None:
        """Drop each ``ReorderOutput`` that brings one of DIA's ``(B, C, 1, 1)`` vectors (a
        pooled activation) out of the blocked layout when ``C`` fills its blocks: the blocked
        layout of a 1x1 image, ``[B][C/b][1][1][b]``, is ``[B][C]``, the same bytes in the same
        order, so the reorder is a copy (bit-exact)."""
        for node in self.model.graph.node:
            channels = reorder_output_channels(node)
            if channels is None or node.output[0] not in dia_names or channels % self.block_size \
                    or node.output[0] in self.graph.outputs or id(node) in self.removed \
                    or not self._one_pixel(node.input[0]):
                continue
            self.removed.add(id(node))
            self.renamed[node.output[0]] = node.input[0]
            self.copies_dropped += 1

    def _one_pixel(self, tensor: str) -> bool:
        """Whether a blocked tensor is 1x1: a global pool's output, or an unpadded 1x1
        convolution's of a 1x1 input (the exporter's pooled convolution)."""
        node = self.graph.producer.get(tensor)
        if node is None or node.domain != NCHWC:
            return False
        if node.op_type == "GlobalAveragePool":
            return True
        return (node.op_type == "Conv" and list(node_attr(node, "kernel_shape", [])) == [1, 1]
                and not any(node_attr(node, "pads", [0, 0, 0, 0]))
                and self._one_pixel(node.input[0]))
