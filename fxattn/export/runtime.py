"""onnxruntime sessions as fxattn runs them: CPU provider, fixed threads, no spinning.

onnxruntime's worker threads spin after each run by default; with several sessions alive in one
process an idle session's spinning threads steal the cores from the one being timed (seen on 2
cores: ResNet-50 went from 46 ms to 83 ms), so spinning is off unless asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..capture import ExampleInputs
from ..errors import VerificationError


def ort_session(path: str, threads: int | None = None, spinning: bool = False,
                optimize: bool = True) -> Any:
    """An onnxruntime CPU session; worker threads do not spin (see the module docstring).
    ``optimize=False`` runs the graph as written (no onnxruntime graph optimisations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_feed(session: Any, inputs: ExampleInputs) -> dict[str, np.ndarray]:
    """The example's tensors, in order, keyed by the ONNX model's input names."""
    tensors = inputs.tensors()
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise VerificationError(
            f"the ONNX model takes {len(names)} inputs but the example has {len(tensors)} tensors"
        )
    return {name: t.detach().cpu().numpy() for name, t in zip(names, tensors, strict=True)}


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set ``torch.set_num_threads`` for the duration of a benchmark."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
