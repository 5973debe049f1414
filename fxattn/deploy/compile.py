"""Compile a lean ONNX model for onnxruntime's CPU provider, with DIA's multiply fused.

A portable ONNX graph cannot say what onnxruntime's CPU provider needs to run DIA fast. Its
optimiser runs a ResNet's convolutions in a blocked channel layout (``com.microsoft.nchwc``,
channel blocks of 16 on AVX-512, 8 on AVX2) with the residual ``Add`` and the ``ReLU`` fused into
the convolution. DIA's channel multiply ``A * h[:, :, None, None]`` is a broadcast ``Mul`` that the
blocked layout does not handle, so in onnxruntime's own graph every DIA block leaves the layout
(``ReorderOutput``), runs the multiply, the residual add and the ReLU as three separate passes,
and comes back (``ReorderInput``): five passes over the block's activation where the plain
network needs none.

:func:`compile_ort_cpu` lets onnxruntime optimise the model first (``ORT_ENABLE_ALL``, the graph
it would build itself when the session starts), then rewrites what it produced: each DIA
multiply, with the residual add and ReLU after it, becomes **one** blocked depthwise 1x1
convolution whose weight is ``h`` itself::

    Relu(A * h + s)  ->  nchwc.Conv(A', W=h', Sum=s', group=B*C, activation=Relu)

where ``A'`` and ``s'`` are the blocked tensors viewed as one image of ``B*C`` channels (a free
reshape: the blocked layout of ``B`` images is the blocked layout of one image with ``B`` times
the channel blocks) and ``h'`` is ``h`` reshaped to ``(B*C, 1, 1, 1)``, which is exactly the
blocked depthwise filter layout. onnxruntime's blocked convolution reads its weight at run time,
so a weight computed by the graph is fine; what it cannot do is let that weight differ per
image - hence one channel group per image and channel, and a **fixed batch size** (``group`` is
an attribute). The arithmetic is the same multiply and add per element (onnxruntime's own model
and the compiled one agree to 0.0 on ResNet-50).

Where DIA's pool reads the narrower input ``z`` of the convolution that made ``A`` (the
exporter's ``pool_before_conv``; all four stages of ResNet-50) nothing else needs ``A``, so
``h`` can be folded into that convolution instead (``fold_weights``, on by default): it runs with
its weights and bias scaled by ``h`` (``Conv(z, W * h, b * h) = Conv(z, W, b) * h``, exact up to
float reordering) and sums the residual itself, and ``A`` is never written. Scaling the weights
is one blocked depthwise pass over them, done only where they are smaller than ``A``
(ResNet-50's first two stages).

``drop_copies`` (on by default) drops the layout copies onnxruntime makes of DIA's small
vectors: the ``ReorderOutput`` of each pooled ``(B, C, 1, 1)`` activation whose channels fill
the blocks (a 1x1 blocked image has the bytes of its NCHW form) and the ``Unsqueeze`` of each
``h`` (the filter reshape reads ``(B, C)`` as well). Bit-exact; a few microseconds a node, which
is what DIA's small vectors cost on small models.

The result is onnxruntime-specific: it holds ``com.microsoft.nchwc`` operators, whose weights were
laid out for this CPU's block size, so it runs only in onnxruntime's CPU provider on a CPU of the
same kind (onnxruntime says the same of any model it saved with layout optimisations). Keep the
portable file for everything else. The compiled file records the batch size, block size and
onnxruntime version in its metadata (``fxattn.ort_cpu``).

Only DIA's multiplies are rewritten: they are found by name scope and shape in the portable
model (the same scope rule as :mod:`fxattn.export.optimize`) and by name in onnxruntime's graph,
which keeps the names of the nodes it does not fuse. A model without DIA comes out as
onnxruntime's own optimised graph. Channels that do not fill the last block (MobileNetV2's 24)
get zero scales in the padding; a multiply whose activation onnxruntime does not run blocked
(after a squeeze-excitation's multiply, or in a channels-last ConvNeXt block) is left as it was,
and the report says why.

The steps are files of this package: ``ort_graph.py`` (onnxruntime's own graph at a fixed
batch), ``fuse.py`` (the rewrite; ``fold.py`` the weight fold, ``copies.py`` the dropped
copies, ``graph_edit.py`` the edit of onnxruntime's graph), ``verify.py`` (the compiled file
against the portable one: no worse than the float32 computation it replaces) and this file,
which runs them and saves the result.

>>> report = fxattn.compile_ort_cpu("lean.onnx", "lean.b1.ort-cpu.onnx", batch_size=1)
>>> print(report)   # DIA multiplies fused into blocked convolutions: 16 of 16 ...
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ExportError, first_line
from ..export.onnx_files import save_with_external_data
from ..export.onnx_graph import has_control_flow
from ..files import atomic_path, check_output_path
from .fuse import channel_multiplies, dia_tensors, fuse_dia_multiplies
from .ort_graph import fix_batch, nchwc_block_size, ort_optimize
from .verify import CompileVerification, compile_tolerance, verify_compiled

if TYPE_CHECKING:
    from torch import nn

#: the compiled file's metadata entry: batch size, block size, onnxruntime version (JSON)
METADATA_KEY = "fxattn.ort_cpu"


@dataclass
class OrtCpuReport:
    """What :func:`compile_ort_cpu` did, and how the compiled model compares with the portable."""

    path: str
    batch_size: int
    block_size: int  # onnxruntime's channel block on this CPU (0: no blocked layout here)
    dia_multiplies: int  # DIA multiplies in the portable model
    fused: int  # of them, rewritten as a blocked convolution
    folded: int = 0  # of those, folded into the weights of the convolution before them
    copies_dropped: int = 0  # layout copies of DIA's vectors dropped (bit-exact)
    skipped: dict[str, str] = field(default_factory=dict)  # multiply -> why it was left alone
    nodes: dict[str, int] = field(default_factory=dict)  # onnxruntime's graph, then compiled
    max_abs_error: float | None = None  # compiled vs portable model in onnxruntime
    rule: str | None = None  # the verification rule that decided (None: not verified)
    verification: CompileVerification | None = None  # the comparison, when verified
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"compiled {self.path} for onnxruntime's CPU provider, batch {self.batch_size}"
                 f" (channel block {self.block_size or 'none'})",
                 f"DIA multiplies fused into blocked convolutions: {self.fused} of "
                 f"{self.dia_multiplies}"
                 + (f" ({self.folded} folded into the weights of the convolution before them)"
                    if self.folded else "")]
        if self.copies_dropped:
            lines.append(f"layout copies of DIA's vectors dropped: {self.copies_dropped}")
        lines += [f"  left as onnxruntime made it: {name} ({why})"
                  for name, why in self.skipped.items()]
        if self.nodes:
            lines.append(f"nodes: {self.nodes['onnxruntime']} in onnxruntime's graph, "
                         f"{self.nodes['compiled']} compiled")
        if self.verification is not None:
            lines.append(f"verified: {self.verification.summary()}")
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)



def compile_ort_cpu(onnx_path: str | Path, output_path: str | Path, batch_size: int, *,
                    fold_weights: bool = True, drop_copies: bool = True, verify: bool = True,
                    overwrite: bool = True, seed: int = 0,
                    module: nn.Module | None = None) -> OrtCpuReport:
    """Compile the lean ONNX model at ``onnx_path`` for onnxruntime's CPU provider.

    The model's batch dimension becomes ``batch_size``; onnxruntime optimises it as it would at
    session start; each DIA multiply (with the residual add and ReLU after it) becomes one
    blocked depthwise convolution (see the module docstring) or, with ``fold_weights`` (the
    default) and where it reads fewer bytes, is folded into the weights of the convolution that
    made its activation. With ``drop_copies`` (the default) the layout copies onnxruntime makes
    of DIA's small vectors (the reorder of each pooled activation whose channels fill the
    blocks, the unsqueeze of each ``h``) are dropped: same bytes, bit-exact. The file is
    written atomically (with ``<name>.data`` beside it for the weights).

    With ``verify`` (the default) the compiled model is run against the portable one in
    onnxruntime on a random batch (``seed``) and must be no worse than the float32 computation
    it replaces (:mod:`fxattn.deploy.verify`), else :class:`~fxattn.VerificationError` naming
    the worst element and the rule, and nothing is written. Elements within
    ``|compiled - portable| <= 1e-6 + 1e-5 |portable|`` pass (rule ``"allclose"``; int8's
    tolerance where DIA's low-precision matrices quantise their input at run time). Where
    that fails (near-cancelling outputs of an ill-conditioned model), ``module`` - the PyTorch
    module the portable file was exported from, optional - decides: both files are compared
    with it run in float64, and the compiled file may be off float64 by at most 16 times what
    the portable file is (rule ``"float64"``). Without ``module`` the portable file's own
    rounding noise decides: its spread against itself run without onnxruntime's graph
    optimisations (rule ``"spread"``). ``report.rule`` says which rule decided,
    ``report.verification`` has the numbers.

    >>> fxattn.export_onnx(lean, "lean.onnx", example)
    >>> fxattn.compile_ort_cpu("lean.onnx", "lean.b8.ort-cpu.onnx", batch_size=8)
    """
    import onnx

    start = time.perf_counter()
    source = Path(onnx_path)
    if not source.is_file():
        raise ExportError(f"{source} is not a file; export the model first "
                          "(fxattn.export_onnx or `fxattn export`)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    target = check_output_path(output_path, overwrite)
    if target.resolve() == source.resolve():
        raise ExportError(f"the output {target} would overwrite the portable model; "
                          "choose another name, e.g. model.b1.ort-cpu.onnx")
    try:
        model = onnx.load(str(source))
    except Exception as exc:  # noqa: BLE001 - onnx's own failure, in one line
        raise ExportError(f"{source} is not a readable ONNX model: {first_line(exc)}") from exc
    if has_control_flow(model.graph):
        raise ConfigError(
            f"{source} has control flow (If/Loop nodes, as a whole-detector export has); "
            "compile_ort_cpu fixes the batch of a batch-major graph and cannot here. Deploy "
            "the portable file (its exact DIA rewrites already ran), or compile a transformed "
            "part exported on its own (fxattn.export_onnx(lean.backbone, ...))")
    multiplies = channel_multiplies(model)
    dia_names = dia_tensors(model) if drop_copies else None
    tolerance = compile_tolerance(model)
    fix_batch(model, batch_size)
    block = nchwc_block_size()
    with tempfile.TemporaryDirectory(prefix="fxattn-ort-cpu-") as folder:
        static, optimized = Path(folder) / "static.onnx", Path(folder) / "optimized.onnx"
        save_with_external_data(model, static)
        del model
        try:
            ort_optimize(static, optimized)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
            raise ExportError(f"onnxruntime cannot optimise {source} at batch {batch_size}: "
                              f"{first_line(exc)}") from exc
        compiled = onnx.load(str(optimized))
        before = len(compiled.graph.node)
        counts = fuse_dia_multiplies(compiled, multiplies, batch_size, block,
                                     fold_weights=fold_weights, dia_names=dia_names)
        report = OrtCpuReport(path=str(target), batch_size=batch_size, block_size=block,
                              dia_multiplies=sum(found.dia for found in multiplies.values()),
                              fused=counts.fused, folded=counts.folded,
                              copies_dropped=counts.copies_dropped, skipped=counts.skipped,
                              nodes={"onnxruntime": before, "compiled": len(compiled.graph.node)})
        import onnxruntime as ort

        onnx.helper.set_model_props(compiled, {METADATA_KEY: json.dumps(
            {"batch_size": batch_size, "block_size": block, "onnxruntime": ort.__version__})})
        with atomic_path(target) as staged:
            _save(compiled, staged)
            del compiled
            if verify:
                report.verification = verify_compiled(source, staged, batch_size, module=module,
                                                      tolerance=tolerance, seed=seed)
                report.max_abs_error = report.verification.max_abs_error
                report.rule = report.verification.rule
    report.seconds = time.perf_counter() - start
    return report


def _save(model: Any, path: Path) -> None:
    """One file, as the export writes it, or ``<name>.data`` beside it over protobuf's 2 GB."""
    import onnx

    if model.ByteSize() < 2**31 - 2**26:  # a margin for the graph itself
        onnx.save_model(model, str(path))
    else:
        save_with_external_data(model, path)

