"""A fast cross-section of the zoo beyond classifiers (the full run is
``benchmarks/zoo_coverage.py``): a video model, a YOLO detector and a text-conditioned UNet.

Each goes through the whole pipeline with its own training loss on generated targets:
transform (DIA + SSIA) -> one SGD step (task + SSIA loss) moves DIA -> strip (the lean output
equals the evaluation output) -> ONNX export -> onnxruntime parity at batch 2 and 3.

The SSIA pair counts are the behaviour these models need, not what happens to be found today:
two pairs on the 5-D ``(B, C, T, H, W)`` stages of a video ResNet, three on YOLO's stride-8 to
stride-32 backbone outputs that feed its multi-scale neck, two on a UNet's encoder-decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from test_zoo_subset import _call, _floats

import fxattn
from fxattn.graph_module import DIA_ROOT, SSIA_ROOT
from fxattn.onnx_export import export_onnx

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


def _conditional_unet() -> tuple[torch.nn.Module, Any, Loss]:
    """A text-conditioned UNet (cross-attention on encoder_hidden_states), noise-MSE loss."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 5, 16)}
    noise = torch.randn(2, 4, 16, 16)
    return unet, inputs, lambda out: torch.nn.functional.mse_loss(out.sample, noise)


# (id, builder, minimum SSIA pairs)
BEYOND = [
    ("torchvision.video:r3d_18", _video, 2),  # needs 5-D SSIA maps (branch i13a)
    ("ultralytics:yolov8n", _yolo, 3),  # needs multi-scale neck taps (branch i13a)
    ("diffusers:UNet2DConditionModel", _conditional_unet, 2),  # needs encoder-decoder taps
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
