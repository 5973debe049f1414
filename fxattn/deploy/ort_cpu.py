"""Compile a lean ONNX model for onnxruntime's CPU provider, with DIA's multiply fused.

A portable ONNX graph cannot say what onnxruntime's CPU provider needs to run DIA fast. Its
optimiser runs a ResNet's convolutions in a blocked channel layout (``com.microsoft.nchwc``,
channel blocks of 16 on AVX-512, 8 on AVX2) with the residual ``Add`` and the ``ReLU`` fused into
the convolution. DIA's channel multiply ``A * h[:, :, None, None]`` is a broadcast ``Mul`` that the
blocked layout does not handle, so in onnxruntime's own graph every DIA block leaves the layout
(``ReorderOutput``), runs the multiply, the residual add and the ReLU as three separate passes,
and comes back (``ReorderInput``): five passes over the block's activation where the plain
network needs none.

:func:`compile_ort_cpu` lets onnxruntime optimise the model first (``ORT_ENABLE_ALL``, the graph
it would build itself when the session starts), then rewrites what it produced: each DIA
multiply, with the residual add and ReLU after it, becomes **one** blocked depthwise 1x1
convolution whose weight is ``h`` itself::

    Relu(A * h + s)  ->  nchwc.Conv(A', W=h', Sum=s', group=B*C, activation=Relu)

where ``A'`` and ``s'`` are the blocked tensors viewed as one image of ``B*C`` channels (a free
reshape: the blocked layout of ``B`` images is the blocked layout of one image with ``B`` times
the channel blocks) and ``h'`` is ``h`` reshaped to ``(B*C, 1, 1, 1)``, which is exactly the
blocked depthwise filter layout. onnxruntime's blocked convolution reads its weight at run time,
so a weight computed by the graph is fine; what it cannot do is let that weight differ per
image - hence one channel group per image and channel, and a **fixed batch size** (``group`` is
an attribute). The arithmetic is the same multiply and add per element (onnxruntime's own model
and the compiled one agree to 0.0 on ResNet-50).

Where DIA's pool reads the narrower input ``z`` of the convolution that made ``A`` (the
exporter's ``pool_before_conv``; all four stages of ResNet-50) nothing else needs ``A``, so
``h`` can be folded into that convolution instead (``fold_weights``, on by default): it runs with
its weights and bias scaled by ``h`` (``Conv(z, W * h, b * h) = Conv(z, W, b) * h``, exact up to
float reordering) and sums the residual itself, and ``A`` is never written. Scaling the weights
is one blocked depthwise pass over them, done only where they are smaller than ``A``
(ResNet-50's first two stages).

``drop_copies`` (on by default) drops the layout copies onnxruntime makes of DIA's small
vectors: the ``ReorderOutput`` of each pooled ``(B, C, 1, 1)`` activation whose channels fill
the blocks (a 1x1 blocked image has the bytes of its NCHW form) and the ``Unsqueeze`` of each
``h`` (the filter reshape reads ``(B, C)`` as well). Bit-exact; a few microseconds a node, which
is what DIA's small vectors cost on small models.

The result is onnxruntime-specific: it holds ``com.microsoft.nchwc`` operators, whose weights were
laid out for this CPU's block size, so it runs only in onnxruntime's CPU provider on a CPU of the
same kind (onnxruntime says the same of any model it saved with layout optimisations). Keep the
portable file for everything else. The compiled file records the batch size, block size and
onnxruntime version in its metadata (``fxattn.ort_cpu``).

Only DIA's multiplies are rewritten: they are found by name scope and shape in the portable
model (the same scope rule as :mod:`fxattn.onnx_optimize`) and by name in onnxruntime's graph,
which keeps the names of the nodes it does not fuse. A model without DIA comes out as
onnxruntime's own optimised graph. Channels that do not fill the last block (MobileNetV2's 24)
get zero scales in the padding; a multiply whose activation onnxruntime does not run blocked
(after a squeeze-excitation's multiply, or in a channels-last ConvNeXt block) is left as it was,
and the report says why.

>>> report = fxattn.compile_ort_cpu("lean.onnx", "lean.b1.ort-cpu.onnx", batch_size=1)
>>> print(report)   # DIA multiplies fused into blocked convolutions: 16 of 16 ...
"""

from __future__ import annotations

import functools
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import DEFAULT_ATOL, DEFAULT_RTOL
from ..errors import ConfigError, ExportError, VerificationError, first_line
from ..export.lowp import LOWP_ATOL, LOWP_RTOL
from ..export.onnx_files import save_with_external_data
from ..export.onnx_graph import graph_reads, has_control_flow, readers, remove_dead_nodes
from ..export.optimize import in_dia, node_attr, tensor_shapes
from ..export.runtime import ort_session
from ..export.verify import element_ratios
from ..files import atomic_path, check_output_path

NCHWC = "com.microsoft.nchwc"
METADATA_KEY = "fxattn.ort_cpu"
#: the names of the nodes the rewrite adds (the cost account counts them as activation passes,
#: but for reshapes, which are views, and the scaled convolutions, which replace the original's)
NODE_PREFIX = "fxattn_ort_cpu."
#: the step name of a convolution run with ``h`` folded into its weights
SCALED_CONV = "ScaledConv"


@dataclass
class OrtCpuReport:
    """What :func:`compile_ort_cpu` did, and how the compiled model compares with the portable."""

    path: str
    batch_size: int
    block_size: int  # onnxruntime's channel block on this CPU (0: no blocked layout here)
    dia_multiplies: int  # DIA multiplies in the portable model
    fused: int  # of them, rewritten as a blocked convolution
    folded: int = 0  # of those, folded into the weights of the convolution before them
    copies_dropped: int = 0  # layout copies of DIA's vectors dropped (bit-exact)
    skipped: dict[str, str] = field(default_factory=dict)  # multiply -> why it was left alone
    nodes: dict[str, int] = field(default_factory=dict)  # onnxruntime's graph, then compiled
    max_abs_error: float | None = None  # compiled vs portable model in onnxruntime
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"compiled {self.path} for onnxruntime's CPU provider, batch {self.batch_size}"
                 f" (channel block {self.block_size or 'none'})",
                 f"DIA multiplies fused into blocked convolutions: {self.fused} of "
                 f"{self.dia_multiplies}"
                 + (f" ({self.folded} folded into the weights of the convolution before them)"
                    if self.folded else "")]
        if self.copies_dropped:
            lines.append(f"layout copies of DIA's vectors dropped: {self.copies_dropped}")
        lines += [f"  left as onnxruntime made it: {name} ({why})"
                  for name, why in self.skipped.items()]
        if self.nodes:
            lines.append(f"nodes: {self.nodes['onnxruntime']} in onnxruntime's graph, "
                         f"{self.nodes['compiled']} compiled")
        if self.max_abs_error is not None:
            lines.append(f"verified against the portable model in onnxruntime: max abs error "
                         f"{self.max_abs_error:.1e}")
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)


# --------------------------------------------------------------------------- onnxruntime's graph


def _ort_optimize(source: Path, target: Path) -> None:
    """Save onnxruntime's fully optimised graph of ``source`` at ``target`` (+ ``.data``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3  # its warning that the file is hardware-specific is our point
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_file_name", target.name + ".data")
    options.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=1)
def nchwc_block_size() -> int:
    """onnxruntime's channel block on this CPU (16 with AVX-512, 8 with AVX2; 0: not blocked).

    onnxruntime pads a blocked convolution's output channels to the block, so a convolution with
    4 output channels shows the block as the first dimension of its reordered weight.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "probe.onnx", Path(folder) / "probe.opt.onnx"
        onnx.save(model, str(source))
        _ort_optimize(source, target)
        optimized = onnx.load(str(target))
    weights = {init.name: list(init.dims) for init in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.domain == NCHWC and node.op_type == "Conv":
            return int(weights[node.input[1]][0])
    return 0


def _fix_batch(model: Any, batch_size: int) -> None:
    """Give every graph input and output, and every shape that shares their batch dimension,
    the batch size ``batch_size``."""
    symbols: set[str] = set()
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims:
            continue
        first = dims[0]
        if first.HasField("dim_value") and first.dim_value not in (0, batch_size):
            raise ConfigError(f"{value.name} has a fixed batch of {first.dim_value}, not "
                              f"{batch_size}; compile with batch_size={first.dim_value} or "
                              "export with a dynamic batch")
        if first.HasField("dim_param"):
            symbols.add(first.dim_param)
    for value in list(model.graph.input) + list(model.graph.output) + list(
            model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.Clear()
                dim.dim_value = batch_size
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_param") and dims[0].dim_value == 0:
            dims[0].dim_value = batch_size


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


# --------------------------------------------------------------------------- the rewrite


class _Graph:
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


def _reorder_output_channels(node: Any) -> int | None:
    """Channels of a ``ReorderOutput`` to NCHW (``None`` for any other node)."""
    if node is None or node.domain != NCHWC or node.op_type != "ReorderOutput" \
            or node_attr(node, "channels_last", 0):
        return None
    return int(node_attr(node, "channels", 0)) or None


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
    into that convolution's weights instead (see :class:`_Fuser`). Channels that do not fill
    the blocked layout's last block get zero scales. A multiply whose activation onnxruntime
    does not run blocked (after a squeeze-excitation's own multiply, say, which DIA's pool
    reads too) is left alone.

    With ``dia_names`` (:func:`dia_tensors` of the portable model), the layout copies
    onnxruntime makes of DIA's small vectors are dropped too (see
    :meth:`_Fuser.drop_vector_reorders`).
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


class _Fuser:
    """The rewrite of :func:`fuse_dia_multiplies`, one multiply at a time, then the graph.

    A multiply ``Relu(A * h + s)`` becomes one of two blocked convolutions:

    * **fused**: a depthwise 1x1 convolution of ``A`` whose weight is ``h``, summing ``s`` and
      applying the ReLU: one pass over ``A``, which the convolution before it wrote.
    * **folded**: when ``A = Conv(z, W, b)`` (a blocked convolution with constant weights, no
      sum or activation of its own, that nothing else reads), ``A * h = Conv(z, W * h, b * h)``:
      the convolution that made ``A`` is run with its output channels' weights scaled by ``h``
      and sums ``s`` itself, so ``A`` is never written or read back. Scaling the weights is a
      pass over ``W`` per image, so this is done only where ``W`` holds fewer numbers per output
      channel than ``A`` has pixels (ResNet-50's first two stages, not its last two, whose
      pools read ``z`` too). onnxruntime stores a blocked filter as
      ``[O/b][I/b][kh][kw][b_i][b_o]`` (the first convolution's as ``[O/b][I][kh][kw][b_o]``):
      in both, the output channel is the outer and innermost index, which is exactly the
      blocked layout of a ``(1, O, 1, I*kh*kw)`` image, so the scaling is itself a blocked
      depthwise 1x1 convolution with weight ``h`` over the filter viewed as that image. With
      ``B`` images the filters are repeated ``B`` times and run as a grouped convolution of
      ``B`` groups, one per image.
    """

    def __init__(self, model: Any, multiplies: dict[str, ChannelMultiply], batch_size: int,
                 block_size: int, fold_weights: bool = True, drop_copies: bool = False) -> None:
        self.model, self.batch_size, self.block_size = model, batch_size, block_size
        self.multiplies, self.fold_weights, self.drop_copies = multiplies, fold_weights, \
            drop_copies
        self.copies_dropped = 0
        self.graph = _Graph(model.graph)
        self.weights = {init.name: list(init.dims) for init in model.graph.initializer}
        self.blocked: dict[str, str] = {}  # NCHW tensor -> the same tensor, blocked
        for node in model.graph.node:
            if _reorder_output_channels(node) is not None:
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

    def fuse(self, node: Any) -> str:
        """Rewrite one multiply: "fused" or "folded", else why it was left alone."""
        from onnx import helper

        if not self.block_size:
            return "onnxruntime has no blocked layout on this CPU"
        new: list[Any] = []
        prefix = f"{NODE_PREFIX}{self.count}"
        activation, scale = self._operands(node)
        reorder = self.graph.producer.get(activation)
        channels = _reorder_output_channels(reorder)
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
            channels = _reorder_output_channels(node)
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


# --------------------------------------------------------------------------- the pass


def compile_ort_cpu(onnx_path: str | Path, output_path: str | Path, batch_size: int, *,
                    fold_weights: bool = True, drop_copies: bool = True, verify: bool = True,
                    overwrite: bool = True, seed: int = 0) -> OrtCpuReport:
    """Compile the lean ONNX model at ``onnx_path`` for onnxruntime's CPU provider.

    The model's batch dimension becomes ``batch_size``; onnxruntime optimises it as it would at
    session start; each DIA multiply (with the residual add and ReLU after it) becomes one
    blocked depthwise convolution (see the module docstring) or, with ``fold_weights`` (the
    default) and where it reads fewer bytes, is folded into the weights of the convolution that
    made its activation. With ``drop_copies`` (the default) the layout copies onnxruntime makes
    of DIA's small vectors (the reorder of each pooled activation whose channels fill the
    blocks, the unsqueeze of each ``h``) are dropped: same bytes, bit-exact. With ``verify``
    (the default) the
    compiled model is run against the portable one in onnxruntime on a random batch and must
    agree within fxattn's default tolerance (``|a - b| <= 1e-6 + 1e-5 |b|``; int8's where DIA's
    low-precision matrices quantise their input at run time), else
    :class:`~fxattn.VerificationError` and nothing is written. The file is written atomically
    (with ``<name>.data`` beside it for the weights).

    >>> fxattn.export_onnx(lean, "lean.onnx", example)
    >>> fxattn.compile_ort_cpu("lean.onnx", "lean.b8.ort-cpu.onnx", batch_size=8)
    """
    import onnx

    start = time.perf_counter()
    source = Path(onnx_path)
    if not source.is_file():
        raise ExportError(f"{source} is not a file; export the model first "
                          "(fxattn.export_onnx or `fxattn export`)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    target = check_output_path(output_path, overwrite)
    if target.resolve() == source.resolve():
        raise ExportError(f"the output {target} would overwrite the portable model; "
                          "choose another name, e.g. model.b1.ort-cpu.onnx")
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # noqa: BLE001 - onnx's own failure, in one line
        raise ExportError(f"{source} is not a readable ONNX model: {first_line(exc)}") from exc
    if has_control_flow(model.graph):
        raise ConfigError(
            f"{source} has control flow (If/Loop nodes, as a whole-detector export has); "
            "compile_ort_cpu fixes the batch of a batch-major graph and cannot here. Deploy "
            "the portable file (its exact DIA rewrites already ran), or compile a transformed "
            "part exported on its own (fxattn.export_onnx(lean.backbone, ...))")
    multiplies = channel_multiplies(model)
    dia_names = dia_tensors(model) if drop_copies else None
    tolerance = _tolerance(model)
    _fix_batch(model, batch_size)
    block = nchwc_block_size()
    with tempfile.TemporaryDirectory(prefix="fxattn-ort-cpu-") as folder:
        static, optimized = Path(folder) / "static.onnx", Path(folder) / "optimized.onnx"
        save_with_external_data(model, static)
        del model
        try:
            _ort_optimize(static, optimized)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
            raise ExportError(f"onnxruntime cannot optimise {source} at batch {batch_size}: "
                              f"{first_line(exc)}") from exc
        compiled = onnx.load(str(optimized))
        before = len(compiled.graph.node)
        counts = fuse_dia_multiplies(compiled, multiplies, batch_size, block,
                                     fold_weights=fold_weights, dia_names=dia_names)
        report = OrtCpuReport(path=str(target), batch_size=batch_size, block_size=block,
                              dia_multiplies=sum(found.dia for found in multiplies.values()),
                              fused=counts.fused, folded=counts.folded,
                              copies_dropped=counts.copies_dropped, skipped=counts.skipped,
                              nodes={"onnxruntime": before, "compiled": len(compiled.graph.node)})
        import onnxruntime as ort

        onnx.helper.set_model_props(compiled, {METADATA_KEY: json.dumps(
            {"batch_size": batch_size, "block_size": block, "onnxruntime": ort.__version__})})
        with atomic_path(target) as staged:
            _save(compiled, staged)
            del compiled
            if verify:
                report.max_abs_error = _verify(source, staged, batch_size, seed, tolerance)
    report.seconds = time.perf_counter() - start
    return report


def _save(model: Any, path: Path) -> None:
    """One file, as the export writes it, or ``<name>.data`` beside it over protobuf's 2 GB."""
    import onnx

    if model.ByteSize() < 2**31 - 2**26:  # a margin for the graph itself
        onnx.save_model(model, str(path))
    else:
        save_with_external_data(model, path)


def _tolerance(model: Any) -> tuple[float, float]:
    """(atol, rtol) for the compiled model against the portable one.

    fxattn's default, except where DIA's ``MatMulNBits`` quantise their input row to int8 at
    run time (``accuracy_level=4``): there a float-reordered input (the folded convolution's
    pool, say) can round to the next int8 step, so the low-precision modes' own tolerance
    against PyTorch applies (int8's, the tighter of the two).
    """
    if any(node.op_type == "MatMulNBits" and node_attr(node, "accuracy_level", 0) == 4
           for node in model.graph.node):
        return LOWP_ATOL["int8"], LOWP_RTOL["int8"]
    return DEFAULT_ATOL, DEFAULT_RTOL


def _verify(portable: Path, compiled: Path, batch_size: int, seed: int,
            tolerance: tuple[float, float]) -> float:
    """Largest difference between the compiled and the portable model on a random batch, each
    within ``tolerance`` (atol, rtol)."""
    atol, rtol = tolerance
    try:
        reference, session = ort_session(str(portable)), ort_session(str(compiled))
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(f"onnxruntime cannot load the compiled model: "
                                f"{first_line(exc)}") from exc
    rng = np.random.default_rng(seed)
    feed = {}
    for value in reference.get_inputs():
        if value.type != "tensor(float)":
            raise ConfigError(f"input {value.name} is {value.type}; compile_ort_cpu feeds "
                              "float tensors only (pass verify=False to skip the check)")
        shape = [batch_size if i == 0 else d for i, d in enumerate(value.shape)]
        if not all(isinstance(d, int) for d in shape):
            raise ConfigError(f"input {value.name} has shape {value.shape}: only the batch may "
                              "be dynamic to verify (pass verify=False to skip the check)")
        feed[value.name] = rng.standard_normal(shape).astype(np.float32)
    expected = reference.run(None, feed)
    try:
        actual = session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(f"the compiled model fails to run in onnxruntime "
                                f"({first_line(exc)}); keep the portable model and report this "
                                "model to fxattn") from exc
    worst = 0.0
    for want, got in zip(expected, actual, strict=True):
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        error = float(np.nanmax(diff)) if diff.size else 0.0
        if got.shape != want.shape or (
                want.size and element_ratios(got, want, atol, rtol).max() > 1):
            raise VerificationError(
                f"the compiled model differs from the portable one in onnxruntime (max abs "
                f"error {error:.2e}); keep the portable model and report this model to fxattn")
        worst = max(worst, error)
    return worst
