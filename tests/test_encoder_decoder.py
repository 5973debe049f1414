"""SSIA taps on encoder-decoders: a conditional diffusion UNet and YOLO's multi-scale neck.

Their skip connections (UNet) and multi-scale concatenations (FPN / YOLO neck) leave no single
path through every stage to the output, so the taps are the stage outputs on the
down-sampling path, up to its deepest feature before the first up-sampling: the encoder
stages and the bottleneck, low to high, each supervised by the next deeper one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fxattn
from fxattn.export import export_onnx


def _conditional_unet() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 3, 16))
    return unet, inputs


def test_conditional_unet_taps_the_encoder_down_to_the_bottleneck(tmp_path: Path) -> None:
    unet, inputs = _conditional_unet()
    net = fxattn.transform(unet, inputs)
    plan = net.plan
    assert [t.grid for t in plan.taps] == [(16, 16), (8, 8), (4, 4)]
    assert [t.module_path.split(".")[0] for t in plan.taps[:2]] == ["down_blocks"] * 2
    # the deepest tap is the bottleneck: mid block and the decoder's lowest-resolution block,
    # before its up-sampler
    assert plan.taps[-1].module_path.startswith("up_blocks.0.")
    assert [(p.low, p.high, p.resize) for p in plan.active_pairs] == [(0, 1, True), (1, 2, True)]
    assert plan.notes[0].startswith("encoder-decoder: the decoder starts at the up-sampling")
    assert "up_blocks.0.upsamplers.0" in plan.notes[0]

    # the model's own training signal: predict the noise
    noise = torch.randn_like(inputs[0])
    net.train()
    prediction = net(*inputs).sample
    loss = F.mse_loss(prediction, noise) + fxattn.ssia_loss(net)
    assert torch.isfinite(fxattn.ssia_loss(net)) and fxattn.ssia_loss(net) > 0
    loss.backward()
    stem = net.get_submodule("conv_in").weight.grad
    assert stem is not None and stem.abs().sum() > 0

    lean = fxattn.strip_ssia(net)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(lean(*inputs).sample, net(*inputs).sample, atol=0, rtol=0)
    report = export_onnx(lean, tmp_path / "unet.onnx", inputs)
    assert report.verified


def test_yolov8_neck_taps_the_backbone_stride_4_to_32() -> None:
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False)
    x = torch.rand(2, 3, 64, 64)
    net = fxattn.transform(model, x)
    plan = net.plan
    grids = [t.grid for t in plan.taps]
    # backbone stage outputs at strides 2, 4, 8, 16, 32 (P1..P5); the neck is not tapped
    assert grids == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    assert [t.module_path.split(".")[:2] for t in plan.taps[1:]] == [
        ["model", "2"], ["model", "4"], ["model", "6"], ["model", "9"]
    ]
    assert len(plan.active_pairs) >= 3
    assert plan.notes[0].startswith("encoder-decoder")

    # training with YOLO's own loss, strip and export at the default rule (boxes in pixels):
    # tests/test_zoo_beyond.py
