"""Low-precision DIA weights in an exported ONNX model (``export_onnx(..., dia_weights=...)``).

At batch 1 on a CPU, DIA's cost is *reading its matrices*: the shared cell runs at every site of
its group, so ResNet-50 with r=4 reads ~200 MB of fp32 DIA weights per image. The convolutions
are compute-bound; the DIA matmuls are matrix-vector products bound by memory bandwidth. Only
fewer bytes per weight move that cost, so this module stores *only DIA's matrices* at lower
precision and leaves every other weight of the model as it was:

``"int8"`` / ``"int4"``
    onnxruntime's weight-only block quantiser
    (:class:`onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`): each DIA
    ``MatMul`` becomes a ``com.microsoft.MatMulNBits`` whose weight is stored as 8- or 4-bit
    integers with one fp32 scale per block of ``block_size`` input rows (symmetric; 128 by
    default, :data:`DEFAULT_BLOCK_SIZE`), and is
    dequantised inside the kernel - the matrix is read at 1/4 or 1/8 of its fp32 bytes.
    ``accuracy_level=4`` (the default here) lets the kernel quantise the activation row to int8
    and use integer dot products; without it the int8 kernel dequantises to fp32 and is slower
    than the fp32 matmul it replaces (measured in ``benchmarks/results/latency.md``).
``"fp16"``
    DIA's matrices stored as fp16 initializers followed by a ``Cast`` to fp32. This halves the
    file, but onnxruntime's constant folding turns ``Cast(initializer)`` back into an fp32
    initializer when the session is created, so the runtime reads the same bytes as fp32 (the
    benchmark shows no latency gain; it is a storage option).

The exporters write DIA's ``nn.Linear`` layers as ``Gemm(x, W, b, transB=1)`` whose ``W`` is
shared by every site of a group. onnxruntime's quantiser handles only ``MatMul`` with a
``(K, N)`` weight, so :func:`gemm_to_matmul` first rewrites each DIA ``Gemm`` into
``MatMul(x, W^T) + b`` with one transposed copy of each shared weight. The quantiser then
quantises a shared weight once per node that uses it (with identical results), so duplicate
initializers are merged afterwards (:func:`_dedupe_initializers`).

``apply_dia_weights(..., fold_state=True)`` first folds DIA's zero initial state
(:func:`fxattn.export.state_fold.fold_initial_state`).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Tolerance
from ..errors import ExportError
from ..names import DIA_PREFIX
from .dia_name_scope import dia_matrix_names, is_dia_name
from .onnx_files import external_data_path, onnx_file_bytes, save_with_external_data
from .onnx_graph import node_attr, remove_unused_initializers
from .state_fold import fold_initial_state

DIA_WEIGHT_MODES = ("fp32", "fp16", "int8", "int4")
#: rows of a matrix column that share one scale in int8 / int4 (onnxruntime's quantiser's own
#: default). Blocks of 32 store 0.125 more bytes per weight (fp32 scales: a fifth of int4's
#: bytes) and a memory-bound int4 matrix-vector product measured ~20% slower with them; no
#: accuracy effect of 128 against 32 was measured on trained models whose rows span several
#: blocks (benchmarks/lowp_blocks.py)
DEFAULT_BLOCK_SIZE = 128

#: verification tolerance per mode, ``|ort - torch| <= atol + rtol * |torch|`` against PyTorch
#: fp32 (documented in the results). Weight-only quantisation error grows with the scale of the
#: values, hence a relative part as large as the absolute one; these bounds hold with margin for
#: randomly initialised torchvision/timm classifiers and the CIFAR models of the tests.
LOWP_ATOL = {"fp16": 1e-2, "int8": 5e-2, "int4": 2e-1}
LOWP_RTOL = {"fp16": 1e-2, "int8": 5e-2, "int4": 2e-1}


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def gemm_to_matmul(model: Any, prefix: str = DIA_PREFIX) -> int:
    """Rewrite ``Gemm(x, W, b, transB=1)`` on DIA weights into ``MatMul(x, W^T) + b`` in place.

    Each shared ``W`` gets one transposed initializer ``<W>.T``; the original is removed when
    nothing else uses it. Returns the number of rewritten nodes.
    """
    import onnx
    from onnx import numpy_helper

    inits = _initializers(model)
    transposed: dict[str, str] = {}
    new_nodes = []
    rewritten = 0
    for index, node in enumerate(model.graph.node):
        weight = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else ""
        plain = (
            is_dia_name(weight, prefix)
            and weight in inits
            and node_attr(node, "alpha", 1.0) == 1.0
            and node_attr(node, "beta", 1.0) == 1.0
            and node_attr(node, "transA", 0) == 0
        )
        if not plain:
            new_nodes.append(node)
            continue
        trans_b = node_attr(node, "transB", 0)
        name = weight
        if trans_b:
            if weight not in transposed:
                array = numpy_helper.to_array(inits[weight]).T.copy()
                transposed[weight] = f"{weight}.T"
                model.graph.initializer.append(numpy_helper.from_array(array, transposed[weight]))
            name = transposed[weight]
        out = node.output[0]
        base = f"fxattn_lowp/{index}"
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{out}__matmul" if has_bias else out
        new_nodes.append(onnx.helper.make_node("MatMul", [node.input[0], name], [mm_out],
                                               name=f"{base}/MatMul"))
        if has_bias:
            new_nodes.append(onnx.helper.make_node("Add", [mm_out, node.input[2]], [out],
                                                   name=f"{base}/Add"))
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_unused_initializers(model)
    return rewritten


def _dedupe_initializers(model: Any) -> None:
    seen: set[str] = set()
    keep = []
    for init in model.graph.initializer:
        if init.name not in seen:
            seen.add(init.name)
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def quantize_dia_nbits(
    model: Any,
    bits: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int | None = 4,
    prefix: str = DIA_PREFIX,
) -> Any:
    """Weight-only ``bits``-bit quantisation of DIA's matmuls with onnxruntime's quantiser."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    gemm_to_matmul(model, prefix)
    rows = {init.name: init.dims[0] for init in model.graph.initializer if len(init.dims) == 2}
    targets: dict[int, list[str]] = {}  # block size -> nodes
    matmuls = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul":
            continue
        if is_dia_name(node.input[1], prefix) and node.input[1] in rows:
            node.name = node.name or f"fxattn_lowp/{index}/MatMul"  # the quantiser picks by name
            block = fitted_block(rows[node.input[1]], bits, block_size)
            targets.setdefault(block, []).append(node.name)
        matmuls.append(node.name)
    if not targets:
        raise ExportError(f"no DIA matrices (initializers named {prefix}*) to quantise; "
                          "dia_weights needs a model transformed with DIA")
    log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = log.level
    log.setLevel(logging.WARNING)  # it logs one INFO line per node it skips
    try:
        for block, nodes in sorted(targets.items()):
            # the quantiser takes every MatMul with constant weights unless excluded, whatever
            # nodes_to_include says: the model's own matrices (a ViT's) are excluded by name
            quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block,
                                             is_symmetric=True, accuracy_level=accuracy_level,
                                             nodes_to_include=nodes,
                                             nodes_to_exclude=set(matmuls) - set(nodes))
            quantizer.process()
            model = quantizer.model.model
    finally:
        log.setLevel(level)
    _dedupe_initializers(model)
    remove_unused_initializers(model)
    return model


def fitted_block(rows: int, bits: int, block_size: int) -> int:
    """The block size for a matrix of ``rows`` input rows: ``block_size``, or a smaller power
    of two (at least 16, onnxruntime's least) where that stores fewer bytes. A column is padded
    to whole blocks, so blocks of 128 would store a 16-row matrix 8 times over; the smaller
    block quantises the same rows with one scale as well (never less accurately)."""
    candidates = [b for b in (16, 32, 64, 128, 256) if b <= block_size] or [block_size]

    def stored(block: int) -> float:  # bytes per column: packed integers and fp32 scales
        blocks = -(-rows // block)
        return blocks * (block * bits / 8 + 4)

    return min(reversed(candidates), key=stored)  # ties: the larger block


def dia_to_fp16(model: Any, prefix: str = DIA_PREFIX) -> Any:
    """Store DIA's matrices as fp16 initializers, each followed by one ``Cast`` to fp32."""
    import onnx
    from onnx import numpy_helper

    names = set(dia_matrix_names(model, prefix))
    if not names:
        raise ExportError(f"no DIA matrices (initializers named {prefix}*) to convert to fp16")
    casts = []
    for init in model.graph.initializer:
        if init.name in names:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                           f"{init.name}__fp16")
            init.CopyFrom(half)
            casts.append(onnx.helper.make_node("Cast", [half.name], [half.name[: -len("__fp16")]],
                                               to=onnx.TensorProto.FLOAT,
                                               name=f"fxattn_lowp/cast/{half.name}"))
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def has_low_precision_weights(model: Any, prefix: str = DIA_PREFIX) -> bool:
    """Whether ``model`` stores DIA's matrices below fp32 (``MatMulNBits``, fp16 initializers):
    then it approximates the PyTorch module on purpose, and rounding rules do not judge it."""
    import onnx

    return any(node.op_type == "MatMulNBits" for node in model.graph.node) or any(
        init.data_type == onnx.TensorProto.FLOAT16 and is_dia_name(init.name, prefix)
        for init in model.graph.initializer)


def check_dia_weights(mode: str | None) -> None:
    """Refuse a ``dia_weights`` that is not one of :data:`DIA_WEIGHT_MODES` (``None``: as
    exported); exports call it before exporting, which can take minutes."""
    if mode is not None and mode not in DIA_WEIGHT_MODES:
        raise ExportError(f"dia_weights={mode!r} is not one of {', '.join(DIA_WEIGHT_MODES)} "
                          "(or None)")


def apply_dia_weights(
    path: str | Path,
    mode: str,
    *,
    fold_state: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    accuracy_level: int | None = 4,
    prefix: str = DIA_PREFIX,
) -> str:
    """Rewrite the ONNX file at ``path`` in place; return a one-line note of what was done."""
    import onnx

    if mode not in DIA_WEIGHT_MODES:
        raise ExportError(f"dia_weights={mode!r} is not one of {', '.join(DIA_WEIGHT_MODES)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise ExportError(f"block_size must be a power of two of at least 16 (onnxruntime's "
                          f"MatMulNBits), got {block_size!r}")
    model = onnx.load(str(path))
    before = sum(int(np.prod(i.dims)) * 4 for i in model.graph.initializer
                 if i.name in set(dia_matrix_names(model, prefix)))
    parts = []
    if fold_state:
        parts.append(f"folded the zero initial state ({fold_initial_state(model)} nodes removed)")
    if mode in ("int8", "int4"):
        model = quantize_dia_nbits(model, 8 if mode == "int8" else 4, block_size,
                                   accuracy_level, prefix)
        parts.append(f"DIA matrices stored as {mode} MatMulNBits (blocks of up to {block_size} "
                     "rows, symmetric"
                     + (f", accuracy_level {accuracy_level}" if accuracy_level else "") + ")")
    elif mode == "fp16":
        model = dia_to_fp16(model, prefix)
        parts.append("DIA matrices stored as fp16 (+ Cast)")
    path = Path(path)
    if external_data_path(path).exists():  # a model over 2 GB: its weights stay in that file
        save_with_external_data(model, path)
    else:
        onnx.save(model, str(path))
    after = onnx_file_bytes(path)
    parts.append(f"fp32 DIA matrices were {before / 1e6:.1f} MB; file now {after / 1e6:.1f} MB")
    return "; ".join(parts)


def tolerance(mode: str, base: Tolerance) -> Tolerance:
    """The verification tolerance of ``mode``: the looser of ``base`` and the mode's own.

    The error of quantised weights is intended, so the float64 check (which forgives rounding
    error, not approximation) is off for those modes.
    """
    if mode not in LOWP_ATOL:
        return base
    loose = base.loosened(LOWP_ATOL[mode], LOWP_RTOL[mode])
    return dataclasses.replace(loose, float64_check=False)
