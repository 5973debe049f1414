"""Detections: generated examples to train on, and the rule that says two sets match.

A detector's output is a list (one entry per image) of dicts with ``boxes`` (N, 4),
``scores`` (N,), ``labels`` (N,) and, per model, ``masks`` / ``keypoints`` /
``keypoints_scores``. Two engines (PyTorch, onnxruntime) computing the same detector differ
by float rounding, so their lists are compared as *sets above a score threshold*, not
elementwise:

1. **threshold** - only detections scoring at least ``score_threshold`` are compared.
2. **borderline** - a detection may be missing from the other side when its score is within
   ``border`` of the cut: the threshold, or the lowest score kept by the longer of the two
   lists (where a list cut at ``detections_per_img`` ends: random-weight detectors keep many
   near-equal low scores, and a rounding difference moves one across the cut);
3. **matching** - greedily, highest score first, each expected detection is paired with an
   unpaired actual one of the same label whose score and box agree elementwise within
   ``atol + rtol * |expected|`` (box coordinates in pixels); among several (ties: equal
   scores come out of NMS in either order) the closest box wins. Every non-borderline
   detection on either side must be paired;
4. **NMS ties** - an expected detection left unpaired may pair with an unpaired actual one
   of the same label and score whose box overlaps it by IoU >= ``tie_iou`` (torchvision's
   NMS threshold, 0.5): two overlapping boxes of equal score, of which NMS keeps whichever
   comes first - rounding decides which (random-weight detectors score every box alike);
5. **extras** - for paired detections, masks and keypoints must agree within their own
   tolerance (masks are pasted with interpolation: their tolerance is looser).

Limitation: a tie resolved differently can change which further boxes NMS suppresses (a
chain of overlaps); such a second-order difference is reported as unmatched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class MatchRule:
    """Tolerances of :func:`match_detections` (defaults from measured fp32 ORT-vs-PyTorch)."""

    score_threshold: float = 0.05
    border: float = 1e-3
    box_atol: float = 1e-2
    box_rtol: float = 1e-4
    score_atol: float = 1e-4
    score_rtol: float = 1e-3
    extra_atol: float = 1e-2
    extra_rtol: float = 1e-3
    tie_iou: float = 0.5


@dataclass
class MatchReport:
    """How two detection lists compared: pairs found, worst errors, what was unmatched."""

    compared: int = 0  # expected detections above the threshold
    matched: int = 0
    borderline: int = 0  # unmatched, but within ``border`` of the cut (allowed)
    ties: int = 0  # paired with an overlapping box of equal score (NMS kept the other one)
    max_box_error: float = 0.0
    max_score_error: float = 0.0
    max_extra_error: float = 0.0
    problems: list[str] = field(default_factory=list)
    # set when the float64 rule judged the detections (see fxattn.export.detector): how many
    # problems PyTorch's own float32 detections have against a float64 run, and onnxruntime's
    float64_own_problems: int | None = None
    float64_problems: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def merge(self, other: MatchReport) -> None:
        self.compared += other.compared
        self.matched += other.matched
        self.borderline += other.borderline
        self.ties += other.ties
        self.max_box_error = max(self.max_box_error, other.max_box_error)
        self.max_score_error = max(self.max_score_error, other.max_score_error)
        self.max_extra_error = max(self.max_extra_error, other.max_extra_error)
        self.problems += other.problems

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.is_floating_point() else value).numpy()
    return np.asarray(value)


def _close(got: np.ndarray, want: np.ndarray, atol: float, rtol: float) -> tuple[bool, float]:
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    worst = float(diff.max()) if diff.size else 0.0
    return bool(np.all(diff <= atol + rtol * np.abs(want.astype(np.float64)))), worst


def match_image(
    expected: Mapping[str, Any], actual: Mapping[str, Any], rule: MatchRule, where: str = ""
) -> MatchReport:
    """Compare one image's detections (see the module docstring for the rule)."""
    want = {k: _numpy(v) for k, v in expected.items()}
    got = {k: _numpy(v) for k, v in actual.items()}
    report = MatchReport()
    if set(want) != set(got):
        report.problems.append(f"{where}fields differ: {sorted(want)} vs {sorted(got)}")
        return report
    extras = [k for k in want if k not in ("boxes", "scores", "labels")]
    # the cut: the threshold, or the lowest score the longer list kept (where a list cut at
    # detections_per_img ends; elsewhere its lowest detection is at the threshold anyway)
    longer = max((want, got), key=lambda d: d["scores"].size)
    lowest = float(longer["scores"].min()) if longer["scores"].size else rule.score_threshold
    band = max(rule.score_threshold, lowest) + rule.border

    def keep(d: dict[str, np.ndarray]) -> np.ndarray:
        return np.flatnonzero(d["scores"] >= rule.score_threshold)

    w_idx, g_idx = keep(want), keep(got)
    report.compared = len(w_idx)
    free = set(int(i) for i in g_idx)
    unpaired: list[int] = []
    for i in sorted(w_idx, key=lambda k: -float(want["scores"][k])):
        score, box, label = want["scores"][i], want["boxes"][i], want["labels"][i]
        best, best_error = None, np.inf
        for j in free:
            if got["labels"][j] != label:
                continue
            score_ok, _ = _close(got["scores"][j:j + 1], want["scores"][i:i + 1],
                                 rule.score_atol, rule.score_rtol)
            box_ok, box_error = _close(got["boxes"][j], box, rule.box_atol, rule.box_rtol)
            if score_ok and box_ok and box_error < best_error:
                best, best_error = j, box_error
        if best is None:
            if score < band:
                report.borderline += 1
            else:
                unpaired.append(int(i))
            continue
        free.discard(best)
        report.matched += 1
        report.max_box_error = max(report.max_box_error, best_error)
        report.max_score_error = max(report.max_score_error,
                                     abs(float(got["scores"][best]) - float(score)))
        for key in extras:
            ok, error = _close(got[key][best], want[key][i], rule.extra_atol, rule.extra_rtol)
            report.max_extra_error = max(report.max_extra_error, error)
            if not ok:
                report.problems.append(
                    f"{where}{key} of detection {int(i)} differ by {error:.3e}"
                )
    for i in unpaired:
        score, box, label = want["scores"][i], want["boxes"][i], want["labels"][i]
        tie = next((j for j in sorted(free) if got["labels"][j] == label
                    and _close(got["scores"][j:j + 1], want["scores"][i:i + 1],
                               rule.score_atol, rule.score_rtol)[0]
                    and _iou(got["boxes"][j], box) >= rule.tie_iou), None)
        if tie is not None:
            free.discard(tie)
            report.ties += 1
            continue
        report.problems.append(
            f"{where}detection {i} (label {int(label)}, score {float(score):.4f}, "
            f"box {np.round(box, 2).tolist()}) has no match in the other engine"
        )
    for j in sorted(free):
        if float(got["scores"][j]) >= band:
            report.problems.append(
                f"{where}the other engine has an extra detection (label "
                f"{int(got['labels'][j])}, score {float(got['scores'][j]):.4f})"
            )
        else:
            report.borderline += 1
    return report


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def match_detections(
    expected: Sequence[Mapping[str, Any]],
    actual: Sequence[Mapping[str, Any]],
    rule: MatchRule = MatchRule(),
    label: str = "",
) -> MatchReport:
    """Compare per-image detection lists (PyTorch's ``expected``, another engine's ``actual``)."""
    report = MatchReport()
    if len(expected) != len(actual):
        report.problems.append(f"{label}{len(expected)} images vs {len(actual)}")
        return report
    for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
        report.merge(match_image(want, got, rule, f"{label}image {i}: "))
    return report


# --------------------------------------------------------------------------- generated data


def random_detection_batch(
    count: int,
    sizes: Sequence[tuple[int, int]] = ((160, 128), (128, 160)),
    num_classes: int = 5,
    boxes_per_image: int = 3,
    generator: torch.Generator | None = None,
    masks: bool = False,
    keypoints: int = 0,
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``count`` images (sizes cycled) with bright rectangles and their target dicts.

    Each target has ``boxes`` (x1, y1, x2, y2 in pixels, positive width and height) and
    ``labels`` in ``1..num_classes-1`` (0 is background in torchvision); ``masks=True`` adds
    the rectangles' binary masks (Mask R-CNN), ``keypoints=K`` adds K visible keypoints per box
    (Keypoint R-CNN). The rectangles are painted in the images, so a detector can learn them.
    """
    g = generator or torch.Generator().manual_seed(0)
    images, targets = [], []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        image = torch.rand(3, h, w, generator=g) * 0.2
        n = boxes_per_image
        x1 = torch.randint(0, w // 2, (n,), generator=g).float()
        y1 = torch.randint(0, h // 2, (n,), generator=g).float()
        bw = torch.randint(w // 8, w // 2, (n,), generator=g).float()
        bh = torch.randint(h // 8, h // 2, (n,), generator=g).float()
        boxes = torch.stack([x1, y1, (x1 + bw).clamp(max=w - 1), (y1 + bh).clamp(max=h - 1)], 1)
        labels = torch.randint(1, num_classes, (n,), generator=g)
        target: dict[str, torch.Tensor] = {"boxes": boxes, "labels": labels}
        mask = torch.zeros(n, h, w, dtype=torch.uint8)
        for k, (a, b, c, d) in enumerate(boxes.long().tolist()):
            image[labels[k] % 3, b:d, a:c] = 1.0
            mask[k, b:d, a:c] = 1
        if masks:
            target["masks"] = mask
        if keypoints:
            t = torch.rand(n, keypoints, 2, generator=g)
            xs = boxes[:, None, 0] + t[..., 0] * (boxes[:, None, 2] - boxes[:, None, 0])
            ys = boxes[:, None, 1] + t[..., 1] * (boxes[:, None, 3] - boxes[:, None, 1])
            target["keypoints"] = torch.stack([xs, ys, torch.ones_like(xs)], -1)
        images.append(image)
        targets.append(target)
    return images, targets


def detection_targets_for(model: torch.nn.Module) -> dict[str, Any]:
    """What :func:`random_detection_batch` must add for ``model``: masks, keypoints."""
    roi_heads = getattr(model, "roi_heads", None)
    extra: dict[str, Any] = {}
    if roi_heads is not None and getattr(roi_heads, "mask_predictor", None) is not None:
        extra["masks"] = True
    if roi_heads is not None and getattr(roi_heads, "keypoint_predictor", None) is not None:
        extra["keypoints"] = int(roi_heads.keypoint_predictor.kps_score_lowres.out_channels)
    return extra


def is_detector(model: Any) -> bool:
    """A torchvision detector (or one built like them): ``images, targets`` in, detections out."""
    try:
        from torchvision.models.detection.fcos import FCOS
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.retinanet import RetinaNet
        from torchvision.models.detection.ssd import SSD
    except ImportError:
        return False
    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS, SSD))
