"""DIA's channel multiplies, found in the portable model, fused into onnxruntime's graph.

Each DIA multiply ``Relu(A * h + s)`` of onnxruntime's optimised graph becomes one blocked
depthwise 1x1 convolution whose weight is ``h`` (see :mod:`fxattn.deploy.compile`), or, where
that reads fewer bytes, is folded into the weights of the convolution before it
(:mod:`.fold`); the layout copies of DIA's small vectors are dropped (:mod:`.copies`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..export.dia_name_scope import in_dia
from ..export.onnx_graph import node_attr
from ..export.optimize import tensor_shapes
from .copies import LayoutCopies
from .fold import WeightFold
from .graph_edit import NODE_PREFIX, reorder_output_channels
from .ort_graph import NCHWC

#: the step name of a convolution run with ``h`` folded into its weights
SCALED_CONV = "ScaledConv"


@dataclass(frozen=True)
class ChannelMultiply:
    """A channel multiply ``A * s`` of a ``(B, C, H, W)`` activation by a ``(B, C, 1, 1)`` scale,
    as the portable model states it."""

    scale_input: int  # which input of the Mul is the scale
    dia: bool  # DIA's, by name scope ``fxattn_dia.*``
    pixels: int | None  # H * W of the activation (None: not static)


def channel_multiplies(model: Any) -> dict[str, ChannelMultiply]:
    """The channel multiplies of the portable model, by node name."""
    shapes = tensor_shapes(model)
    found = {}
    for node in model.graph.node:
        if node.op_type != "Mul" or node.domain or not node.name or len(node.input) != 2:
            continue
        dims = [shapes.get(name, []) for name in node.input]
        if not all(len(d) == 4 for d in dims):
            continue
        for k in (0, 1):
            activation, scale = dims[1 - k], dims[k]
            if scale[2:] == [1, 1] and activation[2:] != [1, 1] and scale[1] == activation[1]:
                height, width = activation[2:]
                pixels = height * width if isinstance(height, int) and isinstance(width, int) \
                    else None
                found[node.name] = ChannelMultiply(k, in_dia(node), pixels)
    return found


def dia_tensors(model: Any) -> set[str]:
    """The tensors DIA's nodes make in the portable model (by name scope ``fxattn_dia.*``);
    onnxruntime keeps those names for the nodes it does not fuse."""
    return {out for node in model.graph.node if in_dia(node) for out in node.output}

@dataclass
class FuseCounts:
    """What :func:`fuse_dia_multiplies` did."""

    fused: int = 0  # DIA multiplies rewritten as blocked convolutions
    folded: int = 0  # of them, folded into the weights of the convolution before them
    copies_dropped: int = 0  # layout copies of DIA's vectors (reorders, unsqueezes) dropped
    skipped: dict[str, str] = field(default_factory=dict)  # multiply -> why it was left alone


def fuse_dia_multiplies(model: Any, multiplies: dict[str, ChannelMultiply], batch_size: int,
                        block_size: int, *, fold_weights: bool = True,
                        dia_names: set[str] | None = None) -> FuseCounts:
    """Rewrite each DIA multiply of onnxruntime's graph ``model`` (in place) as a blocked
    convolution, with the residual add and ReLU after it when there are.

    ``multiplies`` is :func:`channel_multiplies` of the portable model. Each multiply becomes a
    blocked depthwise convolution whose weight is the scale or, with ``fold_weights``, where the
    activation is made by a blocked convolution with constant weights that nothing else reads
    and those weights hold fewer numbers per image than the activation, the scale is folded
    into that convolution's weights instead (see :mod:`.fold`). Channels that do not fill
    the blocked layout's last block get zero scales. A multiply whose activation onnxruntime
    does not run blocked (after a squeeze-excitation's own multiply, say, which DIA's pool
    reads too) is left alone.

    With ``dia_names`` (:func:`dia_tensors` of the portable model), the layout copies
    onnxruntime makes of DIA's small vectors are dropped too (see
    :meth:`.copies.LayoutCopies.drop_vector_reorders`).
    """
    fuser = _Fuser(model, multiplies, batch_size, block_size, fold_weights,
                   drop_copies=dia_names is not None)
    present = {node.name for node in model.graph.node}
    counts = FuseCounts()
    counts.skipped = {name: "onnxruntime fused it into another node"
                      for name, found in sorted(multiplies.items())
                      if found.dia and name not in present}
    for node in list(model.graph.node):
        found = multiplies.get(node.name)
        if found is not None and found.dia and node.op_type == "Mul" and not node.domain:
            how = fuser.fuse(node)
            if how in ("fused", "folded"):
                counts.fused += 1
                counts.folded += how == "folded"
            else:
                counts.skipped[node.name] = how
    if dia_names is not None:
        fuser.drop_vector_reorders(dia_names)
    counts.copies_dropped = fuser.copies_dropped
    fuser.finish()
    return counts


class _Fuser(WeightFold, LayoutCopies):
    """The rewrite of :func:`fuse_dia_multiplies`, one multiply at a time, then the graph.

    A multiply ``Relu(A * h + s)`` becomes one of two blocked convolutions:

    * **fused**: a depthwise 1x1 convolution of ``A`` whose weight is ``h``, summing ``s`` and
      applying the ReLU: one pass over ``A``, which the convolution before it wrote.
    * **folded**: when ``A = Conv(z, W, b)`` that nothing else reads,
      ``A * h = Conv(z, W * h, b * h)``, which sums ``s`` itself (:mod:`.fold`).
    """


    def fuse(self, node: Any) -> str:
        """Rewrite one multiply: "fused" or "folded", else why it was left alone."""
        from onnx import helper

        if not self.block_size:
            return "onnxruntime has no blocked layout on this CPU"
        new: list[Any] = []
        prefix = f"{NODE_PREFIX}{self.count}"
        activation, scale = self._operands(node)
        reorder = self.graph.producer.get(activation)
        channels = reorder_output_channels(reorder)
        if channels is None:
            made_by = f"a {reorder.op_type} in NCHW" if reorder is not None else "an input"
            return f"its activation is not in the blocked layout (it comes from {made_by})"
        add = self.graph.only_user(node.output[0], "Add")
        shortcut = None
        if add is not None:
            shortcut = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            if shortcut == node.output[0]:
                add, shortcut = None, None
        if shortcut is not None and shortcut not in self.blocked and channels % 4:
            # onnxruntime's ReorderInput takes whole groups of 4 channels (Res2Net's 14-channel
            # splits): the shortcut cannot be brought into the blocked layout
            return (f"its shortcut, in NCHW, has {channels} channels; onnxruntime blocks only "
                    "multiples of 4")
        padded = -(-channels // self.block_size) * self.block_size
        if padded != channels:  # the blocked tensor's last block holds zero channels
            pads = self.constant(f"{NODE_PREFIX}pad{padded - channels}",
                                 [0, 0, 0, 0, 0, padded - channels, 0, 0])
            new.append(helper.make_node("Pad", [scale, pads], [f"{prefix}.scale_padded"],
                                        name=f"{prefix}/PadScale"))
            scale = f"{prefix}.scale_padded"
        else:
            scale = self._without_unsqueeze(scale, node)
        new.append(helper.make_node("Reshape", [scale, self.constant(f"{NODE_PREFIX}filter",
                                                                     [-1, 1, 1, 1])],
                                    [f"{prefix}.w"], name=f"{prefix}/ReshapeW"))

        relu = self.graph.only_user(add.output[0], "Relu") if add is not None else None
        last = relu or add or node
        result = last.output[0]

        producer = self._foldable(node, reorder, padded)
        if producer is not None:
            conv_inputs = self._folded_conv(producer, prefix, new)
            group, conv_attributes = self.batch_size, {
                a.name: helper.get_attribute_value(a) for a in producer.attribute
                if a.name != "group"}
            self.removed.add(id(producer))
        else:
            conv_inputs = [self._flat(reorder.input[0], f"{prefix}.x", new), f"{prefix}.w", ""]
            group, conv_attributes = self.batch_size * padded, {
                "kernel_shape": [1, 1], "strides": [1, 1], "dilations": [1, 1],
                "pads": [0, 0, 0, 0]}
        if shortcut is not None:
            if shortcut not in self.blocked:
                new.append(helper.make_node("ReorderInput", [shortcut], [f"{prefix}.shortcut"],
                                            name=f"{prefix}/ReorderInput", domain=NCHWC,
                                            channels_last=0))
                self.blocked[shortcut] = f"{prefix}.shortcut"
            conv_inputs.append(self._flat(self.blocked[shortcut], f"{prefix}.sum", new))
        if relu is not None:
            conv_attributes["activation"] = "Relu"
        out_blocked = f"{result}.blocked"
        conv_out = out_blocked if self.batch_size == 1 else f"{prefix}.y"
        step = SCALED_CONV if producer is not None else "Conv"
        new.append(helper.make_node("Conv", conv_inputs, [conv_out], name=f"{prefix}/{step}",
                                    domain=NCHWC, group=group, **conv_attributes))
        if self.batch_size > 1:  # back to B images
            unflat = self.constant(f"{NODE_PREFIX}unflat{padded}", [-1, padded, 0, 0])
            new.append(helper.make_node("Reshape", [conv_out, unflat], [out_blocked],
                                        name=f"{prefix}/ReshapeY"))
        # for NCHW users, if any (removed with the dead nodes when there are none)
        new.append(helper.make_node("ReorderOutput", [out_blocked], [result],
                                    name=f"{prefix}/ReorderOutput", domain=NCHWC,
                                    channels=channels, channels_last=0))
        self.blocked[result] = out_blocked
        for user in self.graph.users.get(result, []):
            if user.op_type == "ReorderInput" and user.domain == NCHWC \
                    and not node_attr(user, "channels_last", 0):
                self.renamed[user.output[0]] = out_blocked
                self.removed.add(id(user))
        self.removed |= {id(old) for old in (node, add, relu) if old is not None}
        self.replaced[id(last)] = new
        self.count += 1
        return "folded" if producer is not None else "fused"
