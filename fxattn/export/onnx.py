"""The public ONNX export: :func:`export_onnx` sends a detector to the detector export and every
other module to the portable export.

The dispatch is explicit here (not a registry filled by importing a module) so that reading
this file tells where a model goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..capture import ExampleInputs
from ..config import DEFAULT_ATOL, DEFAULT_RTOL
from ..errors import ConfigError
from ..modules.graph_module import unwrap
from .detector import DetectionExportReport, export_detector, is_detection_export
from .optimize import OnnxOptimize
from .portable import ExportReport, export_portable


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike[str],
    example_inputs: Any,
    *,
    opset: int | None = None,
    exporter: str = "auto",
    verify: bool = True,
    batch_sizes: tuple[int, ...] = (2, 3),
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    float64_check: bool = True,
    overwrite: bool = True,
    seed: int = 0,
    dia_weights: str | None = None,
    optimize: bool | OnnxOptimize | None = True,
    outputs: str | Sequence[str] | None = "auto",
) -> ExportReport | DetectionExportReport:
    """Export ``module`` to ``path`` as ONNX with a dynamic batch and verify it in onnxruntime.

    An fxattn training module is stripped first (its lean evaluation graph is exported). The
    module is exported in eval mode; a module in training mode is copied, never switched.

    Args:
        module: the module to export (typically ``fxattn.strip_ssia(net)``).
        path: the ``.onnx`` file to write (see the overwrite policy in the module docstring).
        example_inputs: one batch, as for :func:`fxattn.transform`: the inputs of the exported
            model. They may differ from the inputs an fxattn training module was transformed
            with (a language model trained with ``labels``, exported from ``input_ids`` /
            ``attention_mask`` to logits): the lean graph is then captured again for them,
            with the training module's DIA weights (:func:`fxattn.strip_ssia` with
            ``example_inputs``). A lean module from ``strip_ssia(net)`` takes only its own
            inputs; pass ``net`` itself, or ``strip_ssia(net, example_inputs=...)``, for others.
        opset: ONNX opset (exporter default when ``None``).
        exporter: ``"auto"`` (dynamo, then TorchScript on failure), ``"dynamo"`` or
            ``"torchscript"``. When the dynamo exporter fails, it is retried once with exact
            export-compatibility rewrites (:mod:`fxattn.export_compat`); the report then says
            ``"dynamo+compat"``.
        verify: compare onnxruntime with PyTorch at ``batch_sizes`` (two sizes, not only 1).
        atol, rtol: every output element must satisfy ``|ort - torch| <= atol + rtol*|torch|``
            (defaults 1e-6 and 1e-5, chosen from the zoo's measured errors; see
            :mod:`fxattn.verify`).
        float64_check: when that fails, judge the error against PyTorch's own float32 rounding
            error, measured with a float64 run (ill-conditioned outputs; on by default).
        dia_weights: ``"fp16"``, ``"int8"`` or ``"int4"`` stores only DIA's matrices at lower
            precision (see :mod:`fxattn.lowp`); verification then uses that mode's looser
            tolerance (``fxattn.lowp.LOWP_ATOL`` / ``LOWP_RTOL``) where it exceeds yours.
        optimize: the exact DIA rewrites of :mod:`fxattn.onnx_optimize` (``True``, the
            default: all but the opt-in ``blocked_scale`` and ``fused_residual``; ``False``:
            none; an :class:`fxattn.OnnxOptimize` picks them). A model without DIA is never
            changed by them.
        outputs: which outputs of a model that returns a mapping (a Hugging Face
            ``ModelOutput``, a dict) the file keeps, named after them. ``"auto"`` (default):
            ``logits`` alone where it sits beside other entries (an encoder-decoder's encoder
            state, hidden states), said in the report's notes; ``None``: every output; a list
            of names: those (:mod:`fxattn.export.outputs`).

    A detector (a scoped fxattn model, or a module fed a list of images) is exported whole
    by :func:`fxattn.export_detection.export_detector` (``exporter``, ``opset``, ``verify``,
    ``seed``, ``dia_weights`` and ``optimize`` passed on), which verifies detections instead of
    elements and returns its ``DetectionExportReport``.

    Raises:
        ExportError: the path cannot be written or no exporter could export the module.
        VerificationError: onnxruntime disagrees with PyTorch beyond the tolerance; the message
            names the worst element (output, batch, index, both values, errors).
        ExportError: also when ``atol`` / ``rtol`` are negative, not finite, or both zero.
    """
    options: dict[str, Any] = dict(
        opset=opset,
        exporter=exporter,
        verify=verify,
        batch_sizes=batch_sizes,
        atol=atol,
        rtol=rtol,
        float64_check=float64_check,
        overwrite=overwrite,
        seed=seed,
        dia_weights=dia_weights,
        optimize=optimize,
        outputs=outputs,
    )
    if isinstance(module, nn.Module):
        inputs = ExampleInputs.from_user(example_inputs)
        if is_detection_export(unwrap(module), inputs):  # list[image] -> list[dict]
            del options["batch_sizes"], options["atol"], options["rtol"]
            del options["float64_check"], options["outputs"]
            if outputs not in ("auto", None):
                raise ConfigError("outputs= chooses entries of a mapping output; a detector's "
                                  "export keeps its boxes, labels and scores: leave it out")
            return export_detector(unwrap(module), path, inputs.args, **options)
    return export_portable(module, path, example_inputs, **options)
