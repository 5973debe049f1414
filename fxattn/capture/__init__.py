"""Capture: a user's model as two ``torch.fx`` graphs (training and evaluation).

The first step of the pipeline. What it takes (example inputs, tracing options) and what it
gives (graphs with shapes recorded on their nodes) are all the later steps see of the model.
"""

from .tracing import (
    TRACE_LOCK,
    DualGraphs,
    ExampleInputs,
    FxAttnTracer,
    TraceOptions,
    check_model_inputs,
    propagate_shapes,
    trace_dual,
)

__all__ = [
    "TRACE_LOCK",
    "DualGraphs",
    "ExampleInputs",
    "FxAttnTracer",
    "TraceOptions",
    "check_model_inputs",
    "propagate_shapes",
    "trace_dual",
]
