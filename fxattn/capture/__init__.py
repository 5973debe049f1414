"""Capture: a user's model as two ``torch.fx`` graphs (training and evaluation).

The first step of the pipeline. What it takes (example inputs, tracing options) and what it
gives (graphs with shapes recorded on their nodes) are all the later steps see of the model.

- :mod:`.inputs` - :class:`ExampleInputs` (one real batch, normalised) and
  :func:`check_model_inputs` (model / input mismatches refused before tracing);
- :mod:`.tracer` - :class:`TraceOptions`, :class:`FxAttnTracer` with the timm / torchvision
  registries, symbolic tracing and its failure messages, :data:`TRACE_LOCK`;
- :mod:`.dual` - :func:`trace_dual` (training and evaluation graphs, ``torch.fx`` first and
  ``torch.export`` as the fallback) and :class:`DualGraphs`;
- :mod:`.shapes` - :func:`propagate_shapes` (``tensor_meta`` on every node);
- :mod:`.signature` - the ``forward()`` arguments the capture fixes (unused optional ones
  at their defaults; ``use_cache=False`` for a language model whose example leaves the cache
  out) and the error for an output type no graph can carry.
"""

from .dual import DualGraphs, export_dual, trace_dual
from .inputs import ExampleInputs, check_model_inputs, is_sample_list
from .shapes import propagate_shapes
from .tracer import TRACE_LOCK, FxAttnTracer, TraceOptions

__all__ = [
    "TRACE_LOCK",
    "DualGraphs",
    "ExampleInputs",
    "FxAttnTracer",
    "TraceOptions",
    "check_model_inputs",
    "export_dual",
    "is_sample_list",
    "propagate_shapes",
    "trace_dual",
]
