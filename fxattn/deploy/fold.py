"""Folding DIA's ``h`` into the weights of the convolution that made its activation.

When ``A = Conv(z, W, b)`` (a blocked convolution with constant weights, no sum or activation
of its own, that nothing else reads), ``A * h = Conv(z, W * h, b * h)``: the convolution that
made ``A`` is run with its output channels' weights scaled by ``h`` and sums the residual
itself, so ``A`` is never written or read back (exact up to float reordering). Scaling the
weights is a pass over ``W`` per image, so this is done only where ``W`` holds fewer numbers per
output channel than ``A`` has pixels (ResNet-50's first two stages, not its last two, whose
pools read ``z`` too).

onnxruntime stores a blocked filter as ``[O/b][I/b][kh][kw][b_i][b_o]`` (the first
convolution's as ``[O/b][I][kh][kw][b_o]``): in both, the output channel is the outer and
innermost index, which is exactly the blocked layout of a ``(1, O, 1, I*kh*kw)`` image, so the
scaling is itself a blocked depthwise 1x1 convolution with weight ``h`` over the filter viewed
as that image. With ``B`` images the filters are repeated ``B`` times and run as a grouped
convolution of ``B`` groups, one per image.
"""

from __future__ import annotations

from typing import Any

from ..export.onnx_graph import node_attr
from .graph_edit import NODE_PREFIX, GraphEdit
from .ort_graph import NCHWC


class WeightFold(GraphEdit):
    """The weight fold of the module docstring, as steps of a :class:`GraphEdit`."""

    def _foldable(self, node: Any, reorder: Any, padded: int) -> Any | None:
        """The blocked convolution that made the multiply's activation, if ``h`` can be folded
        into its weights (see the class docstring), else ``None``."""
        pixels = self.multiplies[node.name].pixels
        producer = self.graph.producer.get(reorder.input[0])
        if not self.fold_weights or pixels is None or producer is None \
                or producer.domain != NCHWC or producer.op_type != "Conv" \
                or node_attr(producer, "group", 1) != 1 or node_attr(producer, "activation") \
                or len(producer.input) > 3 or producer.output[0] in self.graph.outputs:
            return None
        if [user.name for user in self.graph.users.get(reorder.input[0], [])] != [reorder.name] \
                or self.graph.users.get(reorder.output[0], []) != [node]:
            return None  # something else reads A (DIA's pool, say): it is written anyway
        weight = self.weights.get(producer.input[1])
        bias = producer.input[2] if len(producer.input) > 2 and producer.input[2] else None
        if weight is None or len(weight) != 4 or weight[0] != padded \
                or (bias is not None and self.weights.get(bias) != [padded]):
            return None
        per_channel = weight[1] * weight[2] * weight[3]
        return producer if per_channel < pixels else None

    def _folded_conv(self, producer: Any, prefix: str, new: list[Any]) -> list[str]:
        """The inputs of ``producer`` with ``h`` folded into its weights and bias (without the
        sum), one group of filters per image."""
        from onnx import helper

        batch = self.batch_size
        out_channels, in_channels, height, width = self.weights[producer.input[1]]
        image = [1, batch * out_channels, 1, in_channels * height * width]
        weight = producer.input[1]
        if batch > 1:  # one copy of the filters per image
            new.append(helper.make_node(
                "Expand", [weight, self.constant(f"{NODE_PREFIX}repeat{batch}",
                                                 [batch, 1, 1, 1, 1])],
                [f"{prefix}.weights"], name=f"{prefix}/ExpandWeights"))
            weight = f"{prefix}.weights"
        key = "x".join(map(str, image[1:]))
        new += [
            helper.make_node("Reshape", [weight, self.constant(f"{NODE_PREFIX}image{key}",
                                                               image)],
                             [f"{prefix}.weight_image"], name=f"{prefix}/ReshapeWeights"),
            helper.make_node("Conv", [f"{prefix}.weight_image", f"{prefix}.w"],
                             [f"{prefix}.scaled_image"], name=f"{prefix}/ScaleWeights",
                             domain=NCHWC, group=batch * out_channels, kernel_shape=[1, 1],
                             strides=[1, 1], dilations=[1, 1], pads=[0, 0, 0, 0]),
            helper.make_node("Reshape", [f"{prefix}.scaled_image", self.constant(
                f"{NODE_PREFIX}filters{batch * out_channels}x{in_channels}x{height}x{width}",
                [batch * out_channels, in_channels, height, width])],
                [f"{prefix}.scaled_weights"], name=f"{prefix}/ReshapeScaled"),
        ]
        inputs = [self._flat(producer.input[0], f"{prefix}.x", new), f"{prefix}.scaled_weights"]
        if len(producer.input) > 2 and producer.input[2]:
            bias = producer.input[2]
            if batch > 1:
                new.append(helper.make_node("Tile", [bias, self.constant(
                    f"{NODE_PREFIX}tile{batch}", [batch])], [f"{prefix}.biases"],
                    name=f"{prefix}/TileBias"))
                bias = f"{prefix}.biases"
            new += [
                helper.make_node("Reshape", [f"{prefix}.w", self.constant(
                    f"{NODE_PREFIX}vector", [-1])], [f"{prefix}.h"], name=f"{prefix}/ReshapeH"),
                helper.make_node("Mul", [bias, f"{prefix}.h"], [f"{prefix}.scaled_bias"],
                                 name=f"{prefix}/ScaleBias"),
            ]
            inputs.append(f"{prefix}.scaled_bias")
        else:
            inputs.append("")
        return inputs
