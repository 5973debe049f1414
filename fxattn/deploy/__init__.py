"""Deploy: the portable ONNX file compiled for one runtime.

Today one target, onnxruntime on the CPU (:func:`compile_ort_cpu`): its own graph
optimisations saved at a fixed batch size, DIA's channel multiplies fused into the
convolutions that read them, checked against the portable file.
"""

from .ort_cpu import OrtCpuReport, compile_ort_cpu

__all__ = ["OrtCpuReport", "compile_ort_cpu"]
