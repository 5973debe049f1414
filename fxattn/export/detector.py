"""Export a whole detector (pre- and post-processing included) to ONNX and verify it.

torchvision documents ONNX export of its detectors through the TorchScript exporter (the
forward takes ``list[Tensor]`` images, each its own size, and returns ``list[dict]``); the
dynamo exporter (``torch.export``) stops at the data-dependent shapes of their
post-processing (``nonzero`` after the score threshold, NMS). So ``exporter="auto"`` tries
TorchScript first and dynamo second, and records why each failed.

The ONNX graph takes one input per image (``image_0``, ``image_1``, ...; height and width
are dynamic, the number of images is fixed by the example) and returns the flattened
detections (``boxes``, ``labels``, ``scores``, ... per image). Verification runs PyTorch and
onnxruntime on fresh random images at two sets of sizes and compares the detections with
the rule of :mod:`fxattn.export.detection` (per-element comparison is meaningless: near-equal
scores come out of NMS in either order).

When the whole detector cannot be exported, the transformed parts of a scoped model (the
backbone + FPN) are exported and verified on their own with :func:`fxattn.export_onnx`, and
the report says why the whole model was not.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..analysis.graph import count_parameters
from ..capture import ExampleInputs
from ..errors import ExportError, InputError, VerificationError, first_line
from ..files import atomic_path, check_output_path
from ..modules.graph_module import unwrap
from ..scope import parts_of, scope_info
from .detection import MatchReport, MatchRule, match_detections
from .lowp import apply_dia_weights, check_dia_weights
from .onnx_files import onnx_file_bytes
from .optimize import OnnxOptimize, optimize_onnx_file, resolve_optimize
from .portable import ExportReport, export_portable, mark_dia_name_scopes_in_file
from .runtime import ort_session

DETECTION_EXPORTERS = ("auto", "torchscript", "dynamo")


@dataclass
class DetectionExportReport:
    """What :func:`export_detector` wrote, and how the detections compared."""

    path: str
    exporter: str
    opset: int
    file_bytes: int
    nodes: int
    parameters: int
    export_seconds: float
    image_sizes: list[list[tuple[int, int]]]
    match: MatchReport
    rule: MatchRule
    verified: bool
    notes: list[str] = field(default_factory=list)
    parts: dict[str, ExportReport] = field(default_factory=dict)  # when the whole failed
    # a scoped model's transformed parts, each also exported on its own and verified
    # elementwise: random-weight detections barely depend on them (see the README)
    part_checks: dict[str, ExportReport] = field(default_factory=dict)

    @property
    def whole_model(self) -> bool:
        return not self.parts

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "exporter": self.exporter, "opset": self.opset,
            "file_bytes": self.file_bytes, "nodes": self.nodes, "parameters": self.parameters,
            "export_seconds": self.export_seconds,
            "image_sizes": [[list(s) for s in sizes] for sizes in self.image_sizes],
            "match": self.match.to_dict(), "rule": asdict(self.rule),
            "verified": self.verified, "notes": list(self.notes),
            "parts": {path: report.to_dict() for path, report in self.parts.items()},
            "part_checks": {path: report.to_dict()
                            for path, report in self.part_checks.items()},
        }

    def __str__(self) -> str:
        if self.parts:
            lines = [f"the whole detector was not exported ({'; '.join(self.notes)}); "
                     "its transformed parts were:"]
            lines += [f"  {path}: {report}" for path, report in self.parts.items()]
            return "\n".join(lines)
        m = self.match
        lines = [
            f"exported {self.path} ({self.exporter}, opset {self.opset}): "
            f"{self.nodes} nodes, {self.file_bytes / 1e6:.1f} MB, "
            f"{self.parameters:,} parameters, {self.export_seconds:.1f} s",
        ]
        if self.verified:
            sizes = " and ".join(
                ", ".join(f"{h}x{w}" for h, w in s) for s in self.image_sizes)
            lines.append(
                f"onnxruntime vs PyTorch on images {sizes}: {m.matched}/{m.compared} "
                f"detections with score >= {self.rule.score_threshold:g} matched "
                f"({m.borderline} borderline, {m.ties} NMS ties), worst box error "
                f"{m.max_box_error:.2e} px, "
                f"score {m.max_score_error:.2e}"
                + (f", masks/keypoints {m.max_extra_error:.2e}" if m.max_extra_error else "")
            )
            if m.float64_problems is not None:
                lines.append(
                    f"ill-conditioned: PyTorch's own float32 detections differ from a float64 "
                    f"run ({m.float64_own_problems} problem(s)); onnxruntime has "
                    f"{m.float64_problems} against it - passed by the float64 rule"
                )
        for path, check in self.part_checks.items():
            lines.append(f"part {path!r} exported alone and verified elementwise: "
                         f"{check.verification.summary() if check.verification else 'ok'}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _images_of(example: Any) -> list[torch.Tensor]:
    images = example
    if isinstance(example, tuple) and len(example) >= 1 and isinstance(example[0], list):
        images = example[0]  # (images,) or (images, targets)
    if not (isinstance(images, list) and images and all(
            isinstance(i, torch.Tensor) and i.dim() == 3 for i in images)):
        raise InputError(
            "a detector is exported from a list of CHW image tensors ([image, ...] or "
            f"(images,)), got {type(example).__name__}"
        )
    return images


class _Detections(nn.Module):
    """``detector(images)`` with the images as separate inputs (one ONNX input each)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.eval()  # the TorchScript exporter exports (and sets) the wrapper's mode

    def forward(self, *images: torch.Tensor) -> Any:
        return self.detector(list(images))


def _export(kind: str, module: nn.Module, images: list[torch.Tensor], tmp: Path,
            opset: int | None) -> None:
    names = [f"image_{i}" for i in range(len(images))]
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), \
            contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        if kind == "torchscript":
            torch.onnx.export(
                _Detections(module), tuple(images), str(tmp), dynamo=False,
                input_names=names, opset_version=opset or 17,
                dynamic_axes={n: {1: f"height_{i}", 2: f"width_{i}"}
                              for i, n in enumerate(names)},
            )
        else:
            dims = [{1: torch.export.Dim(f"height_{i}", min=32, max=4096),
                     2: torch.export.Dim(f"width_{i}", min=32, max=4096)}
                    for i in range(len(images))]
            torch.onnx.export(_Detections(module), tuple(images), str(tmp), dynamo=True,
                              dynamic_shapes=tuple(dims), opset_version=opset,
                              external_data=False, verbose=False)


def _other_sizes(images: list[torch.Tensor]) -> list[tuple[int, int]]:
    """A second set of image sizes: each example size stretched differently in h and w."""
    return [(max(32, int(i.shape[1]) * 5 // 4), max(32, int(i.shape[2]) * 3 // 4))
            for i in images]


def verify_detections(
    path: str,
    module: nn.Module,
    size_sets: list[list[tuple[int, int]]],
    rule: MatchRule | None = None,
    seed: int = 0,
    float64_check: bool = True,
) -> MatchReport:
    """PyTorch vs onnxruntime detections on fresh random images of each size set.

    When they disagree, the float64 rule (:func:`float64_detections`) decides whether the
    disagreement is rounding on an ill-conditioned input (``float64_check=False`` skips it).
    """
    try:
        session = ort_session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(f"onnxruntime cannot load the exported detector: "
                                f"{str(exc).strip().splitlines()[0]}") from exc
    rule = rule or MatchRule()
    generator = torch.Generator().manual_seed(seed)
    names = [i.name for i in session.get_inputs()]
    report = MatchReport()
    runs: list[tuple[list[torch.Tensor], Any, Any, str]] = []
    for sizes in size_sets:
        images = [torch.rand(3, h, w, generator=generator) for h, w in sizes]
        with torch.no_grad():
            expected = module(images)
        leaves, spec = tree_flatten(expected)
        outputs = session.run(None, {n: i.numpy() for n, i in zip(names, images, strict=True)})
        if len(outputs) != len(leaves):
            raise VerificationError(
                f"onnxruntime returned {len(outputs)} outputs, PyTorch {len(leaves)}"
            )
        actual = tree_unflatten([np.asarray(o) for o in outputs], spec)
        where = "images " + ", ".join(f"{h}x{w}" for h, w in sizes) + ": "
        runs.append((images, expected, actual, where))
        report.merge(match_detections(expected, actual, rule, where))
    if not report.ok and float64_check:
        float64_detections(module, runs, rule, report)
    if not report.ok:
        shown = "; ".join(report.problems[:3])
        text = (f"onnxruntime and PyTorch detections disagree ({len(report.problems)} "
                f"problem(s)): {shown}")
        if report.float64_problems is not None:
            text += (f"; against a float64 run of the detector onnxruntime has "
                     f"{report.float64_problems} problem(s), PyTorch's own float32 "
                     f"{report.float64_own_problems}, so this is not rounding")
        raise VerificationError(
            f"{text}; see fxattn.export.detection for the matching rule and its tolerances"
        )
    return report


def float64_detections(module: nn.Module, runs: list[tuple[Any, Any, Any, str]],
                       rule: MatchRule, report: MatchReport) -> None:
    """The float64 rule for detections (the analogue of :mod:`fxattn.export.agreement`'s,
    counted in matching problems instead of elementwise ratios); ``runs`` are
    ``(images, pytorch detections, onnxruntime detections, where)``, ``report`` is updated.

    A random-weight detector scores thousands of anchors alike: a rounding difference moves a
    proposal across the top-k cut or flips an NMS decision, and the boxes after it differ - in
    PyTorch's own float32 as much as in onnxruntime. When the match fails, the detector runs
    once more in float64; if PyTorch's float32 detections themselves disagree with it, the
    input is ill-conditioned, and onnxruntime passes when it has no more problems against the
    float64 detections than PyTorch's float32 has. A genuine mismatch (a wrong weight moves
    every box) has far more.
    """
    from .verify import Float64Everywhere, float64_call

    try:
        double = float64_call(module)
        own, theirs = MatchReport(), MatchReport()
        for images, expected, actual, where in runs:
            with torch.no_grad(), Float64Everywhere():
                reference = double([i.double() for i in images])
            own.merge(match_detections(reference, expected, rule, where))
            theirs.merge(match_detections(reference, actual, rule, where))
    except Exception as exc:  # noqa: BLE001 - a detector that cannot run in float64
        report.problems.append(f"(no float64 check: the detector fails in float64: "
                               f"{first_line(exc)})")
        return
    report.float64_own_problems = len(own.problems)
    report.float64_problems = len(theirs.problems)
    if own.problems and len(theirs.problems) <= len(own.problems):
        report.problems.clear()


def export_detector(
    module: nn.Module,
    path: str | os.PathLike[str],
    example: Any,
    *,
    exporter: str = "auto",
    opset: int | None = None,
    verify: bool = True,
    rule: MatchRule | None = None,
    parts_fallback: bool = True,
    overwrite: bool = True,
    seed: int = 0,
    dia_weights: str | None = None,
    optimize: bool | OnnxOptimize | None = True,
) -> DetectionExportReport:
    """Export a detector's eval forward (``list[image] -> list[dict]``) to ONNX, verified.

    Args:
        module: a torchvision(-style) detector, a scoped :func:`fxattn.transform` result (it
            is stripped first) or its :func:`fxattn.strip_ssia` copy. Exported in eval mode
            (a copy is switched, never ``module``).
        path: the ``.onnx`` file (written atomically; a failure leaves nothing behind).
        example: the images (a list of CHW tensors, or ``(images,)`` / ``(images, targets)``).
            Their number is fixed in the ONNX graph; their sizes are dynamic.
        exporter: ``"auto"`` (TorchScript, then dynamo), ``"torchscript"`` or ``"dynamo"``.
        verify: compare onnxruntime with PyTorch on two sets of image sizes (the example's
            and a stretched one), with ``rule``.
        parts_fallback: when no exporter can export the whole detector, export the
            transformed parts of a scoped model (verified) next to ``path``
            (``<stem>.<part>.onnx``) instead of failing.
        dia_weights: ``"fp16"``, ``"int8"`` or ``"int4"`` stores DIA's matrices at lower
            precision, as in :func:`fxattn.export_onnx`. The detections are matched before
            (lower precision moves scores by more than the rule's float32 tolerances, and
            with them which boxes NMS keeps); the transformed parts, exported the same way,
            are verified elementwise with that mode's tolerance.
        optimize: the exact DIA rewrites of :mod:`fxattn.export.optimize`, as in
            :func:`fxattn.export_onnx` (on by default); the detections are matched after them.

    Raises:
        ExportError: no exporter could export the detector (and no part could be exported).
        VerificationError: the detections of the two engines do not match under ``rule``.
    """
    import onnx

    from ..transform import strip_ssia

    if exporter not in DETECTION_EXPORTERS:
        raise ExportError(f"exporter={exporter!r} is not one of {', '.join(DETECTION_EXPORTERS)}")
    check_dia_weights(dia_weights)
    rewrites = resolve_optimize(optimize)
    rule = rule or MatchRule()
    images = _images_of(example)
    target = check_output_path(path, overwrite)
    module = unwrap(module)
    info = scope_info(module)
    notes: list[str] = []
    if info is not None and not info.stripped:
        module = strip_ssia(module)
        notes.append("exported the stripped (lean) detector: its transformed parts' "
                     "evaluation graphs, the rest as in the original model")
    elif module.training:
        module = copy.deepcopy(module).eval()
    order = {"auto": ["torchscript", "dynamo"], "torchscript": ["torchscript"],
             "dynamo": ["dynamo"]}[exporter]
    failures: list[str] = []
    size_sets = [[(int(i.shape[1]), int(i.shape[2])) for i in images], _other_sizes(images)]
    try:
        with atomic_path(target) as tmp:
            start = time.perf_counter()
            used = None
            for kind in order:
                try:
                    for leftover in tmp.parent.iterdir():
                        leftover.unlink()
                    _export(kind, module, images, tmp, opset)
                    onnx.checker.check_model(str(tmp), full_check=True)
                    used = kind
                    break
                except Exception as exc:  # noqa: BLE001 - try the next exporter, report all
                    text = str(exc).strip()
                    failures.append(f"{kind}: {text.splitlines()[0] if text else type(exc)}")
            if used is None:
                raise ExportError(f"ONNX export of the detector failed ({'; '.join(failures)})")
            if failures:
                notes.append(f"fell back to the {used} exporter ({failures[0]})")
            if used == "torchscript":
                mark_dia_name_scopes_in_file(tmp)  # its node names lose DIA's scope
            if rewrites is not None:
                notes += optimize_onnx_file(tmp, rewrites).notes
            seconds = time.perf_counter() - start
            match = verify_detections(str(tmp), module, size_sets, rule, seed) if verify \
                else MatchReport()
            if verify and match.compared == 0 and rule.score_threshold > 0:
                # random weights score every box below the threshold: compare all it kept
                rule = replace(rule, score_threshold=0.0)
                match = verify_detections(str(tmp), module, size_sets, rule, seed)
                notes.append("no detection scored >= the score threshold; compared every "
                             "detection kept (score_threshold=0)")
            if dia_weights not in (None, "fp32"):
                notes.append(apply_dia_weights(tmp, dia_weights))
                if verify:
                    notes.append(f"detections matched before DIA's matrices were stored as "
                                 f"{dia_weights}; the transformed parts are verified with "
                                 f"{dia_weights}'s tolerance")
            proto = onnx.load(str(tmp))
            file_bytes = onnx_file_bytes(tmp)
        part_checks = check_parts(module, dia_weights, optimize) \
            if verify and info is not None else {}
    except VerificationError:
        raise  # exported, but wrong: never hidden behind the parts' export
    except ExportError as whole:
        if not (parts_fallback and info is not None):
            raise
        return export_parts(module, target, overwrite, [str(whole)], dia_weights, optimize)
    return DetectionExportReport(
        path=str(target), exporter=used,
        opset=next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0),
        file_bytes=file_bytes, nodes=len(proto.graph.node), parameters=count_parameters(module),
        export_seconds=seconds, image_sizes=size_sets if verify else [], match=match,
        rule=rule, verified=verify, notes=notes, part_checks=part_checks,
    )


def check_parts(lean: nn.Module, dia_weights: str | None = None,
                optimize: bool | OnnxOptimize | None = True) -> dict[str, ExportReport]:
    """Each transformed part of the scoped lean detector ``lean`` exported alone (into a
    temporary folder, removed after) and verified by :func:`fxattn.export.verify.verify_onnx`'s
    rule; the export reports by part path. Raises :class:`~fxattn.VerificationError` for a part
    that does not verify."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        report = export_parts(lean, Path(folder) / "part.onnx", True, [], dia_weights, optimize)
    return report.parts


def export_parts(lean: nn.Module, target: Path, overwrite: bool, notes: list[str],
                 dia_weights: str | None = None,
                 optimize: bool | OnnxOptimize | None = True) -> DetectionExportReport:
    """Each transformed part of the scoped lean detector ``lean``, exported and verified on its
    own as ``<target stem>.<part path>.onnx`` beside ``target`` (the detector export's
    fallback when the whole detector does not export); ``notes`` go into the report."""
    info = scope_info(lean)
    assert info is not None
    reports: dict[str, ExportReport] = {}
    plan_parts = {p.path: p for p in info.plan.parts}
    for part_path, part in parts_of(lean, info):
        inputs = plan_parts[part_path].inputs
        if inputs is None:
            raise ExportError(f"scope part {part_path!r} has no recorded example inputs")
        out = target.with_name(f"{target.stem}.{part_path}.onnx")
        reports[part_path] = export_portable(part, out, inputs, overwrite=overwrite,
                                         dia_weights=dia_weights, optimize=optimize)
    return DetectionExportReport(
        path="", exporter="", opset=0, file_bytes=0, nodes=0,
        parameters=count_parameters(lean), export_seconds=0.0, image_sizes=[],
        match=MatchReport(), rule=MatchRule(), verified=False, notes=notes, parts=reports,
    )


def is_detection_export(module: nn.Module, inputs: ExampleInputs) -> bool:
    """A scoped fxattn model, or a forward fed a list of images (a torchvision detector)."""
    return scope_info(module) is not None or bool(
        inputs.args and isinstance(inputs.args[0], list) and inputs.batches()[1])
