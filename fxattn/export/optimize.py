"""Exact rewrites of DIA in an exported ONNX graph, aimed at onnxruntime's CPU optimiser.

onnxruntime runs a plain ResNet as blocked-layout convolutions (``com.microsoft.nchwc``) with
the residual Add and the ReLU fused in. DIA's pool (``ReduceMean``) and its channel multiply
(``A * h[:, :, None, None]``, a broadcast ``Mul``) are ops its NCHWc transformer does not
handle, so every block leaves the blocked layout (``ReorderOutput``), runs the pool, the multiply,
the add and the ReLU as separate NCHW passes, and comes back (``ReorderInput``). The rewrites here
restate the same arithmetic in ops the transformer *does* keep blocked; each is exact up to float
reordering, has its own switch in :class:`OnnxOptimize`, and touches only DIA's nodes (the
exporter's name scopes ``fxattn_dia.*``), so a model without DIA is left byte for byte as it was.

``blocked_pool``
    ``ReduceMean(A, axes=[2, 3])`` -> ``Flatten(GlobalAveragePool(A))``: the transformer runs a
    ``GlobalAveragePool`` on the blocked tensor, so the pool no longer needs a layout reorder.
``pool_before_conv``
    ``GAP(Conv1x1(x, W, b)) = Conv1x1(GAP(x), W, b)`` (a 1x1, stride-1, unpadded convolution is
    linear per pixel and commutes with the mean): pool the convolution's narrower input instead of
    its output. Applied only where it reads fewer bytes at batch 1: alone,
    ``(C_out - C_in) * H * W > C_out * C_in`` (the activation read saved against the weights read
    by the pooled convolution; ResNet-50's first two stages, not its last two); with
    ``compose_first_layer``, which removes the pooled convolution, wherever ``C_in < C_out``.
``compose_first_layer``
    After ``pool_before_conv``, DIA's first input-path layer reads the pooled convolution:
    ``Linear(Conv1x1(GAP(x), Wc, bc), W, b)``, two linear maps in a row, one matrix
    ``W @ Wc`` (``C/r x C_in``) and one bias ``W @ bc + b`` (computed in float64, stored in
    float32; float reordering only). Each site gets its own composed matrix in place of the
    group's shared ``W`` (``C/r x C_out``) and the site's ``Wc`` (``C_out x C_in``), so a run
    reads ``C_in / C_out`` of the first layer's bytes (a quarter in a bottleneck ResNet) and
    never the pooled convolution's weights. With it on, ``pool_before_conv`` applies wherever
    the convolution widens the channels (``C_in < C_out``; the composed matrix then costs less
    than ``W`` alone), e.g. in all four stages of ResNet-50; its low-precision copy
    (``dia_weights``) quantises the composed matrix.
``blocked_scale``
    ``A * h[:, :, None, None]`` -> ``A * Resize(DepthwiseConv1x1(h, 1))``: a depthwise 1x1
    convolution with weight 1 (an exact copy) brings ``h`` into the blocked layout, a nearest
    ``Resize`` by ``H x W`` (an exact copy) gives it ``A``'s shape, and the transformer runs a
    ``Mul`` of equal blocked shapes in place - followed by the residual ``Add`` and ``ReLU`` in
    the blocked layout too (fused into the downsample convolution where there is one). Needs
    static ``H, W`` and ``C % 16 == 0`` (the blocked layout's channel block); a ``value_info``
    entry for the ``Resize`` output gives onnxruntime the symbolic batch dimension it needs to
    prove the shapes equal. **Off by default**: the large activations stay blocked as intended,
    but the expanded copy of ``h`` is a full extra write and the blocked ``Mul`` reads two full
    tensors; on ResNet-50 it measured slower than the plain broadcast ``Mul`` in NCHW (with its
    two layout reorders) at batch 1 and no faster at batch 8, on two machines (an AMD EPYC and
    an AVX-512 Intel Xeon; ``benchmarks/results/dia_vs_handwritten.md``).
``fused_residual``
    ``Relu(A * h + s)`` -> ``Relu(DepthwiseConv1x1(A * h, 1) + s)`` where ``s``, the shortcut,
    is not a convolution's output: onnxruntime fuses a residual ``Add`` and the ``ReLU`` after
    it into the convolution that produces one of its inputs, and DIA's multiply took that
    convolution away. The depthwise 1x1 convolution with weight 1 (an exact copy) gives the
    fusion a convolution again: one blocked pass (read the product and the shortcut, write the
    sum's ReLU) instead of a separate ``Add`` and ``Relu``. Applied after ``blocked_scale``, on
    the multiplies it made (the product is then blocked); a shortcut that is itself a
    convolution's output (a downsample) is fused there already and left alone. **Off by
    default** (and it needs ``blocked_scale``): onnxruntime does fuse as intended, but on
    ResNet-50 (2-core CPU, 224x224) it measured slower in every run of
    ``benchmarks/dia_vs_handwritten.py`` - the extra convolution costs more than the Add and
    ReLU it fuses.
``token_pool``
    DIA's mean over the tokens of a ``(B, N, C)`` activation (a ViT's), ``ReduceMean(A,
    axes=[1])``, -> ``MatMul(ones(1, N) / N, A)``: onnxruntime's ``ReduceMean`` over a middle
    axis is a slow loop (~60 us for ViT-S/16's 197 x 384 tokens on a 2-core AVX-512 Xeon, a
    matrix-vector product ~10 us), and ViT-S/16 has 24 DIA sites. Exact up to float
    reordering (the sum of ``a_i / N`` instead of ``sum(a_i) / N``).
``fold_initial_state``
    :func:`fxattn.export.state_fold.fold_initial_state`: at the first site of every group
    ``h = c = 0``, so the hidden path there is a constant row and ``f * c`` vanishes; fewer
    matrix bytes read.

What was tried and measured is in ``benchmarks/results/dia_cost_notes.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .dia_name_scope import has_dia, in_dia
from .onnx_graph import graph_reads, has_control_flow, node_attr, readers
from .state_fold import fold_initial_state

#: channel block of onnxruntime's blocked layout: 8 (AVX2) or 16 (AVX-512); 16 is safe for both
NCHWC_BLOCK = 16
#: rewrites that act only on what another one made: switching one on needs the others on
REQUIRES: dict[str, tuple[str, ...]] = {"fused_residual": ("blocked_scale",),
                                         "compose_first_layer": ("pool_before_conv",)}


@dataclass(frozen=True)
class OnnxOptimize:
    """Switches of the exact DIA rewrites run by :func:`fxattn.export_onnx`.

    All are on by default except ``blocked_scale`` and ``fused_residual`` (exact, but
    measured slower; see the module docstring). ``OnnxOptimize(pool_before_conv=False)`` turns
    one off, ``OnnxOptimize(blocked_scale=True)`` turns one on; ``export_onnx(...,
    optimize=False)`` turns all off.
    """

    blocked_pool: bool = True
    pool_before_conv: bool = True
    compose_first_layer: bool = True
    blocked_scale: bool = False  # measured slower: opt-in
    fused_residual: bool = False  # measured slower, and needs blocked_scale: opt-in
    token_pool: bool = True
    fold_initial_state: bool = True

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, bool):
                raise ConfigError(f"OnnxOptimize.{name} must be True or False, got {value!r}")
        for name, needed in REQUIRES.items():
            for other in needed:
                if getattr(self, name) and not getattr(self, other):
                    raise ConfigError(f"OnnxOptimize({name}=True) rewrites what {other} makes: "
                                      f"set {other}=True too")

    def to_dict(self) -> dict[str, bool]:
        return asdict(self)


def resolve_optimize(value: bool | OnnxOptimize | None) -> OnnxOptimize | None:
    """``True`` -> the defaults of :class:`OnnxOptimize`, ``False``/``None`` -> none, an
    :class:`OnnxOptimize` -> itself."""
    if value is True:
        return OnnxOptimize()
    if value is False or value is None:
        return None
    if isinstance(value, OnnxOptimize):
        return value
    raise ConfigError(f"optimize must be True, False or fxattn.OnnxOptimize(...), got {value!r}")


@dataclass
class OptimizeReport:
    """How many places each rewrite changed (``fold_initial_state``: nodes removed)."""

    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""  # why the rewrites were skipped (the file is then left as exported)

    @property
    def changed(self) -> bool:
        return not self.error and any(self.counts.values())

    @property
    def notes(self) -> list[str]:
        """The export report's note: what changed or why nothing did; none when nothing applied."""
        return [str(self)] if self.changed or self.error else []

    def __str__(self) -> str:
        if self.error:
            return f"exact DIA rewrites skipped ({self.error}); the graph is as exported"
        parts = [f"{name} {count}" for name, count in self.counts.items() if count]
        return "exact DIA rewrites for onnxruntime: " + (", ".join(parts) or "none applied")


# --------------------------------------------------------------------------- graph helpers


def tensor_shapes(model: Any) -> dict[str, list[int | str]]:
    """Shapes of every tensor: the exporter's ``value_info`` (shape inference when missing)."""
    graph = model.graph
    infos = list(graph.value_info) + list(graph.input) + list(graph.output)
    if len(graph.value_info) < len(graph.node) // 2:  # the TorchScript exporter writes few
        inferred = _inferred_shapes(model)
        if inferred is not None:
            infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(
                inferred.graph.output)
    shapes: dict[str, list[int | str]] = {}
    for info in infos:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param
                                 for d in tensor.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _inferred_shapes(model: Any) -> Any | None:
    """``model`` with inferred shapes, or ``None`` (rewrites that need a shape then do not
    apply). onnxruntime's symbolic shape inference first: it follows the shape arithmetic the
    TorchScript exporter writes for DIA's gate split (``Shape`` -> ``Div`` -> ``Slice``), so
    ``h`` gets its channel count, which onnx's own inference leaves unknown. Not on a graph
    with ``If``/``Loop`` subgraphs: on a detector's post-processing (data-dependent shapes
    through NMS) it took 212 s for Faster R-CNN MobileNetV3, against 1 s for onnx's, which
    gives the rewrites the shapes they need there (the DIA sites sit in the backbone)."""
    import onnx

    if not has_control_flow(model.graph):
        try:
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        except Exception:  # noqa: BLE001 - an op it does not know, a model over 2 GB...
            pass
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (ValueError, onnx.shape_inference.InferenceError):
        return None


def _constants(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node_attr(node, "value") is not None:
            values[node.output[0]] = numpy_helper.to_array(node_attr(node, "value"))
        elif node.op_type == "Identity" and node.input[0] in values:
            # the TorchScript exporter shares equal initializers through Identity nodes
            values[node.output[0]] = values[node.input[0]]
    return values


def _reduced_axes(node: Any, rank: int, consts: dict) -> list[int] | None:
    """The axes a reduction ``node`` of a rank-``rank`` tensor reduces, sorted and
    non-negative (``None`` when they are not constant)."""
    if len(node.input) > 1 and node.input[1]:
        axes = consts.get(node.input[1])
    else:  # opset < 18: axes attribute
        axes = node_attr(node, "axes")
    return None if axes is None else sorted(int(a) % rank for a in np.ravel(axes))


def _is_spatial_mean(node: Any, shapes: dict, consts: dict) -> bool:
    """``ReduceMean`` over the two spatial axes of a 4-D tensor."""
    if node.op_type != "ReduceMean" or len(shapes.get(node.input[0], [])) != 4:
        return False
    return _reduced_axes(node, 4, consts) == [2, 3]


def _token_count(node: Any, shapes: dict, consts: dict) -> int | None:
    """N when ``node`` is a ``ReduceMean`` over the token axis of a ``(..., N, C)`` tensor with
    a static N (the axis before the last one), else ``None``."""
    if node.op_type != "ReduceMean":
        return None
    rank = len(shapes.get(node.input[0], []))
    if rank < 3:
        return None
    tokens = shapes[node.input[0]][-2]
    if _reduced_axes(node, rank, consts) != [rank - 2] or not isinstance(tokens, int) \
            or tokens < 1:
        return None
    return tokens


def _is_pointwise_conv(node: Any, shapes: dict, consts: dict) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped ``Conv`` with constant weights (and bias)."""
    if node.op_type != "Conv" or node.input[1] not in consts:
        return False
    if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
        return False
    kernel = list(node_attr(node, "kernel_shape") or shapes.get(node.input[1], [0, 0, 0])[2:])
    return (kernel == [1, 1] and all(s == 1 for s in node_attr(node, "strides", [1, 1]))
            and not any(node_attr(node, "pads", [0, 0, 0, 0])) and node_attr(node, "group", 1) == 1
            and node_attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID"))


# --------------------------------------------------------------------------- the rewrites


def blocked_pool(model: Any, shapes: dict, consts: dict) -> int:
    """DIA's ``ReduceMean`` over H, W -> ``GlobalAveragePool`` (+ ``Flatten`` when not keepdims)."""
    import onnx

    nodes, count = [], 0
    for node in model.graph.node:
        if not (in_dia(node) and _is_spatial_mean(node, shapes, consts)):
            nodes.append(node)
            continue
        keepdims = node_attr(node, "keepdims", 1)
        pooled = node.output[0] if keepdims else f"{node.output[0]}__gap"
        nodes += _scoped(node, onnx.helper.make_node("GlobalAveragePool", [node.input[0]],
                                                     [pooled], name=f"{node.name}/fxattn_gap"))
        if not keepdims:
            nodes += _scoped(node, onnx.helper.make_node("Flatten", [pooled], [node.output[0]],
                                                         axis=1, name=f"{node.name}/fxattn_flat"))
            shapes[pooled] = [*shapes[node.input[0]][:2], 1, 1]
        count += 1
    _replace_nodes(model, nodes)
    return count


def pool_before_conv(model: Any, shapes: dict, consts: dict, composing: bool = False) -> int:
    """DIA's ``GAP(Conv1x1(x))`` -> ``Conv1x1(GAP(x))`` where that reads fewer bytes
    (``composing``: where ``compose_first_layer`` will then fold the pooled convolution into
    DIA's first layer)."""
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}
    users = readers(model.graph)  # an If's branches count as readers too
    nodes, count = [], 0
    for node in model.graph.node:
        pool = in_dia(node) and (node.op_type == "GlobalAveragePool"
                                 or _is_spatial_mean(node, shapes, consts))
        conv = producer.get(node.input[0]) if pool else None
        fits = conv is not None and _is_pointwise_conv(conv, shapes, consts)
        if fits:
            c_out, c_in = shapes[conv.input[1]][:2]
            spatial = shapes.get(conv.input[0], [])[2:]
            static = len(spatial) == 2 and all(isinstance(d, int) for d in spatial)
            if composing and _first_layer(node.output[0], users, consts) is not None:
                fits = c_in < c_out  # the pooled convolution's weights are then never read
            else:
                fits = static and (c_out - c_in) * spatial[0] * spatial[1] > c_out * c_in
        if not fits:
            nodes.append(node)
            continue
        flat = node.op_type == "ReduceMean" and not node_attr(node, "keepdims", 1)
        pooled, out = f"{node.output[0]}__input_gap", node.output[0]
        conv_out = f"{out}__pooled_conv" if flat else out
        nodes += _scoped(
            node,
            onnx.helper.make_node("GlobalAveragePool", [conv.input[0]], [pooled],
                                  name=f"{node.name}/fxattn_input_gap"),
            onnx.helper.make_node("Conv", [pooled, *conv.input[1:]], [conv_out],
                                  kernel_shape=[1, 1], name=f"{node.name}/fxattn_conv"),
        )
        if flat:
            nodes += _scoped(node, onnx.helper.make_node("Flatten", [conv_out], [out], axis=1,
                                                         name=f"{node.name}/fxattn_flat"))
        count += 1
    _replace_nodes(model, nodes)
    return count


def compose_first_layer(model: Any, shapes: dict, consts: dict) -> int:
    """``Gemm(Flatten(Conv1x1(GAP(x), Wc, bc)), W, b)`` in DIA -> ``Gemm(Flatten(GAP(x)),
    W @ Wc, W @ bc + b)``: one matrix per site, read instead of ``W`` and ``Wc``."""
    import onnx
    from onnx import numpy_helper

    producer = {out: node for node in model.graph.node for out in node.output}
    users = readers(model.graph)  # an If's branches count as readers too
    replaced: dict[int, Any] = {}  # id(node) -> its replacement (None: removed)
    retired: set[str] = set()  # initializers the composed layers no longer read
    for conv in model.graph.node:
        gap = producer.get(conv.input[0]) if conv.op_type == "Conv" and in_dia(conv) else None
        first = (_first_layer(conv.output[0], users, consts)
                 if gap is not None and gap.op_type == "GlobalAveragePool" and in_dia(gap)
                 and _is_pointwise_conv(conv, shapes, consts) else None)
        if first is None or first[0] is None:
            continue
        flatten, gemm = first
        weight = consts[gemm.input[1]].astype(np.float64)
        weight = weight if node_attr(gemm, "transB", 0) else weight.T  # (C/r, C_out)
        conv_weight = consts[conv.input[1]].astype(np.float64)[:, :, 0, 0]  # (C_out, C_in)
        conv_bias, bias = (np.ravel(consts[inputs[2]]).astype(np.float64)
                           if len(inputs) > 2 and inputs[2] else np.zeros(1)
                           for inputs in (conv.input, gemm.input))
        composed = f"{gemm.input[1]}.composed.{conv.input[1]}"
        model.graph.initializer.extend([
            numpy_helper.from_array((weight @ conv_weight).astype(np.float32), composed),
            numpy_helper.from_array((weight @ np.broadcast_to(conv_bias, conv_weight.shape[:1])
                                     + bias).astype(np.float32), f"{composed}.bias")])
        retired.update(name for name in [*gemm.input[1:], *conv.input[1:]] if name)
        flatten.input[0] = gap.output[0]  # the Flatten now reads the pooled input
        _set_shape(model, flatten.output[0], [shapes.get(flatten.output[0], [None])[0],
                                              conv_weight.shape[1]])
        replaced[id(gemm)] = _scoped(gemm, onnx.helper.make_node(
            "Gemm", [gemm.input[0], composed, f"{composed}.bias"], list(gemm.output), transB=1,
            name=gemm.name))[0]
        replaced[id(conv)] = None
    if replaced:
        nodes = [replaced.get(id(node), node) for node in model.graph.node]
        _replace_nodes(model, [node for node in nodes if node is not None])
        used = graph_reads(model.graph)
        keep = [i for i in model.graph.initializer if i.name in used or i.name not in retired]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return len(replaced) // 2


def _first_layer(pooled: str, users: dict, consts: dict) -> tuple[Any, Any] | None:
    """``(Flatten or None, Gemm)`` when the pooled tensor ``pooled`` is read only by DIA's first
    layer, a plain ``Gemm`` with constant weights (through a ``Flatten`` of a 4-D pool), and
    by nothing else: the layer ``compose_first_layer`` can fold a pooled convolution into."""
    readers = users.get(pooled, [])
    flatten = None
    if len(readers) == 1 and readers[0].op_type == "Flatten" \
            and node_attr(readers[0], "axis", 1) == 1:
        flatten, readers = readers[0], users.get(readers[0].output[0], [])
    if len(readers) != 1:
        return None
    gemm = readers[0]
    plain = (gemm.op_type == "Gemm" and in_dia(gemm) and gemm.input[0] == (
        flatten.output[0] if flatten is not None else pooled)
        and gemm.input[1] in consts and consts[gemm.input[1]].ndim == 2
        and (len(gemm.input) < 3 or not gemm.input[2] or gemm.input[2] in consts)
        and node_attr(gemm, "alpha", 1.0) == 1.0 and node_attr(gemm, "beta", 1.0) == 1.0
        and not node_attr(gemm, "transA", 0))
    return (flatten, gemm) if plain else None


def _set_shape(model: Any, name: str, dims: list) -> None:
    """Replace the ``value_info`` of tensor ``name`` (a rewrite changed its shape)."""
    import onnx

    infos = [info for info in model.graph.value_info if info.name != name]
    infos.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims))
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)


def token_pool(model: Any, shapes: dict, consts: dict) -> int:
    """DIA's ``ReduceMean`` over the tokens of ``(..., N, C)`` -> ``MatMul(ones(1, N) / N, A)``
    (+ ``Squeeze`` of the token axis when not keepdims)."""
    import onnx

    float32 = {info.name for info in (*model.graph.value_info, *model.graph.input)
               if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    nodes, count = [], 0
    for node in model.graph.node:
        tokens = _token_count(node, shapes, consts) if in_dia(node) else None
        if tokens is None or node.input[0] not in float32:
            nodes.append(node)
            continue
        weights = _constant(model, f"fxattn_token_mean_{tokens}",
                            np.full((1, tokens), 1.0 / tokens, np.float32))
        keepdims = node_attr(node, "keepdims", 1)
        pooled = node.output[0] if keepdims else f"{node.output[0]}__tokens"
        nodes += _scoped(node, onnx.helper.make_node("MatMul", [weights, node.input[0]],
                                                     [pooled], name=f"{node.name}/fxattn_tokens"))
        if not keepdims:  # axes are an input from opset 13, an attribute before
            axis = len(shapes[node.input[0]]) - 2
            inputs, attributes = [pooled], {}
            if opset >= 13:
                inputs.append(_constant(model, f"fxattn_axis_{axis}", np.array([axis], np.int64)))
            else:
                attributes["axes"] = [axis]
            nodes += _scoped(node, onnx.helper.make_node(
                "Squeeze", inputs, [node.output[0]], name=f"{node.name}/fxattn_squeeze",
                **attributes))
        count += 1
    _replace_nodes(model, nodes)
    return count


def blocked_scale(model: Any, shapes: dict, consts: dict) -> int:
    """DIA's ``A * h[:, :, None, None]`` -> ``A * Resize(DepthwiseConv1x1(h, 1), H x W)``."""
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}
    nodes, count = [], 0
    for node in model.graph.node:
        fits = in_dia(node) and node.op_type == "Mul" and len(node.input) == 2
        if fits:
            big, small = (shapes.get(name) for name in node.input)
            fits = (big is not None and small is not None and len(big) == 4 and len(small) == 4
                    and small[2:] == [1, 1] and big[1] == small[1] and isinstance(big[1], int)
                    and big[1] % NCHWC_BLOCK == 0
                    and all(isinstance(d, int) for d in big[2:]) and big[2] * big[3] > 1
                    and producer.get(node.input[0]) is not None
                    and producer[node.input[0]].op_type == "Conv")
        if not fits:
            nodes.append(node)
            continue
        a, h = node.input
        channels, height, width = big[1], big[2], big[3]
        ones = _constant(model, f"fxattn_opt.ones_{channels}",
                         np.ones((channels, 1, 1, 1), np.float32))
        scales = _constant(model, f"fxattn_opt.scales_{height}x{width}",
                           np.array([1, 1, height, width], np.float32))
        blocked, full = f"{node.output[0]}__scale_blocked", f"{node.output[0]}__scale_full"
        nodes += _scoped(
            node,
            onnx.helper.make_node("Conv", [h, ones], [blocked], group=channels,
                                  kernel_shape=[1, 1], name=f"{node.name}/fxattn_enter"),
            onnx.helper.make_node("Resize", [blocked, "", scales], [full], mode="nearest",
                                  coordinate_transformation_mode="asymmetric",
                                  nearest_mode="floor", name=f"{node.name}/fxattn_expand"),
            onnx.helper.make_node("Mul", [a, full], list(node.output), name=node.name),
        )
        # the Resize's shape inference cannot carry a symbolic batch through its scales;
        # onnxruntime proves the Mul's shapes equal only with this entry
        model.graph.value_info.append(
            onnx.helper.make_tensor_value_info(full, onnx.TensorProto.FLOAT, big))
        count += 1
    _replace_nodes(model, nodes)
    return count


def fused_residual(model: Any, shapes: dict, consts: dict) -> int:
    """``Relu(A * h + s)`` -> ``Relu(DepthwiseConv1x1(A * h, 1) + s)`` after ``blocked_scale``."""
    import onnx

    producer = {out: node for node in model.graph.node for out in node.output}
    users = readers(model.graph)  # an If's branches count as readers too

    def blocked_product(name: str) -> bool:
        """Made by ``blocked_scale``: a DIA ``Mul`` by an expanded (``Resize``d) scale."""
        mul = producer.get(name)
        if mul is None or mul.op_type != "Mul" or not in_dia(mul):
            return False
        expand = producer.get(mul.input[1])
        return expand is not None and expand.name.endswith("/fxattn_expand")

    nodes, count = [], 0
    for node in model.graph.node:
        product = None
        if node.op_type == "Add" and len(node.input) == 2:
            after = users.get(node.output[0], [])
            for ours, theirs in (node.input, node.input[::-1]):
                shortcut = producer.get(theirs)
                if (blocked_product(ours) and len(after) == 1 and after[0].op_type == "Relu"
                        and (shortcut is None or shortcut.op_type != "Conv")
                        and len(users.get(ours, [])) == 1
                        and shapes.get(ours) == shapes.get(theirs)):
                    product = ours
                    break
        if product is None:
            nodes.append(node)
            continue
        channels = shapes[product][1]
        ones = _constant(model, f"fxattn_opt.ones_{channels}",
                         np.ones((channels, 1, 1, 1), np.float32))
        copied = f"{product}__fusable"
        nodes += _scoped(producer[product], onnx.helper.make_node(
            "Conv", [product, ones], [copied], group=channels, kernel_shape=[1, 1],
            name=f"{node.name}/fxattn_fusable"))
        node.input[list(node.input).index(product)] = copied
        nodes.append(node)
        model.graph.value_info.append(
            onnx.helper.make_tensor_value_info(copied, onnx.TensorProto.FLOAT, shapes[product]))
        count += 1
    _replace_nodes(model, nodes)
    return count


def _constant(model: Any, name: str, value: np.ndarray) -> str:
    """``name``, added as an initializer holding ``value`` unless the graph has it already
    (the rewrites share their constant copies: one ``ones`` per channel count)."""
    from onnx import numpy_helper

    if not any(init.name == name for init in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _scoped(origin: Any, *nodes: Any) -> list[Any]:
    """``nodes`` with ``origin``'s metadata (its name scope): they stay recognisably DIA's."""
    for node in nodes:
        node.metadata_props.extend(origin.metadata_props)
    return list(nodes)


def _replace_nodes(model: Any, nodes: list[Any]) -> None:
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def optimize_model(model: Any, options: OnnxOptimize | None = None) -> OptimizeReport:
    """Run the enabled rewrites on ``model`` (an ``onnx.ModelProto``) in place."""
    options = options or OnnxOptimize()
    report = OptimizeReport({name: 0 for name in options.to_dict()})
    if not has_dia(model):
        return report
    if options.fold_initial_state:  # first: its zeros' Shape reads keep pools from composing
        report.counts["fold_initial_state"] = fold_initial_state(model, check=False,
                                                                  seeds=in_dia)
    shapes, consts = tensor_shapes(model), _constants(model)
    if options.blocked_pool:
        report.counts["blocked_pool"] = blocked_pool(model, shapes, consts)
    if options.pool_before_conv:
        report.counts["pool_before_conv"] = pool_before_conv(
            model, shapes, consts, composing=options.compose_first_layer)
    if options.compose_first_layer:
        report.counts["compose_first_layer"] = compose_first_layer(model, shapes, consts)
    if options.blocked_scale:
        report.counts["blocked_scale"] = blocked_scale(model, shapes, consts)
    if options.fused_residual:
        report.counts["fused_residual"] = fused_residual(model, shapes, consts)
    if options.token_pool:
        report.counts["token_pool"] = token_pool(model, shapes, consts)
    return report


def optimize_onnx_file(path: str | Path, options: OnnxOptimize | None = None) -> OptimizeReport:
    """Rewrite the ONNX file at ``path`` in place (untouched when nothing applies).

    The rewrites are an optimisation: a graph they cannot handle (an unexpected pattern, a
    result ``onnx.checker`` rejects) is left as exported and the report says why.
    """
    import onnx

    from .onnx_files import external_data_path, save_with_external_data

    path = Path(path)
    model = onnx.load(str(path))
    try:
        report = optimize_model(model, options)
        if report.changed and _small(model):
            onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - an optimisation never fails an export
        text = str(exc).strip().splitlines()
        return OptimizeReport(error=f"{type(exc).__name__}: {text[0] if text else ''}")
    if report.changed:
        if external_data_path(path).exists():
            save_with_external_data(model, path)
        else:
            onnx.save(model, str(path))
    return report


def _small(model: Any) -> bool:
    """Under protobuf's 2 GB limit (the in-memory checker serialises the model)."""
    return model.ByteSize() < 2**31 - 2**20
