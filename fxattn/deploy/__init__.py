"""Deploy: the portable ONNX file compiled for one runtime.

Today one target, onnxruntime on the CPU (:func:`compile_ort_cpu`). The files follow its steps:

* ``ort_graph.py`` - onnxruntime's own optimised graph at a fixed batch (:func:`fix_batch`,
  :func:`ort_optimize`, :func:`nchwc_block_size`).
* ``fuse.py`` - DIA's channel multiplies fused into the blocked convolutions that read them;
  ``fold.py`` folds ``h`` into the weights before it, ``copies.py`` drops the layout copies of
  DIA's small vectors, ``graph_edit.py`` is the edit of onnxruntime's graph they share.
* ``verify.py`` - the compiled file against the portable one (:func:`verify_compiled`): no
  worse than the float32 computation it replaces.
* ``compile.py`` - :func:`compile_ort_cpu` runs the steps and saves the file
  (:class:`OrtCpuReport`).
"""

from .compile import METADATA_KEY, OrtCpuReport, compile_ort_cpu
from .fuse import SCALED_CONV
from .graph_edit import NODE_PREFIX
from .ort_graph import NCHWC, fix_batch, nchwc_block_size, ort_optimize
from .verify import CompileVerification, verify_compiled

__all__ = [
    "METADATA_KEY",
    "NCHWC",
    "NODE_PREFIX",
    "SCALED_CONV",
    "CompileVerification",
    "OrtCpuReport",
    "compile_ort_cpu",
    "fix_batch",
    "nchwc_block_size",
    "ort_optimize",
    "verify_compiled",
]
