"""Export: the lean model as a portable, verified ONNX file.

The files follow the steps of :func:`export_onnx`:

* ``onnx.py`` - the public entry: a detector goes to ``detector.py``, any other module to
  ``portable.py`` (``torch.onnx`` with the dynamo exporter, TorchScript as a fallback, the
  exact rewrites of ``compat.py`` when the exporter needs them).
* ``optimize.py`` and ``state_fold.py`` - exact DIA rewrites of the exported graph
  (``dia_name_scope.py``: which names and nodes are DIA's).
* ``lowp.py`` - DIA's matrices stored at lower precision (fp16, int8, int4).
* ``agreement.py`` - the one rule for two computations of the same model (allclose, then
  the reference's own float32 error); ``verify.py`` applies it to onnxruntime against PyTorch
  (``detection.py``: the matching rule for detections), :mod:`fxattn.deploy` to a compiled
  file against the portable one.
* ``onnx_files.py``, ``onnx_graph.py``, ``runtime.py`` - files, graph queries and
  onnxruntime sessions shared by the steps (and by :mod:`fxattn.deploy`).
"""

from .detection import MatchReport, MatchRule
from .detector import DetectionExportReport, export_detector
from .lowp import DIA_WEIGHT_MODES, LOWP_ATOL, LOWP_RTOL
from .onnx import export_onnx
from .optimize import OnnxOptimize, OptimizeReport
from .portable import ExportReport
from .verify import VerificationReport, verify_onnx

__all__ = [
    "DIA_WEIGHT_MODES",
    "LOWP_ATOL",
    "LOWP_RTOL",
    "DetectionExportReport",
    "ExportReport",
    "MatchReport",
    "MatchRule",
    "OnnxOptimize",
    "OptimizeReport",
    "VerificationReport",
    "export_detector",
    "export_onnx",
    "verify_onnx",
]
