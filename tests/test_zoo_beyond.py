"""A fast cross-section of the zoo beyond classifiers (the full run is
``benchmarks/zoo_coverage.py``): a video model and a YOLO detector (the text-conditioned UNet is in
test_encoder_decoder.py).

Each goes through the whole pipeline with its own training loss on generated targets:
transform (DIA + SSIA) -> one SGD step (task + SSIA loss) moves DIA -> strip (the lean output
equals the evaluation output) -> ONNX export -> onnxruntime parity at batch 2 and 3.

The SSIA pair counts are the behaviour these models need, not what happens to be found today:
two pairs on the 5-D ``(B, C, T, H, W)`` stages of a video ResNet, three on YOLO's stride-8 to
stride-32 backbone outputs that feed its multi-scale neck.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from pipeline import call as _call
from pipeline import floats as _floats

import fxattn
from fxattn.export import export_onnx
from fxattn.names import DIA_ROOT, SSIA_ROOT

Loss = Callable[[Any], torch.Tensor]


def _video() -> tuple[torch.nn.Module, Any, Loss]:
    """torchvision's R3D-18 on a 4-frame 32x32 clip, cross-entropy on random labels."""
    model = torchvision.models.video.r3d_18(weights=None, num_classes=5)
    labels = torch.tensor([1, 3])
    return model, torch.randn(2, 3, 4, 32, 32), lambda out: (
        torch.nn.functional.cross_entropy(out, labels))


def _yolo() -> tuple[torch.nn.Module, Any, Loss]:
    """YOLOv8n from its yaml (no weights), trained with its own ``model.loss`` on two boxes."""
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    from ultralytics.cfg import get_cfg

    model = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.args = get_cfg()  # the default hyperparameters ultralytics' trainer gives the loss
    images = torch.randn(2, 3, 64, 64)
    batch = {"img": images, "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [2.0]]),
             "bboxes": torch.tensor([[0.3, 0.3, 0.4, 0.4], [0.6, 0.5, 0.5, 0.6]])}
    return model, images, lambda preds: model.loss(batch, preds)[0].sum()


# (id, builder, minimum SSIA pairs). The conditional UNet (>= 2 pairs on a 3-level UNet: a
# 2-level one has two resolutions, hence one pair) goes through the same pipeline with its
# noise-prediction loss in tests/test_encoder_decoder.py, so CI runs it once.
BEYOND = [
    ("torchvision.video:r3d_18", _video, 2),  # 5-D (B, C, T, H, W) SSIA maps
    ("ultralytics:yolov8n", _yolo, 3),  # the backbone's outputs that feed the neck
]


@pytest.mark.parametrize(("model_id", "make", "min_pairs"), BEYOND, ids=[m for m, _, _ in BEYOND])
def test_beyond_classifiers_whole_pipeline(
    model_id: str, make: Callable[[], tuple[torch.nn.Module, Any, Loss]], min_pairs: int,
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model, inputs, loss_of = make()
    net = fxattn.transform(model, inputs, dia=True, ssia=True)
    assert net.plan.sites, "no DIA site"
    assert len(net.plan.active_pairs) >= min_pairs, net.plan.active_pairs

    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(DIA_ROOT)}
    task = loss_of(_call(net, inputs))
    ssia = fxattn.ssia_loss(net)
    assert torch.isfinite(task) and torch.isfinite(ssia) and ssia.item() > 0
    (task + ssia).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    after = net.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items()), "DIA did not learn"

    net.eval()
    lean = fxattn.strip_ssia(net)
    assert not any(name.startswith(SSIA_ROOT) for name, _ in lean.named_modules())
    with torch.no_grad():
        expected, got = _floats(_call(net, inputs)), _floats(_call(lean, inputs))
        reference = _floats(_call(model.eval(), inputs))
    assert [t.shape for t in got] == [t.shape for t in reference]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)

    # the default elementwise rule |ort - torch| <= atol + rtol * |torch| (YOLO's decoded
    # boxes are in pixels, its scores in [0, 1])
    report = export_onnx(lean, tmp_path / "model.onnx", inputs, batch_sizes=(2, 3))
    assert report.verified, model_id
