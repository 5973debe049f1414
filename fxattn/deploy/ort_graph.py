"""onnxruntime's own graph of a model: optimised as at session start, at a fixed batch.

The compile starts from what onnxruntime itself would run (:func:`ort_optimize`, the
``ORT_ENABLE_ALL`` graph saved to a file), with the batch fixed first (:func:`fix_batch`) so
that every shape is static. :func:`nchwc_block_size` says which channel block onnxruntime's
blocked layout (``com.microsoft.nchwc``) uses on this CPU.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

#: onnxruntime's domain of the blocked-layout operators
NCHWC = "com.microsoft.nchwc"


def ort_optimize(source: Path, target: Path) -> None:
    """Save onnxruntime's fully optimised graph of ``source`` at ``target`` (+ ``.data``):
    the graph an ``ORT_ENABLE_ALL`` session builds at start, hardware-specific (blocked
    layouts for this CPU). ``source`` should have static shapes (:func:`fix_batch`)."""
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
        ort_optimize(source, target)
        optimized = onnx.load(str(target))
    weights = {init.name: list(init.dims) for init in optimized.graph.initializer}
    for node in optimized.graph.node:
        if node.domain == NCHWC and node.op_type == "Conv":
            return int(weights[node.input[1]][0])
    return 0



def fix_batch(model: Any, batch_size: int) -> None:
    """Give every graph input and output, and every shape that shares their batch dimension,
    the batch size ``batch_size`` (in place).

    Raises :class:`~fxattn.ConfigError` when an input or output already has another fixed
    batch (a compiled file, say).
    """
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
