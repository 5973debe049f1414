"""The ``torchvision.detection`` family of the zoo (see ``zoo_coverage.py``).

Every model of ``torchvision.models.list_models(module=torchvision.models.detection)``, random
weights (``weights=None, weights_backbone=None``), small images (RCNN / RetinaNet / FCOS
resize to ``min_size=128, max_size=160``; SSD models to their fixed 300 / 320), through the
detector's own training signature:

    transform   fxattn.transform(detector, (images, targets)): scoped to the capturable parts
    train       one SGD step on sum(detector's loss dict) + fxattn.ssia_loss(net)
    strip       fxattn.strip_ssia(net): lean(images) == net.eval()(images), bitwise
    export      the whole lean detector to ONNX (fxattn.export.detector.export_detector)
    parity      onnxruntime vs PyTorch detections on two sets of image sizes (the matching
                rule of fxattn.export.detection, score threshold 0.05)

Where the whole detector does not export, the record says whether torch.onnx exports the
original detector either, and whether the transformed parts exported and verified.
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

FAMILY = "torchvision.detection"
SIZES = ((128, 112), (112, 128))


def detection_models() -> list[str]:
    import torchvision

    return [f"{FAMILY}:{n}"
            for n in sorted(torchvision.models.list_models(module=torchvision.models.detection))]


def build_detector(name: str) -> tuple[Any, tuple[list[Any], list[dict[str, Any]]], str]:
    import torch
    import torchvision

    from fxattn.export.detection import detection_targets_for, random_detection_batch

    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None}
    if not name.startswith("ssd"):
        kwargs.update(min_size=128, max_size=160)
    if not name.startswith("keypoint"):
        kwargs["num_classes"] = 5
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, **kwargs)
    images, targets = random_detection_batch(
        2, SIZES, num_classes=5 if "num_classes" in kwargs else 2,
        **detection_targets_for(model))
    return model, (images, targets), "2 images 128x112 + 112x128, targets"


def run_detection_pipeline(model_id: str, first_line: Callable[[BaseException], str]
                           ) -> dict[str, Any]:
    """The whole pipeline on one detector; the record says how far it got."""
    import torch
    from torch.utils._pytree import tree_leaves

    import fxattn
    from fxattn.errors import AnalysisError, ConfigError, InputError, VerificationError
    from fxattn.export.detector import check_parts, export_detector, verify_detections

    torch.set_num_threads(1)
    family, name = model_id.split(":", 1)
    record: dict[str, Any] = {"id": model_id, "family": family, "name": name, "status": "failed"}
    started = time.perf_counter()
    stage = "build"
    model = None
    try:
        model, (images, targets), described = build_detector(name)
        record["input"] = described
        record["parameters"] = sum(p.numel() for p in model.parameters())
        record["plain_fx"] = False  # detectors loop over images in Python: checked below
        try:
            torch.fx.symbolic_trace(model)
            record["plain_fx"] = True
        except Exception:  # noqa: BLE001 - only whether plain FX can trace it matters
            pass

        stage = "trace"
        try:
            net = fxattn.transform(model, (images, targets))
        except (AnalysisError, ConfigError, InputError):
            stage = "analyze"
            raise
        scope = net.fxattn_scope.plan
        record.update(tracer=scope.parts[0].plan.tracer, scope=scope.paths,
                      sites=len(scope.sites), taps=len(scope.taps),
                      pairs=len(scope.active_pairs), dia_parameters=scope.dia_parameters)

        stage = "train"
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        losses = net(images, targets)
        ssia = fxattn.ssia_loss(net)
        loss = sum(losses.values()) + ssia
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is not finite: {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        record.update(ssia_loss=float(ssia.detach()), losses=sorted(losses))

        stage = "strip"
        lean = fxattn.strip_ssia(net)
        net.eval()
        with torch.no_grad():
            expected, got = tree_leaves(net(images)), tree_leaves(lean(images))
        if len(got) != len(expected) or not all(
                torch.equal(a, b) for a, b in zip(got, expected, strict=True)):
            raise AssertionError("the stripped detector's output differs from the eval output")

        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "detector.onnx"
            report = export_detector(lean, path, images, verify=False, parts_fallback=False)
            record.update(exporter=report.exporter, onnx_nodes=report.nodes,
                          rewrites=next((n for n in report.notes
                                         if n.startswith("exact DIA rewrites")), ""))
            stage = "parity"
            sizes = [list(SIZES), [(h * 5 // 4, w * 3 // 4) for h, w in SIZES]]
            match = verify_detections(str(path), lean, sizes)
            record.update(compared=match.compared, matched=match.matched,
                          borderline=match.borderline, ties=match.ties,
                          max_box_error=match.max_box_error,
                          max_score_error=match.max_score_error)
            if match.float64_problems is not None:  # passed by the float64 rule
                record.update(float64_problems=match.float64_problems,
                              float64_own_problems=match.float64_own_problems)
            # random-weight detections barely depend on the backbone: verify the transformed
            # parts elementwise on their own too (export_detector does the same)
            record["part_margins"] = {
                part: check.verification.margin
                for part, check in check_parts(lean).items() if check.verification}
        record["status"] = "ok"
        stage = "done"
    except Exception as exc:  # noqa: BLE001 - the record names the stage and the reason
        record["error"] = first_line(exc)
        record["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        if isinstance(exc, VerificationError):
            stage = "parity"
        if stage == "export" and model is not None:
            record["original_exports"] = _original_exports(model, images)
            record["parts_export"] = _parts_export(lean)
    record["stage"] = stage
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _original_exports(model: Any, images: list[Any]) -> bool:
    """Whether torch.onnx exports the *original* detector (judges an export failure)."""
    from fxattn.export.detector import export_detector

    try:
        with tempfile.TemporaryDirectory() as tmp:
            export_detector(model.eval(), Path(tmp) / "m.onnx", images, verify=False)
        return True
    except Exception:  # noqa: BLE001
        return False


def _parts_export(lean: Any) -> str:
    """The transformed parts exported and verified on their own (the fallback)."""
    from fxattn.export.detector import export_parts

    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = export_parts(lean, Path(tmp) / "m.onnx", True, [])
        return "; ".join(f"{p}: verified, max abs error {r.max_abs_error:.1e}"
                         for p, r in report.parts.items())
    except Exception as exc:  # noqa: BLE001
        return f"failed: {str(exc).strip().splitlines()[0][:200]}"
